import numpy as np
import pytest

from anomaly_vae import score as S


def test_conformal_threshold_controls_false_alarms():
    rng = np.random.default_rng(0)
    cal, test = rng.normal(size=2000), rng.normal(size=200_000)
    t = S.calibrate_threshold(cal, 0.01)
    assert abs(np.mean(test > t) - 0.01) < 0.004
    assert S.calibrate_threshold(np.arange(10.0), 0.01) == 9.0     # too few rows -> max


def test_p_values_are_conformal():
    cal = np.arange(1.0, 100.0)                 # 99 calibration scores
    p = S.p_values(np.array([0.0, 50.0, 1000.0]), cal)
    np.testing.assert_allclose(p, [1.0, 51 / 100, 1 / 100])


def test_contamination_threshold_flags_that_fraction():
    s = np.arange(1000.0)
    assert np.mean(s > S.contamination_threshold(s, 0.05)) == pytest.approx(0.05, abs=0.002)


def test_scores_decompose_into_columns_plus_kl():
    rng = np.random.default_rng(1)
    dim_nll, kl = rng.random((5, 6)), rng.random(5)
    owner = np.array([0, 0, 1, 2, 2, 2])
    t = S.anomaly_scores(dim_nll, kl, owner, 3)
    np.testing.assert_allclose(t.column_nll.sum(1) + t.kl, t.anomaly_score)
    np.testing.assert_allclose(t.column_nll[:, 0], dim_nll[:, :2].sum(1))


def test_top_features_orders_and_drops_non_positive():
    contrib = np.array([[0.5, 3.0, -1.0], [-1.0, -2.0, -3.0]])
    assert S.top_features(contrib, ["a", "b", "c"], k=3).tolist() == ["b:+3.00;a:+0.50", ""]
    assert S.top_features(np.array([[12.346, 0.004, 7.0]]), ["a", "b", "c"], k=2).tolist() == ["a:+12.35;c:+7.00"]


def test_top_features_table_and_formatted_entries_agree(monkeypatch):
    """Entries inside the precomputed 'name:+x.xx' table and those beyond it (formatted per
    call) give the same text as formatting each entry on its own."""
    rng = np.random.default_rng(0)
    contrib = rng.normal(0, 30, (2000, 7)).astype(np.float32)
    contrib[0, 0], contrib[1, 3] = 1e6, 99.995
    names = [f"col_{i}" for i in range(7)]
    monkeypatch.setattr(S, "TABLE_ENTRIES", 7 * 2000)          # values up to 19.99 from the table
    S._entry_table.cache_clear()
    try:
        got = S.top_features(contrib, names, 3).tolist()
    finally:
        S._entry_table.cache_clear()
    idx, vals = S.top_columns(contrib, 3)
    want = [";".join(f"{names[i]}:+{S._cents_text(S._cents(np.array([v])))[0].as_py()}" for i, v in zip(r, w) if v > 0)
            for r, w in zip(idx, vals)]
    assert got == want
    assert got[0].startswith("col_0:+1000000.00;") and (np.abs(vals) > 20).any() and (vals[vals > 0] < 20).any()
