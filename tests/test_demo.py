
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
