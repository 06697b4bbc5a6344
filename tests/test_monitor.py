"""anomaly_vae.monitor: statistics gathered batch by batch equal those of all rows at once."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from anomaly_vae import batch, monitor
from anomaly_vae.drift import SCORE_ROW, drift_table
from anomaly_vae.monitor import RESERVOIR_SIZE, ScoringMonitor
from conftest import mixed_frame


def _shifted(seed: int, n: int = 900) -> pd.DataFrame:
    """New rows with drift: amounts doubled, a category never seen in training, nulls, flipped flags."""
    df = mixed_frame(n, seed=seed)
    df.loc[: n // 3, "amount"] *= 2.0
    df.loc[5:40, "cat"] = "zz"
    df.loc[50:60, "cat"] = None
    df.loc[70:90, "x"] = np.inf
    df["flag"] = ~df["flag"]
    return df


def _feed(det, df: pd.DataFrame, sizes: list[int], monitor: ScoringMonitor, source: str = "in.parquet") -> pa.Table:
    """Score `df` in record batches of the given sizes through `monitor`; returns the scored table."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    out, start = [], 0
    for n in sizes:
        rb = table.slice(start, n).combine_chunks().to_batches()[0]
        scored = batch.score_batch(det, rb, ["row_id"])
        monitor.update(rb, scored, source)
        out.append(scored)
        start += n
    return pa.Table.from_batches(out)


def _monitor(det, **kw) -> ScoringMonitor:
    return ScoringMonitor(det.reference_, det.calibration_scores_, det.schema_, det.threshold_,
                          passthrough=["row_id"], **kw)


def test_batched_drift_equals_drift_table_of_all_rows(fitted):
    df = _shifted(seed=11)
    mon = _monitor(fitted)
    scored = _feed(fitted, df, [100, 1, 299, 500], mon).to_pandas()
    want = drift_table(fitted.reference_, fitted.schema_.validate(df), reference_scores=fitted.calibration_scores_,
                       new_scores=scored["anomaly_score"].to_numpy())
    got = mon.drift_table()
    pd.testing.assert_frame_equal(got.set_index("feature").sort_index(), want.set_index("feature").sort_index(),
                                  check_exact=False, rtol=1e-9, atol=1e-12)
    assert got.set_index("feature").loc["cat", "psi"] > 0.2           # the new category is seen as drift
    metrics = mon.metrics()
    assert metrics["rows"] == 900 and metrics["flagged"] == scored["is_anomaly"].sum()
    assert metrics["flag_rate"] == pytest.approx(scored["is_anomaly"].mean())
    assert metrics["psi_score"] == pytest.approx(want.set_index("feature").loc[SCORE_ROW, "psi"])
    assert metrics["psi_max"] == pytest.approx(want[want["kind"] != "score"]["psi"].max())
    assert {f"psi_{c}" for c in fitted.reference_} <= set(metrics)


def test_quantiles_exact_below_the_reservoir_and_close_above(fitted):
    df = mixed_frame(900, seed=12)
    small = _monitor(fitted)
    scores = _feed(fitted, df, [300, 300, 300], small).column("anomaly_score").to_numpy()
    q = small.quantiles()
    assert q["score_p50"] == pytest.approx(np.quantile(scores, 0.5))
    assert q["score_p99"] == pytest.approx(np.quantile(scores, 0.99))
    assert q["score_max"] == scores.max()
    # a reservoir of 200 over 900 rows: a uniform sample, so the median stays close; max stays exact
    tiny = _monitor(fitted, reservoir_size=200)
    _feed(fitted, df, [100] * 9, tiny)
    assert len(tiny.score_sample()) == 200
    assert np.isclose(tiny.score_sample()[:, None], scores[None, :], rtol=1e-6).any(axis=1).all()
    assert abs(tiny.quantiles()["score_p50"] - np.quantile(scores, 0.5)) < 0.15 * np.std(scores)
    assert tiny.quantiles()["score_max"] == pytest.approx(scores.max(), rel=1e-6)


def test_reservoir_is_uniform_over_positions(fitted):
    """Scores 0..n-1 in batches: each position is kept with probability k/n (late rows are not favoured)."""
    mon = _monitor(fitted, reservoir_size=100)
    kept = np.zeros(2000)
    for seed in range(40):
        mon._rng = np.random.default_rng(seed)
        mon._seen = 0
        for start in range(0, 2000, 250):
            mon._offer(np.arange(start, start + 250, dtype=np.float64))
        kept[mon.score_sample().astype(int)] += 1
    first, last = kept[:1000].sum(), kept[1000:].sum()
    assert kept.sum() == 40 * 100
    assert abs(first - last) < 0.15 * kept.sum()          # ~2,000 each when uniform; all late if broken


