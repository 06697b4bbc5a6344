"""Quick sweep of anomaly-vae settings on the one-class protocol (in-process, no baselines).

Used to choose the defaults: prints one JSON line per configuration with the mean AUROC/AUPRC
over datasets and seeds and the per-dataset AUROC, and appends it to --out.

    .venv/bin/python benchmarks/sweep.py '{"lat8": {"latent_dim": 8}, "b05": {"beta": 0.5}}' \\
        --seeds 0 1 --skip http shuttle
A configuration may set "_ensemble": k to average the scores of k seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402

from benchmarks.quality import drop_constant_columns, load_dataset, one_class_split  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", help='JSON object {"name": {VAEAnomalyDetector kwargs}}')
    ap.add_argument("--data-dir", type=Path,
                    default=Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "adbench")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep.jsonl")
    args = ap.parse_args()
    if not args.data_dir.is_dir():
        sys.exit(f"datasets not found at {args.data_dir}")
    from anomaly_vae import VAEAnomalyDetector

    names = [p.stem for p in sorted(args.data_dir.glob("*.parquet"), key=lambda p: p.stem.lower())
             if p.stem not in set(args.skip)]
    data = {n: load_dataset(str(args.data_dir / f"{n}.parquet"), "adbench", n) for n in names}
    for cname, params in json.loads(args.configs).items():
        t0, res = time.time(), {}
        for seed in args.seeds:
            for name in names:
                X, y = data[name]
                tr, te = one_class_split(y, seed)
                a, b = drop_constant_columns(X.iloc[tr].reset_index(drop=True), X.iloc[te].reset_index(drop=True))
                p = dict(params)
                k = p.pop("_ensemble", 1)
                s = np.mean([VAEAnomalyDetector(random_state=seed * 100 + i, **p).fit(a).anomaly_score(b)
                             for i in range(k)], axis=0)
                res[(name, seed)] = (roc_auc_score(y[te], s), average_precision_score(y[te], s))
        by_ds = {n: float(np.mean([res[(n, s)][0] for s in args.seeds])) for n in names}
        line = {"config": cname, "params": params, "seeds": args.seeds,
                "mean_auroc": round(float(np.mean(list(by_ds.values()))), 4),
                "mean_auprc": round(float(np.mean([v[1] for v in res.values()])), 4),
                "secs": round(time.time() - t0), **{k: round(v, 3) for k, v in by_ds.items()}}
        print(json.dumps(line), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
