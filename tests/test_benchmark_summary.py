"""The quality benchmark's summary: ranks, means and the best-baseline ceiling (no PyOD needed)."""
import pandas as pd
import pytest

from benchmarks.quality import best_baseline_ceiling, build_summary, worst_case_counts


def results() -> pd.DataFrame:
    rows = []
    # (dataset, seed): KNN, LOF, anomaly-vae AUROC / AUPRC
    table = {("a", 0): [(0.9, 0.5), (0.7, 0.6), (0.8, 0.4)],
             ("b", 0): [(0.6, 0.2), (0.8, 0.3), (0.95, 0.9)]}
    for (ds, seed), vals in table.items():
        for method, (auroc, auprc) in zip(["KNN", "LOF", "anomaly-vae"], vals):
            rows.append(dict(dataset=ds, seed=seed, method=method, auroc=auroc, auprc=auprc,
                             fit_s=1.0, score_s=0.1, n_train=10, n_test=10, status="ok"))
    return pd.DataFrame(rows)


def test_ceiling_takes_the_best_baseline_per_pair_and_ignores_our_method():
    ceiling = best_baseline_ceiling(results())
    assert ceiling["auroc"] == pytest.approx((0.9 + 0.8) / 2)   # not 0.95: anomaly-vae is no baseline
    assert ceiling["auprc"] == pytest.approx((0.6 + 0.3) / 2)   # picked separately from AUROC


def test_summary_reports_ranks_and_ceiling():
    text = build_summary(results(), groups={"a": "adbench", "b": "adbench"}, methods=None)
    assert "mean AUROC 0.850, mean AUPRC 0.450" in text
    row = next(line for line in text.splitlines() if line.startswith("| anomaly-vae"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # AUROC: 2nd on a, 1st on b -> 1.50; AUPRC: 3rd on a, 1st on b -> 2.00
    assert cells[1:5] == ["0.875", "0.650", "1.50", "2.00"]


def test_ceiling_is_absent_without_baselines():
    only_ours = results().query("method == 'anomaly-vae'")
    assert best_baseline_ceiling(only_ours) is None
    assert "oracle" not in build_summary(only_ours, groups={}, methods=None)


def test_worst_case_counts_datasets_more_than_the_gap_below_the_best_method():
    rows = []
    # per dataset, two seeds each; the gap is taken on the mean over seeds
    table = {"a": {"KNN": (0.90, 0.90), "LOF": (0.80, 0.88), "anomaly-vae": (0.86, 0.86)},
             "b": {"KNN": (0.60, 0.60), "LOF": (0.70, 0.70), "anomaly-vae": (0.66, 0.64)}}
    for ds, by_method in table.items():
        for method, aurocs in by_method.items():
            for seed, auroc in enumerate(aurocs):
                rows.append(dict(dataset=ds, seed=seed, method=method, auroc=auroc, auprc=0.5,
                                 fit_s=1.0, score_s=0.1, n_train=10, n_test=10, status="ok"))
    counts = worst_case_counts(pd.DataFrame(rows))
    # a: best KNN 0.90; LOF 0.84 is 0.06 behind, ours 0.86 only 0.04.  b: best LOF 0.70; KNN 0.10
    # behind, ours 0.65 exactly 0.05 behind (not more than 0.05, so not counted)
    assert counts.to_dict() == {"KNN": 1, "LOF": 1, "anomaly-vae": 0}
    text = build_summary(pd.DataFrame(rows), groups={}, methods=None)
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")][1:6] == [
        "mean_auroc", "mean_auprc", "rank_auroc", "rank_auprc", "worst_case"]
    row = next(line for line in text.splitlines() if line.startswith("| KNN"))
    assert row.strip("|").split("|")[5].strip() == "1"