def test_top_rows_are_the_highest_flagged_scores_with_explanations(fitted):
    df = _shifted(seed=13)
    mon = _monitor(fitted, top_k=5)
    scored = _feed(fitted, df, [200, 300, 400], mon).to_pandas()
    top = mon.top_rows()
    flagged = scored[scored["is_anomaly"]].sort_values("anomaly_score", ascending=False)
    assert len(flagged) >= 5
    assert list(top["row_id"]) == list(flagged["row_id"][:5])
    assert list(top.columns[:2]) == ["input", "row_id"] and (top["input"] == "in.parquet").all()
    assert top["explanation"].str.startswith("[{").all() and top["top_features"].str.len().gt(0).all()
    roomy = _monitor(fitted, top_k=10_000)                  # fewer flagged rows than K: all, still sorted
    _feed(fitted, df, [200, 300, 400], roomy)
    assert list(roomy.top_rows()["row_id"]) == list(flagged["row_id"])


@pytest.mark.parametrize("gather", [monitor.GATHER_ROWS, 100])   # all counted at the end / some at once
@pytest.mark.parametrize("reservoir", [RESERVOIR_SIZE, 250])     # 250: full before the bad input
def test_discard_forgets_the_batches_of_a_failed_input(fitted, reservoir, gather, monkeypatch):
    monkeypatch.setattr(monitor, "GATHER_ROWS", gather)
    good, bad = mixed_frame(400, seed=14), _shifted(seed=15, n=400)
    clean = _monitor(fitted, reservoir_size=reservoir)
    _feed(fitted, good, [200, 200], clean, "good.parquet")
    mon = _monitor(fitted, reservoir_size=reservoir)
    _feed(fitted, good, [200, 200], mon, "good.parquet")
    _feed(fitted, bad, [150, 150], mon, "bad.parquet")               # failed before its last batch
    assert mon.rows == 700
    mon.discard("bad.parquet")
    assert mon.metrics() == clean.metrics()
    assert mon.top_rows().equals(clean.top_rows())
    assert mon.drift_table().equals(clean.drift_table()) and mon.quantiles() == clean.quantiles()
    # and the state goes on from there as if the bad input had never come
    _feed(fitted, good, [400], mon, "again.parquet")
    _feed(fitted, good, [400], clean, "again.parquet")
    assert mon.metrics() == clean.metrics() and mon.drift_table().equals(clean.drift_table())
    assert mon.quantiles() == clean.quantiles()


def test_no_rows_no_statistics(fitted):
    mon = _monitor(fitted)
    assert mon.metrics() == {"rows": 0.0, "flagged": 0.0, "flag_rate": 0.0}
    assert mon.drift_table().empty and mon.top_rows().empty and mon.quantiles() == {}


def test_bin_counts_match_searchsorted_bins():
    from anomaly_vae.monitor import _bin_counts

    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(size=5000), [0.0, 1.0, 1.0, -2.5]])   # ties at edges too
    for edges in (np.array([-2.5, -1.0, 0.0, 1.0, 2.0]), np.array([0.0]), np.array([])):
        want = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
        np.testing.assert_array_equal(_bin_counts(values, edges), want)
        assert _bin_counts(values[:0], edges).tolist() == [0] * (len(edges) + 1)


def test_many_small_inputs_gathered_give_the_statistics_of_one_by_one(fitted, monkeypatch):
    """Small inputs' batches are counted together (GATHER_ROWS rows at a time): the figures
    are those of counting each batch alone, and each top row keeps its own input."""
    df = _shifted(seed=16, n=600)
    table = pa.Table.from_pandas(df, preserve_index=False)
    parts = [(table.slice(i, 20).combine_chunks().to_batches()[0], f"part-{i // 20:02d}.parquet")
             for i in range(0, 600, 20)]
    for i in range(10, 15):                                 # inputs whose amount is float32: not one batch
        rb, src = parts[i]
        at = rb.schema.get_field_index("amount")
        parts[i] = (rb.set_column(at, "amount", rb.column(at).cast(pa.float32())), src)
    scored = [(rb, batch.score_batch(fitted, rb, ["row_id"]), src) for rb, src in parts]
    results = []
    for gather in (1, 70, monitor.GATHER_ROWS):             # 1: each batch counted at once, as before
        monkeypatch.setattr(monitor, "GATHER_ROWS", gather)
        mon = _monitor(fitted, top_k=8)
        for rb, out, src in scored:
            mon.update(rb, out, src)
        mon.discard("part-29.parquet")                      # the last input failed
        results.append((mon.metrics(), mon.top_rows(), mon.drift_table(), mon.score_sample()))
    for metrics, top, drift, sample in results[1:]:
        assert metrics == results[0][0]
        assert top.equals(results[0][1]) and drift.equals(results[0][2])
        np.testing.assert_array_equal(sample, results[0][3])
    metrics, top = results[0][0], results[0][1]
    assert metrics["rows"] == 580
    every = pa.Table.from_batches([out for _, out, _ in scored[:29]]).to_pandas()
    every["input"] = [src for _, out, src in scored[:29] for _ in range(out.num_rows)]
    want = every[every["is_anomaly"]].sort_values("anomaly_score", ascending=False, kind="stable")[:8]
    assert len(want) == 8
    assert list(top["row_id"]) == list(want["row_id"]) and list(top["input"]) == list(want["input"])
