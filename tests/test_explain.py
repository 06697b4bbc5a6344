import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anomaly_vae import batch
from anomaly_vae import explain as E

FIELDS = ["column", "kind", "contribution", "value", "expected", "low", "high", "p", "text"]


def test_number_formatting_has_thousands_separators_and_fixed_decimals():
    x = np.array([4812.0, 1234567.891, -1500.0, -0.004, 0.5, 999.995, np.nan, np.inf])
    assert E._fmt(x, 2).to_pylist() == ["4,812.00", "1,234,567.89", "-1,500.00", "0.00", "0.50",
                                        "1,000.00", "nan", "inf"]
    assert E._fmt(np.array([18.4, 95.0, 1.26]), np.array([0, 0, 1])).to_pylist() == ["18", "95", "1.3"]


def test_select_entries_keeps_positive_top_k_of_chosen_rows():
    contrib = np.array([[0.5, 3.0, -1.0], [-1.0, -2.0, -3.0], [1.0, 2.0, 4.0]])
    e = E.select_entries(contrib, k=2)
    assert e.row.tolist() == [0, 0, 2, 2] and e.column.tolist() == [1, 0, 2, 1]
    assert e.offsets.tolist() == [0, 2, 2, 4] and e.contribution.tolist() == [3.0, 0.5, 4.0, 2.0]
    only = E.select_entries(contrib, k=2, rows=np.array([False, True, True]))
    assert only.row.tolist() == [2, 2] and only.offsets.tolist() == [0, 0, 0, 2]


def test_occlude_sets_only_the_named_column_to_typical():
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    owner = np.array([0, 1, 1, 2])
    typical = np.array([-1, -2, -3, -4], dtype=np.float32)
    out = E.occlude(X, np.array([1, 0, 2]), owner, typical)
    assert out.tolist() == [[0, -2, -3, 3], [-1, 5, 6, 7], [8, 9, 10, -4]]
    assert X[0, 1] == 1          # input untouched


@pytest.fixture(scope="module")
def odd_rows(frame):
    """Five rows with amount x50, five with an unseen category, five with x missing."""
    rows = frame.iloc[:15].copy().reset_index(drop=True)
    rows.loc[0:4, "amount"] *= 50
    rows.loc[5:9, "cat"] = "zzz"
    rows.loc[10:14, "x"] = np.nan
    return rows


def test_explanation_names_the_value_and_what_was_expected(fitted, frame, odd_rows):
    tab = fitted.explain(odd_rows, explain_all=True)
    assert tab["explanation"].dtype == pd.ArrowDtype(E.EXPLANATION_TYPE)
    long = E.to_frame(tab["explanation"])
    assert list(long.columns) == ["row", "rank"] + FIELDS
    first = long[long["rank"] == 1].set_index("row")
    amount = first.loc[0:4]
    assert (amount["column"] == "amount").all() and (amount["kind"] == "numeric").all()
    assert amount["value"].tolist() == [f"{v:,.2f}" for v in odd_rows.loc[0:4, "amount"]]
    assert ((amount["low"] <= amount["high"]) & (amount["high"] <= frame["amount"].max())).all()
    # the expected range comes from the other columns: it covers the row's original amount
    orig = frame.loc[0:4, "amount"].to_numpy()
    assert np.mean((amount["low"].to_numpy() <= orig) & (orig <= amount["high"].to_numpy())) >= 0.6
    assert amount["text"].str.fullmatch(r"amount = [\d,]+\.\d\d \(expected [\d,.]+(–[\d,.]+)?\)").all()

    cat = long[(long["column"] == "cat") & long["row"].between(5, 9)]
    assert len(cat) >= 4 and (cat["value"] == "zzz").all()
    assert cat["expected"].isin(["a", "b", "c", "d"]).all() and cat["p"].between(0, 1).all()
    assert cat["text"].str.fullmatch(r"cat = zzz \(expected [abcd], p=\d\.\d\d\)").all()

    miss = long[(long["column"] == "x") & long["row"].between(10, 14)]
    assert len(miss) >= 4 and (miss["kind"] == "missing").all() and (miss["value"] == "null").all()
    assert (miss["expected"] == "present").all() and (miss["p"] > 0.5).all()
    assert miss["text"].str.fullmatch(r"x = null \(usually present, p=\d\.\d\d\)").all()

    # contributions are the top_features contributions, largest first
    contrib = fitted.contributions(odd_rows).to_numpy()
    for r, grp in long.groupby("row"):
        want = np.sort(contrib[r][contrib[r] > 0])[::-1][:len(grp)]
        np.testing.assert_allclose(grp["contribution"].to_numpy(), want, rtol=1e-9)
        assert grp["column"].tolist() == [t.split(":")[0] for t in tab["top_features"][r].split(";")]


def test_explanation_is_for_flagged_rows_by_default(fitted, frame):
    rows = frame.head(200)
    tab = fitted.explain(rows)
    n_items = tab["explanation"].list.len().to_numpy()
    assert (n_items[~tab["is_anomaly"].to_numpy()] == 0).all()
    assert (n_items[tab["is_anomaly"].to_numpy()] > 0).all()
    everyone = fitted.explain(rows, explain_all=True)["explanation"].list.len().to_numpy()
    want = np.minimum((fitted.contributions(rows).to_numpy() > 0).sum(1), 3)
    np.testing.assert_array_equal(everyone, want)


def test_scored_parquet_has_the_explanation_column(fitted, frame, odd_rows, tmp_path):
    src = tmp_path / "odd.parquet"
    odd_rows.to_parquet(src, index=False)
    batch.score_file(fitted, src, tmp_path / "odd.scored.parquet", batch_size=4)
    got = pq.read_table(tmp_path / "odd.scored.parquet")
    assert got.schema.field("explanation").type == E.EXPLANATION_TYPE
    assert got.schema.field("top_features").type == pa.string()      # kept for compatibility
    want = fitted.explain(odd_rows)
    got_long, want_long = E.to_frame(got.column("explanation")), E.to_frame(want["explanation"])
    assert len(got_long) > 0
    for name in ("row", "rank", "column", "kind", "value", "expected", "text"):
        assert got_long[name].tolist() == want_long[name].tolist()
    for name in ("contribution", "low", "high", "p"):    # batches of 4 rows: float32 noise only
        np.testing.assert_allclose(got_long[name].astype(float), want_long[name].astype(float), rtol=1e-4)


def test_python_and_arrow_text_paths_agree(monkeypatch):
    """Up to E.SMALL entries texts are joined in Python, above with Arrow kernels: same strings."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 10.0 ** rng.integers(-3, 8, 400)), [0.125, 2.5, -0.004, -0.005, 999.995,
                        -1234.5, 0.0, -0.0, 1e15, -3e17, np.nan, np.inf, -np.inf]])
    dec = rng.integers(0, 4, len(x))
    a = E.pa.array([f"v{i}" if i % 7 else None for i in range(len(x))])
    small = (E._fmt(x, dec), E._fmt(x, 2), E._join([a, " = ", E._fmt(x, 0), ")"]))
    monkeypatch.setattr(E, "SMALL", 0)
    large = (E._fmt(x, dec), E._fmt(x, 2), E._join([a, " = ", E._fmt(x, 0), ")"]))
    for s, big in zip(small, large):
        assert s.to_pylist() == big.to_pylist()
    assert small[2][0].as_py() is None and small[2][1].as_py().startswith("v1 = ")
