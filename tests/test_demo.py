
from anomaly_vae.demo import make_transactions


def test_deterministic_and_realistic():
    a, b = make_transactions(5000, seed=7), make_transactions(5000, seed=7)
    assert a.equals(b)
    assert not a.equals(make_transactions(5000, seed=8))
    assert 0.01 <= a.label.mean() <= 0.02
    assert set(a.fraud_type[a.label == 1]) == {"amount_spike", "foreign_cnp", "rare_combo", "velocity"}
    assert a.transaction_id.is_unique and a.timestamp.is_monotonic_increasing
    assert a.customer_age.isna().any() and a.distance_from_home_km.isna().any()
    assert (a.card_present == (a.channel != "online")).mean() > 0.99
    normal = a[a.label == 0]
    assert normal.groupby("merchant_category").amount.median()["travel"] > \
        5 * normal.groupby("merchant_category").amount.median()["grocery"]


def test_wide_transactions_layout_and_determinism():
    from anomaly_vae.demo import make_wide_transactions, wide_layout

    a = make_wide_transactions(20_000, seed=3)
    assert a.equals(make_wide_transactions(20_000, seed=3))
    assert not a.equals(make_wide_transactions(20_000, seed=4))
    assert a.shape == (20_000, 20) and wide_layout(20) == (10, 6, 2)
    assert a.transaction_id.is_unique
    assert str(a.timestamp.dtype).startswith("datetime64")
    kinds = a.drop(columns=["transaction_id", "timestamp"]).dtypes.astype(str)
    assert (kinds == "string").sum() == 6 and (kinds == "bool").sum() == 2
    assert kinds.isin(["float64", "int64"]).sum() == 10
    assert sorted(a[c].nunique() for c in kinds.index[kinds == "string"]) == [3, 6, 12, 20, 28, 60]
    assert 0.02 < a.customer_age.isna().mean() < 0.04
    assert a.amount.min() > 0 and a.amount.skew() > 2        # lognormal: long right tail
    # chunks drawn with other seeds come from the same distribution and keep ids unique
    b = make_wide_transactions(20_000, seed=4)
    assert not set(a.transaction_id) & set(b.transaction_id)
    assert abs(a.amount.median() / b.amount.median() - 1) < 0.05
    for width in (3, 12, 40):
        assert make_wide_transactions(100, width=width).shape == (100, width)
