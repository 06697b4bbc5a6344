#!/usr/bin/env python
"""Spark scale-out throughput: rows/s of `anomaly_vae.spark.score_dataset` on local[N], next to
the single-process `anomaly-vae score` on the same file and model.

Steps:
  1. generate the wide table (anomaly_vae.demo.make_wide_transactions, chunks of 200k rows with
     seeds 0, 1, ...) into <workdir>/wide_<rows>.parquet, row groups of 131,072 rows (so Spark
     has several input splits), microsecond timestamps (Spark does not read nanoseconds);
  2. train a model on the first --train-rows rows (default 100,000; --epochs, default 5: the
     rate does not depend on how well the model is trained), saved to <workdir>/model;
  3. fresh process: `anomaly-vae -q score` of the file (ids pass-through), wall time;
  4. fresh process: a SparkSession on local[N] (127.0.0.1), `score_dataset` of the same file
     into parquet, --jobs times in the same session (default 3); wall time of each job
     (session start-up reported apart). The first job pays for the Python workers' start
     (torch import, model load) and the JVM's warm-up; the later ones show the steady rate
     a long job or a cluster would see per core;
  5. print a table and write benchmarks/results/spark_throughput.json.

    .venv/bin/python benchmarks/spark_throughput.py                  # 1M rows, local[2]
    nice .venv/bin/python benchmarks/spark_throughput.py --rows 1e6 --master 'local[2]'
    .venv/bin/python benchmarks/spark_throughput.py --conf spark.executorEnv.ARROW_DEFAULT_MEMORY_POOL=system

The machine is shared; the load average at start and end is recorded with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "spark_throughput.json"
CHUNK_ROWS = 200_000

SPARK_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master(sys.argv[1]).appName("anomaly-vae bench")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
         .config("spark.ui.enabled", "false").config("spark.driver.memory", "2g")
         .config("spark.sql.execution.arrow.maxRecordsPerBatch", sys.argv[5]))
for key, value in json.loads(sys.argv[8]).items():   # --conf
    spark = spark.config(key, value)
spark = spark.getOrCreate()
spark.sparkContext.setLogLevel("ERROR")
t1 = time.perf_counter()
from anomaly_vae.spark import score_dataset
jobs = []
for i in range(int(sys.argv[6])):          # the same job again: Python workers and JVM warm
    a = time.perf_counter()
    res = score_dataset(spark, sys.argv[2], sys.argv[3], sys.argv[4], mode="overwrite")
    jobs.append(time.perf_counter() - a)
    assert res["rows"] == int(sys.argv[7]), res
t2 = time.perf_counter()
spark.stop()
print(json.dumps({"startup_s": t1 - t0, "job_s": jobs, "process_s": t2 - t0}))
"""


def make_data(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anomaly_vae.demo import make_wide_transactions

    tmp = path.with_suffix(".tmp")
    writer = None
    for seed, start in enumerate(range(0, rows, CHUNK_ROWS)):
        df = make_wide_transactions(min(CHUNK_ROWS, rows - start), seed=seed)
        table = pa.Table.from_pandas(df, preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema, coerce_timestamps="us",
                                      allow_truncated_timestamps=True)
        writer.write_table(table, row_group_size=131_072)
    writer.close()
    tmp.rename(path)


def train(data: Path, model: Path, train_rows: int, epochs: int) -> float:
    import pyarrow.parquet as pq

    from anomaly_vae import VAEAnomalyDetector

    pf = pq.ParquetFile(data)
    groups = -(-train_rows // pf.metadata.row_group(0).num_rows)
    df = pf.read_row_groups(list(range(min(groups, pf.num_row_groups)))).to_pandas()
    t0 = time.perf_counter()
    det = VAEAnomalyDetector(max_epochs=epochs, random_state=0).fit(df.head(train_rows))
    det.save(model)
    return time.perf_counter() - t0


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=float, default=1e6)
    ap.add_argument("--train-rows", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--arrow-batch", type=int, default=10_000,
                    help="spark.sql.execution.arrow.maxRecordsPerBatch (Spark's default: 10,000)")
    ap.add_argument("--jobs", type=int, default=3,
                    help="run the Spark job this many times in one session: the first pays the "
                         "Python workers' start (torch import, model load) and the JVM's warm-up")
    ap.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Spark setting (repeatable), e.g. "
                         "spark.executorEnv.ARROW_DEFAULT_MEMORY_POOL=system")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = ap.parse_args()
    if any("=" not in c for c in args.conf):
        ap.error("--conf takes KEY=VALUE")
    conf = dict(c.split("=", 1) for c in args.conf)
    rows = int(args.rows)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="anomaly-vae-spark-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = _loadavg()
    data = work / f"wide_{rows}.parquet"
    if not data.exists():
        make_data(data, rows)
    model = work / "model"
    fit_s = None
    if not (model / "manifest.json").exists():
        fit_s = train(data, model, args.train_rows, args.epochs)
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    exe = Path(sys.executable).with_name("anomaly-vae")

    out_cli = work / "scored-cli"
    shutil.rmtree(out_cli, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([str(exe), "-q", "score", "-m", str(model), str(data), "-o", str(out_cli)],
                   check=True, env=env)
    cli_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", SPARK_CHILD, args.master, str(model), str(data),
                          str(work / "scored-spark"), str(args.arrow_batch), str(args.jobs), str(rows),
                          json.dumps(conf)],
                         check=True, env=env, capture_output=True, text=True)
    spark_wall = time.perf_counter() - t0
    spark = json.loads(out.stdout.strip().splitlines()[-1])
    first, warm = spark["job_s"][0], spark["job_s"][1:]
    warm_s = statistics.median(warm) if warm else None
    first_process = spark["startup_s"] + first           # JVM + session start and one job

    result = {
        "rows": rows, "columns": 20, "master": args.master, "arrow_batch": args.arrow_batch, "conf": conf,
        "train_rows": args.train_rows, "epochs": args.epochs, "fit_seconds": fit_s,
        "cli_seconds": round(cli_s, 2), "cli_rows_per_s": round(rows / cli_s),
        "spark_job_seconds": round(first, 2), "spark_rows_per_s": round(rows / first),
        "spark_warm_job_seconds": round(warm_s, 2) if warm else None,
        "spark_warm_rows_per_s": round(rows / warm_s) if warm else None,
        "spark_job_seconds_all": [round(x, 2) for x in spark["job_s"]],
        "spark_startup_seconds": round(spark["startup_s"], 2),
        "spark_process_seconds": round(first_process, 2),
        "spark_rows_per_s_incl_startup": round(rows / first_process),
        "spark_child_wall_seconds": round(spark_wall, 2),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "loadavg_start": load_start, "loadavg_end": _loadavg(),
    }
    print(f"{'measurement':46s} {'seconds':>9s} {'rows/s':>10s}")
    print(f"{'anomaly-vae score (1 process, fresh)':46s} {cli_s:9.1f} {rows / cli_s:10,.0f}")
    print(f"{'Spark ' + args.master + ' first job (score_dataset)':46s} {first:9.1f} {rows / first:10,.0f}")
    if warm:
        print(f"{'Spark same job again, warm (median of ' + str(len(warm)) + ')':46s} {warm_s:9.1f} {rows / warm_s:10,.0f}")
    print(f"{'Spark JVM/session start + first job':46s} {first_process:9.1f} {rows / first_process:10,.0f}")
    print(f"load average start {load_start}, end {result['loadavg_end']}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep_files and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
