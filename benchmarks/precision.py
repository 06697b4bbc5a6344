#!/usr/bin/env python
"""Does bfloat16 scoring keep quality? float32 vs bfloat16 (``precision=``) on the same fitted models.

Two checks, the gates of issue 13 for a reduced-precision default:
  1. AUROC on the quality benchmark's one-class protocol (`quality.py`: half the normal rows
     train, the rest plus all anomalies test; ``../shared/datasets/adbench``): each dataset and
     seed is fitted once (defaults) and its test rows scored in both precisions. Gate: mean
     and per-dataset AUROC within 0.002.
  2. Demo rows (`anomaly_vae.demo.make_transactions`, trained on the first 70% by time, all
     rows scored): the share of rows whose `is_anomaly` is the same in both precisions, with
     the float32-calibrated threshold. Gate: >= 99.9%.

    .venv/bin/python benchmarks/precision.py                       # all adbench datasets, seed 0
    .venv/bin/python benchmarks/precision.py --datasets cardio thyroid --seeds 0 1

Writes benchmarks/results/precision.json and prints a table. Skips (exit 0, a message) when
the datasets folder is absent.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from quality import (DEFAULT_DATA_DIR, discover_datasets, drop_constant_columns,  # noqa: E402
                     load_dataset, one_class_split)

DEFAULT_RESULTS = HERE / "results" / "precision.json"


def _scores(det, X, precision: str) -> np.ndarray:
    det.set_params(precision=precision)
    try:
        return det.anomaly_score(X)
    finally:
        det.set_params(precision="float32")


def auroc_check(data_dir: Path, names: list[str] | None, seeds: list[int]) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    from anomaly_vae import VAEAnomalyDetector

    rows = []
    found = discover_datasets(data_dir, include_mixed=False)
    for name in names or sorted(found):
        info = found[name]
        X, y = load_dataset(info["path"], info["group"], name)
        for seed in seeds:
            tr, te = one_class_split(y, seed)
            x_train, x_test = drop_constant_columns(X.iloc[tr], X.iloc[te])
            t0 = time.perf_counter()
            det = VAEAnomalyDetector(random_state=seed, n_threads=1).fit(x_train)
            fit_s = time.perf_counter() - t0
            s32, s16 = _scores(det, x_test, "float32"), _scores(det, x_test, "bfloat16")
            a32, a16 = roc_auc_score(y[te], s32), roc_auc_score(y[te], s16)
            rows.append({"dataset": name, "seed": seed, "auroc_float32": a32, "auroc_bfloat16": a16,
                         "diff": a16 - a32, "max_abs_score_diff": float(np.max(np.abs(s16 - s32))),
                         "fit_s": fit_s})
            print(f"  {name:<16} seed {seed}: AUROC {a32:.4f} (float32) {a16:.4f} (bfloat16) "
                  f"diff {a16 - a32:+.4f}", flush=True)
    return rows


def demo_check(n_rows: int) -> dict:
    from anomaly_vae import VAEAnomalyDetector
    from anomaly_vae.demo import DEMO_EXCLUDE, make_transactions

    df = make_transactions(n_rows, seed=0)
    cut = df["timestamp"].quantile(0.7)
    det = VAEAnomalyDetector(label="label", exclude=DEMO_EXCLUDE, random_state=0, n_threads=1)
    det.fit(df[df["timestamp"] <= cut])
    X = df.drop(columns=["label"])
    s32, s16 = _scores(det, X, "float32"), _scores(det, X, "bfloat16")
    f32, f16 = s32 > det.threshold_, s16 > det.threshold_
    return {"rows": len(df), "threshold": det.threshold_, "flagged_float32": int(f32.sum()),
            "flagged_bfloat16": int(f16.sum()), "is_anomaly_agreement": float(np.mean(f32 == f16)),
            "max_abs_score_diff": float(np.max(np.abs(s16 - s32))),
            "median_abs_score_diff": float(np.median(np.abs(s16 - s32)))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--datasets", nargs="+", default=None, help="adbench names (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--demo-rows", type=int, default=100_000)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    if not (args.data_dir / "adbench").is_dir():
        print(f"{args.data_dir / 'adbench'} not found: nothing to benchmark")
        return 0
    import torch

    torch.set_num_threads(1)
    print("demo rows ...", flush=True)
    demo = demo_check(args.demo_rows)
    print(f"  is_anomaly agreement {demo['is_anomaly_agreement']:.5f} "
          f"({demo['flagged_float32']} vs {demo['flagged_bfloat16']} flagged of {demo['rows']:,})", flush=True)
    print("AUROC ...", flush=True)
    rows = auroc_check(args.data_dir, args.datasets, args.seeds)
    diffs = np.array([r["diff"] for r in rows])
    summary = {"mean_auroc_float32": float(np.mean([r["auroc_float32"] for r in rows])),
               "mean_auroc_bfloat16": float(np.mean([r["auroc_bfloat16"] for r in rows])),
               "mean_diff": float(diffs.mean()), "max_abs_diff": float(np.abs(diffs).max()),
               "auroc_gate_0.002": bool(np.abs(diffs).max() <= 0.002),
               "demo_gate_99.9%": bool(demo["is_anomaly_agreement"] >= 0.999)}
    out = {"demo": demo, "auroc": rows, "summary": summary, "cpu_capability":
           torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
