#!/usr/bin/env python
"""Batch-scoring throughput: rows/s and peak RSS of `anomaly_vae.batch.score_file`, vs. the I/O floor.

Steps (for each --rows value, default 1,000,000):
  1. generate demo transactions (anomaly_vae.demo.make_transactions, in chunks of 200k rows
     with seeds 0, 1, ...) into <workdir>/transactions_<rows>.parquet (reused when present);
  2. train a small model once on the first --train-rows rows (default 50,000; label column
     given, DEMO_EXCLUDE excluded), saved to <workdir>/model;
  3. in a fresh child process: load the model and score the file with batch.score_file
     (ids pass-through, --batch-size rows per batch); wall time, rows/s, peak RSS;
  4. in a fresh child process: the I/O floor, a plain pyarrow read + write of the same file
     in batches of the same size (every column read, every column written, snappy);
  5. print a table and write benchmarks/results/throughput.json.

Each measurement runs in its own process so that peak RSS (VmHWM, plus VmRSS sampled every
20 ms in a thread) belongs to that step alone. The machine is shared: the
load average at start and end is recorded with the results.

    .venv/bin/python benchmarks/throughput.py                    # 1M rows
    .venv/bin/python benchmarks/throughput.py --rows 1e6 1e7     # 1M and 10M rows
    .venv/bin/python benchmarks/throughput.py --workdir /data/tmp --keep-files
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "throughput.json"
CHUNK_ROWS = 200_000


# ------------------------------------------------------------------ memory
def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


class RssSampler:
    """Samples RSS in a background thread; `peak` is the largest value seen (MiB)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak, self._stop = interval, _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _hwm_mb() -> float:
    """Peak RSS of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ child steps
def child_score(model: str, src: str, dst: str, batch_size: int, threads: int | None) -> dict:
    import torch

    from anomaly_vae import VAEAnomalyDetector, batch

    torch.set_num_threads(threads or 1)       # the CLI's scoring default (anomaly_vae.cli.SCORING_THREADS)
    det = VAEAnomalyDetector.load(model)
    base = _rss_mb()
    t0 = time.perf_counter()
    with RssSampler() as s:
        stats = batch.score_file(det, src, dst, batch_size=batch_size)
    sec = time.perf_counter() - t0
    return {"rows": stats["rows_out"], "flagged": stats["flagged"], "seconds": sec,
            "rows_per_s": stats["rows_out"] / sec, "baseline_rss_mb": base,
            "peak_rss_mb": max(s.peak, _hwm_mb()), "torch_threads": torch.get_num_threads(),
            "output_mb": os.path.getsize(dst) / 2**20}


def child_floor(src: str, dst: str, batch_size: int) -> dict:
    import pyarrow.parquet as pq

    base = _rss_mb()
    rows = 0
    t0 = time.perf_counter()
    with RssSampler() as s:
        pf = pq.ParquetFile(src)
        with pq.ParquetWriter(dst, pf.schema_arrow, compression="snappy") as w:
            for batch in pf.iter_batches(batch_size=batch_size):
                w.write_batch(batch)
                rows += batch.num_rows
    sec = time.perf_counter() - t0
    return {"rows": rows, "seconds": sec, "rows_per_s": rows / sec, "baseline_rss_mb": base,
            "peak_rss_mb": max(s.peak, _hwm_mb()), "output_mb": os.path.getsize(dst) / 2**20}


def _run_child(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args[:1])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ parent steps
def generate(path: Path, rows: int) -> float:
    """Write `rows` demo transactions to `path` chunk by chunk; returns seconds (0 if reused)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anomaly_vae.demo import make_transactions

    if path.is_file() and pq.read_metadata(path).num_rows == rows:
        return 0.0
    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".partial")
    writer = None
    try:
        done, seed = 0, 0
        while done < rows:
            n = min(CHUNK_ROWS, rows - done)
            table = pa.Table.from_pandas(make_transactions(max(n, 1000), seed=seed).head(n),
                                         preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="snappy")
            writer.write_table(table.cast(writer.schema))
            done, seed = done + n, seed + 1
            print(f"  generated {done:,}/{rows:,} rows", end="\r", flush=True)
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    print()
    return time.perf_counter() - t0


