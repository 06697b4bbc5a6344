#!/usr/bin/env python
"""Training at scale: `anomaly-vae train` on a 1M-row wide table, wall time and peak RSS to
early stop, for several --max-rows values, and what the extra rows buy on held-out data.

Steps:
  1. the wide table (anomaly_vae.demo.make_wide_transactions, chunks of 200k rows, seeds 0..)
     in <workdir>/wide_<rows>.parquet (reused when present; benchmarks/spark_throughput.py
     writes the same file), and a held-out table of 100,000 rows drawn with seed 99;
  2. for each --max-rows: `/usr/bin/time -v anomaly-vae -q train <file> --id-col transaction_id
     --no-mlflow --max-rows N` in a fresh process (wall clock; CPU time = user + system and
     peak RSS from time -v; training runs one torch thread for this network size, so on an idle
     machine the wall time is about the CPU time);
  3. each model scores the held-out rows: mean anomaly score in nats (lower = the density model
     fits unseen normal rows better) and the false-alarm rate at the calibrated threshold
     (target 1%);
  4. print a table and write benchmarks/results/train_scale.json.

    nice .venv/bin/python benchmarks/train_scale.py --workdir /tmp/scale-bench --max-rows 200000 1000000

The machine is shared; the load average at start and end is recorded with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "train_scale.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _time_v(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)[1])
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", r.stderr)[1]) for k in ("User", "System"))
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(rss_kb / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=float, default=1e6)
    ap.add_argument("--max-rows", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = ap.parse_args()
    import numpy as np

    from anomaly_vae import VAEAnomalyDetector
    from anomaly_vae.demo import make_wide_transactions
    from spark_throughput import make_data

    rows = int(args.rows)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="anomaly-vae-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"wide_{rows}.parquet"
    if not data.exists():
        make_data(data, rows)
    holdout = make_wide_transactions(100_000, seed=99)
    load_start = [round(x, 2) for x in os.getloadavg()]
    exe = str(Path(sys.executable).with_name("anomaly-vae"))
    runs = []
    for n in args.max_rows:
        model = work / f"model-{n}"
        m = _time_v([exe, "-q", "train", str(data), "--id-col", "transaction_id", "--no-mlflow",
                     "--max-rows", str(n), "-o", str(model)])
        det = VAEAnomalyDetector.load(model)
        s = det.anomaly_score(holdout)
        h, c = det.config_, det.history_
        runs.append({"max_rows": n, "rows_read": rows, **m, "fit_s": round(det.fit_seconds_, 1),
                     "epochs": len(det.history_.loss), "max_epochs": h.max_epochs, "batch_size": h.batch_size,
                     "stopped_early": bool(c.stopped_early), "best_epoch": c.best_epoch + 1,
                     "steps": int(len(c.loss) * -(-int(min(n, rows) * 0.75) // h.batch_size)),
                     "holdout_mean_score": round(float(np.mean(s)), 3),
                     "holdout_false_alarm_rate": round(float(np.mean(s > det.threshold_)), 4)})
        print(json.dumps(runs[-1]), flush=True)
    result = {"rows": rows, "columns": 20, "runs": runs, "cpus": os.cpu_count(),
              "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    print(f"{'--max-rows':>10s} {'wall s':>7s} {'CPU s':>6s} {'RSS MB':>7s} {'fit s':>6s} {'epochs':>6s} "
          f"{'held-out nats':>13s} {'FPR':>6s}")
    for r in runs:
        print(f"{r['max_rows']:>10,} {r['wall_s']:7.1f} {r['cpu_s']:6.1f} {r['peak_rss_mb']:7d} {r['fit_s']:6.1f} "
              f"{r['epochs']:6d} {r['holdout_mean_score']:13.3f} {r['holdout_false_alarm_rate']:6.4f}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