def train(src: Path, model_dir: Path, train_rows: int, epochs: int | None, threads: int | None) -> dict:
    import pyarrow as pa

    from anomaly_vae import VAEAnomalyDetector, io
    from anomaly_vae.demo import DEMO_EXCLUDE

    batches, n = [], 0
    for b in io.iter_batches(src, batch_size=min(train_rows, 65536)):
        batches.append(b)
        n += b.num_rows
        if n >= train_rows:
            break
    df = pa.Table.from_batches(batches).slice(0, train_rows).to_pandas()
    det = VAEAnomalyDetector(label="label", exclude=DEMO_EXCLUDE, max_epochs=epochs, random_state=0,
                             n_threads=threads).fit(df)
    det.save(model_dir)
    return {"train_rows": len(df), "epochs": len(det.history_.loss), "fit_seconds": det.fit_seconds_,
            "n_features": int(det.n_features_in_), "latent_dim": int(det.config_.latent_dim),
            "hidden": list(det.config_.hidden)}


def machine() -> dict:
    import pyarrow
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "pyarrow": pyarrow.__version__,
            "load_avg_start": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["1e6"], help="row counts to benchmark, e.g. 1e6 1e7")
    p.add_argument("--train-rows", type=int, default=50_000)
    p.add_argument("--epochs", type=int, default=10, help="max training epochs (0 = automatic)")
    p.add_argument("--batch-size", type=int, default=65536)
    p.add_argument("--threads", type=int, default=None, help="torch threads for training and scoring (default: 1 for scoring, as the CLI; the detector's rule for training)")
    p.add_argument("--workdir", type=Path, default=None, help="where data/model/outputs go (default: a temp dir)")
    p.add_argument("--keep-files", action="store_true", help="keep the workdir (always kept if --workdir)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)

    rows_list = [int(float(r)) for r in args.rows]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="anomaly-vae-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"workdir {work}; {info['cpu_count']} cpus, load {info['load_avg_start']}")
    try:
        first = work / f"transactions_{rows_list[0]}.parquet"
        gen_s = generate(first, rows_list[0])
        print(f"data: {first} ({os.path.getsize(first) / 2**20:.1f} MiB, generated in {gen_s:.0f} s)")
        model_dir = work / "model"
        t = train(first, model_dir, args.train_rows, args.epochs or None, args.threads)
        print(f"model: {t['train_rows']:,} rows, {t['epochs']} epochs in {t['fit_seconds']:.1f} s, "
              f"{t['n_features']} features, latent {t['latent_dim']}, hidden {t['hidden']}")
        runs = []
        for rows in rows_list:
            src = work / f"transactions_{rows}.parquet"
            generate(src, rows)
            common = ["--src", str(src), "--batch-size", str(args.batch_size)]
            score = _run_child(["_score", "--model", str(model_dir), "--dst", str(work / "scored.parquet"),
                                *common] + (["--threads", str(args.threads)] if args.threads else []))
            floor = _run_child(["_floor", "--dst", str(work / "copy.parquet"), *common])
            runs.append({"rows": rows, "input_mb": os.path.getsize(src) / 2**20, "score": score,
                         "io_floor": floor, "score_over_floor_time": score["seconds"] / floor["seconds"]})
            print(f"  {rows:,} rows: score {score['rows_per_s']:,.0f} rows/s, floor {floor['rows_per_s']:,.0f} rows/s")
        info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        result = {"machine": info, "batch_size": args.batch_size, "model": t, "runs": runs,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=1))
        _table(runs)
        print(f"results: {args.results}")
    finally:
        if args.workdir is None and not args.keep_files:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _table(runs: list[dict]) -> None:
    """Peak RSS is shown as total (growth over the process's RSS just before the step)."""
    head = (f"{'rows':>12} {'input MiB':>9} | {'score s':>8} {'rows/s':>10} {'peak RSS MiB':>14} | "
            f"{'floor s':>7} {'rows/s':>11} {'peak RSS MiB':>14} | {'score/floor':>11}")
    print(head)
    print("-" * len(head))
    for r in runs:
        s, f = r["score"], r["io_floor"]
        srss = f"{s['peak_rss_mb']:.0f} (+{s['peak_rss_mb'] - s['baseline_rss_mb']:.0f})"
        frss = f"{f['peak_rss_mb']:.0f} (+{f['peak_rss_mb'] - f['baseline_rss_mb']:.0f})"
        print(f"{r['rows']:>12,} {r['input_mb']:>9.1f} | {s['seconds']:>8.1f} {s['rows_per_s']:>10,.0f} "
              f"{srss:>14} | {f['seconds']:>7.1f} {f['rows_per_s']:>11,.0f} "
              f"{frss:>14} | {r['score_over_floor_time']:>10.1f}x")


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("step", choices=["_score", "_floor"])
    p.add_argument("--model")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    out = (child_score(a.model, a.src, a.dst, a.batch_size, a.threads) if a.step == "_score"
           else child_floor(a.src, a.dst, a.batch_size))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        sys.exit(_child_main(sys.argv[1:]))
    sys.exit(main())
