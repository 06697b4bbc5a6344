#!/usr/bin/env python
"""Batch-scoring throughput: `anomaly-vae score` end to end vs the I/O floor, per table.

Tables (``--tables``): ``demo`` (`anomaly_vae.demo.make_transactions`, 10 features) and
``wide`` (`anomaly_vae.demo.make_wide_transactions`, ``--width`` columns, default 20: id,
timestamp, 10 numeric, 6 categoricals, 2 booleans). For each table, in one run:

  1. generate the table for each ``--rows`` value (chunks of 1M rows, seeds 0, 1, ...;
     1M-row row groups), reused from ``--workdir`` when present;
  2. train one model with the defaults on the first ``--train-rows`` rows (default 100,000);
  3. per row count, each measurement in a fresh child process (wall time, CPU time and peak
     RSS from the child's own rusage, as /usr/bin/time -v reports them):
       floor      plain pyarrow stream read + write of the same file (every column, snappy,
                  row group by row group), the I/O floor;
       cli        ``anomaly-vae -q score -m MODEL FILE -o DIR`` as users run it (imports,
                  model load, read, score, explanations, atomic write, the MLflow run);
     each ``score`` measurement up to 2M rows is run ``--repeat`` times (default 3) and the
     median is reported (every time is kept in the JSON, ``seconds_all``); 10M rows once;
     and for the first row count only:
       cli_1thread   the same with ``--threads 1`` (default: a scoring worker per CPU);
       cli_no_mlflow the same with ``--no-mlflow`` (the cost of the scoring run's tracking);
       cli_files  the same rows cut into ``--split-files`` files (default 1,000), scored as
                  one directory (what a stream's sink leaves: the cost per file);
       cli_float32 / cli_bfloat16  the same with the precision ``auto`` did not pick (``auto``
                  is bfloat16 where that is faster, `model.cpu_bf16_is_faster`; see
                  benchmarks/precision.py for its quality);
       in_memory  ``det.anomaly_score(table)`` on the whole table already in RAM (Arrow);
       stages     the same pipeline run sequentially with a timer per stage: read, encode,
                  network, NLL/KL, explanation, write;
       pyod       PyOD's VAE ``decision_function`` on the one-hot encoding in RAM (the
                  reference; quality.py's encoding, fitted on the training rows).
  4. print a table (rows/s, ratio to the floor, peak RSS) and write
     benchmarks/results/throughput.json and throughput.csv.

The machine is shared: run it with ``nice``; the load average at start and end is recorded,
and ratios measured in the same run are the figures to compare.

    .venv/bin/python benchmarks/throughput.py                           # demo + wide, 1M rows
    nice .venv/bin/python benchmarks/throughput.py --rows 1e6 1e7 --workdir /tmp/tp
    .venv/bin/python benchmarks/throughput.py --tables wide --width 40 --no-pyod
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CHUNK_ROWS = 1_000_000
ENTRY_POINT = Path(sys.executable).with_name("anomaly-vae")


# ------------------------------------------------------------------ child steps
def child_floor(src: str, dst: str, batch_size: int) -> dict:
    import pyarrow.parquet as pq

    rows = 0
    pf = pq.ParquetFile(src, pre_buffer=False)
    with pq.ParquetWriter(dst, pf.schema_arrow, compression="snappy") as w:
        for rg in range(pf.metadata.num_row_groups):
            for batch in pf.iter_batches(batch_size=batch_size, row_groups=[rg]):
                w.write_batch(batch)
                rows += batch.num_rows
    return {"rows": rows}


def child_in_memory(model: str, src: str) -> dict:
    import pyarrow.parquet as pq
    import torch

    from anomaly_vae import VAEAnomalyDetector

    torch.set_num_threads(1)
    det = VAEAnomalyDetector.load(model)
    table = pq.read_table(src, columns=[c.name for c in det.schema_.features])
    t0 = time.perf_counter()
    scores = det.anomaly_score(table)
    return {"rows": len(scores), "seconds_in_ram": time.perf_counter() - t0}


def child_stages(model: str, src: str, dst: str, batch_size: str, precision: str = "float32") -> dict:
    """The scoring pipeline of `batch.score_file`, one stage after the other on one thread,
    each timed, with the library's own functions. The network is timed by a forward-only pass
    over the same rows (`VAE._forward_t`); NLL/KL is the fused pass (`_terms_from_X`) minus it."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from anomaly_vae import VAEAnomalyDetector
    from anomaly_vae.batch import ENCODE_ROWS, _encode_batch, _output_batch, merge_terms, output_schema
    from anomaly_vae.io import iter_batches
    from anomaly_vae.model import scoring_dtype

    torch.set_num_threads(1)
    t = {k: 0.0 for k in ("import_load", "read", "encode", "network", "nll_kl", "explanation", "write")}
    t0 = time.perf_counter()
    det = VAEAnomalyDetector.load(model).set_params(precision=precision)
    t["import_load"] = time.perf_counter() - t0    # imports happened at the top: see cli row
    features = [c.name for c in det.schema_.features]
    ids = [c for c in det.schema_.ids if c in pq.read_schema(src).names]
    vae, dtype = det.vae_.eval(), scoring_dtype(precision, torch.device("cpu"))
    block = vae.score_block(dtype)
    schema = output_schema(pq.read_schema(src), ids)
    writer = pq.ParquetWriter(dst, schema, compression="snappy")
    rows = 0
    batches = iter_batches(src, int(batch_size), columns=ids + features)
    clock = time.perf_counter
    while True:
        a = clock()
        batch = next(batches, None)
        t["read"] += clock() - a
        if batch is None:
            break
        terms, kept, at = [], [], []
        for off in range(0, batch.num_rows, ENCODE_ROWS):
            a = clock()
            enc = _encode_batch(det, batch.slice(off, ENCODE_ROWS))
            b = clock()
            with torch.inference_mode():
                for i in range(0, len(enc), block):            # the blocks column_terms uses
                    vae._forward_t(torch.from_numpy(enc.head[i:i + block]),
                                   torch.from_numpy(enc.codes[i:i + block]), None, dtype)
            c = clock()
            part = det._terms_from_X(enc, attribute=False)
            d = clock()
            part = det._attribute_kl(part, enc)
            flagged = np.flatnonzero(part.anomaly_score > det.threshold_)
            kept.append(enc.dense(flagged))
            at.append(flagged + off)
            terms.append(part)
            t["encode"] += b - a
            t["network"] += c - b
            t["nll_kl"] += (d - c) - (c - b)
            t["explanation"] += clock() - d
        a = clock()
        table = det.score_columns(merge_terms(terms), values=batch, X=np.concatenate(kept), X_rows=np.concatenate(at))
        out = _output_batch(batch, table, ids, schema)
        b = clock()
        t["explanation"] += b - a
        writer.write_batch(out)
        t["write"] += clock() - b
        rows += batch.num_rows
    writer.close()
    return {"rows": rows, "precision": precision, "stage_seconds": t}


def child_pyod(train_src: str, src: str, train_rows: int, features: list[str]) -> dict:
    import pyarrow.parquet as pq

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from quality import encode_for_baselines
    from pyod.models.vae import VAE

    train = pq.read_table(train_src, columns=features).slice(0, train_rows).to_pandas()
    test = pq.read_table(src, columns=features).to_pandas()
    for df in (train, test):                      # PyOD takes numbers: timestamps as epoch seconds
        for c in df.columns:
            if str(df[c].dtype).startswith("datetime"):
                df[c] = df[c].astype("int64") / 1e9
    t0 = time.perf_counter()
    x_train, x_test = encode_for_baselines(train, test)
    enc = time.perf_counter() - t0
    det = VAE(random_state=0, verbose=0, epoch_num=2).fit(x_train[:20_000])
    t1 = time.perf_counter()
    det.decision_function(x_test)
    return {"rows": len(test), "seconds_in_ram": time.perf_counter() - t1, "encode_seconds": enc,
            "dims": int(x_test.shape[1])}


# ------------------------------------------------------------------ running children
def _run(cmd: list[str], env: dict | None = None) -> dict:
    """Run a child under /usr/bin/time (wall, CPU and peak RSS of that process alone, as
    `time -v` reports them); without /usr/bin/time, from wait4 (peak RSS then includes the RSS
    this parent had when it forked)."""
    timed = Path("/usr/bin/time").exists()
    with tempfile.TemporaryDirectory() as d:
        rec = Path(d) / "time.txt"
        full = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(rec), *cmd] if timed else cmd
        with open(Path(d) / "out", "w+") as out, open(Path(d) / "err", "w+") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(full, stdout=out, stderr=err, text=True,
                                    env=None if env is None else {**os.environ, **env})
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{stderr[-3000:]}")
        if timed:
            e, u, s_, m = rec.read_text().split()[-4:]
            return {"stdout": stdout, "seconds": float(e), "cpu_seconds": float(u) + float(s_),
                    "peak_rss_mb": int(m) / 1024}
    return {"stdout": stdout, "seconds": wall, "cpu_seconds": ru.ru_utime + ru.ru_stime,
            "peak_rss_mb": ru.ru_maxrss / 1024}


def _child(step: str, *args: str) -> dict:
    """A step of this script in a fresh interpreter."""
    r = _run([sys.executable, str(Path(__file__).resolve()), step, *args])
    out = json.loads(r.pop("stdout").strip().splitlines()[-1])
    return {**out, **r}


def _cli(model: Path, src: Path, out_dir: Path, *options: str) -> dict:
    import pyarrow.parquet as pq

    shutil.rmtree(out_dir, ignore_errors=True)
    exe = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "anomaly_vae.cli"]
    # the MLflow store of the scoring runs: its own, beside the outputs (warmed up by the 1k-row run)
    home = {"ANOMALY_VAE_HOME": str(out_dir.parent / "home")}
    r = _run(exe + ["-q", "score", *options, "-m", str(model), str(src), "-o", str(out_dir)], env=home)
    r.pop("stdout")
    outputs = sorted(out_dir.rglob("*.scored.parquet")) if src.is_dir() else [out_dir / f"{src.stem}.scored.parquet"]
    r["rows"] = sum(pq.read_metadata(f).num_rows for f in outputs)
    return r


def split(src: Path, folder: Path, parts: int) -> Path:
    """`src` cut into `parts` files of equal rows in `folder` (a directory of small files, as
    a stream's sink writes them); reused when present."""
    import pyarrow.parquet as pq

    if folder.exists() and len(list(folder.glob("*.parquet"))) == parts:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    table = pq.read_table(src)
    step = -(-table.num_rows // parts)
    for i in range(parts):
        pq.write_table(table.slice(i * step, step), folder / f"part-{i:05d}.parquet")
    return folder


def _cli_median(repeat: int, *args: Any) -> dict:
    """`_cli` run `repeat` times in a row: the run with the median wall time, and every time
    (`seconds_all`). This machine varies by 20-30% from run to run."""
    runs = sorted((_cli(*args) for _ in range(max(1, repeat))), key=lambda r: r["seconds"])
    return {**runs[len(runs) // 2], "seconds_all": [round(r["seconds"], 2) for r in runs]}


# ------------------------------------------------------------------ parent steps
def generate(table: str, path: Path, rows: int, width: int) -> None:
    """Write `rows` rows of a table chunk by chunk (1M-row row groups); reused when present."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anomaly_vae.demo import make_transactions, make_wide_transactions

    if path.is_file() and pq.read_metadata(path).num_rows == rows:
        return
    tmp = path.with_name(path.name + ".partial")
    writer = None
    try:
        done, seed = 0, 0
        while done < rows:
            n = min(CHUNK_ROWS if table == "wide" else 200_000, rows - done)
            df = make_wide_transactions(n, width=width, seed=seed) if table == "wide" else \
                make_transactions(max(n, 1000), seed=seed).head(n)
            t = pa.Table.from_pandas(df, preserve_index=False)
            writer = writer or pq.ParquetWriter(tmp, t.schema, compression="snappy")
            writer.write_table(t.cast(writer.schema), row_group_size=CHUNK_ROWS)
            done, seed = done + n, seed + 1
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)


def train(table: str, src: Path, model_dir: Path, train_rows: int) -> dict:
    import pyarrow.parquet as pq

    from anomaly_vae import VAEAnomalyDetector
    from anomaly_vae.demo import DEMO_EXCLUDE

    if (model_dir / "manifest.json").exists():
        det = VAEAnomalyDetector.load(model_dir)
    else:
        df = pq.read_table(src).slice(0, train_rows).to_pandas()
        kw = dict(label="label", exclude=DEMO_EXCLUDE) if table == "demo" else {}
        det = VAEAnomalyDetector(random_state=0, **kw).fit(df)
        det.save(model_dir)
    return {"train_rows": train_rows, "epochs": len(det.history_.loss), "fit_seconds": det.fit_seconds_,
            "n_features": int(det.n_features_in_), "n_dims": int(det.preprocessor_.n_dims),
            "latent_dim": int(det.config_.latent_dim), "hidden": list(det.config_.hidden)}


def auto_dtype() -> str:
    """What precision "auto" runs the scoring network in on this CPU."""
    import torch

    from anomaly_vae.model import scoring_dtype

    return str(scoring_dtype("auto", torch.device("cpu"))).removeprefix("torch.")


def machine() -> dict:
    import pyarrow
    import torch

    from anomaly_vae.model import _cpu_info

    vendor, flags = _cpu_info()
    return {"cpu_vendor": vendor, "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}), "auto_precision": auto_dtype(), "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "pyarrow": pyarrow.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()]}


def bench_table(table: str, args, work: Path) -> dict:
    rows_list = [int(float(r)) for r in args.rows]
    name = f"{table}{args.width}" if table == "wide" else table
    files = {rows: work / f"{name}_{rows}.parquet" for rows in rows_list}
    generate(table, files[rows_list[0]], rows_list[0], args.width)
    model = work / f"model_{name}"
    info = train(table, files[rows_list[0]], model, args.train_rows)
    print(f"[{name}] model: {info['n_features']} features, {info['n_dims']} dims, hidden {info['hidden']}, "
          f"latent {info['latent_dim']}, {info['epochs']} epochs", flush=True)
    from anomaly_vae import VAEAnomalyDetector
    features = [c.name for c in VAEAnomalyDetector.load(model).schema_.features]
    # fixed costs (imports, model load, MLflow run): `score` on 1,000 rows; this also creates the
    # benchmark's MLflow store, as a nightly job's first night does, so no row below pays for that
    import pyarrow.parquet as pq

    small = work / f"{name}_1000.parquet"
    if not small.exists():
        pq.write_table(pq.ParquetFile(files[rows_list[0]]).read_row_group(0).slice(0, 1000), small)
    _cli(model, small, work / "scored")                # creates the store
    startup = _cli_median(args.repeat, model, small, work / "scored")
    startup["rows_per_s"] = 1000 / startup["seconds"]
    print(f"[{name}] score on 1,000 rows (fixed costs): {startup['seconds']:.2f} s", flush=True)
    runs = []
    for k, rows in enumerate(rows_list):
        generate(table, files[rows], rows, args.width)
        src = str(files[rows])
        run = {"rows": rows, "input_mb": os.path.getsize(src) / 2**20}
        run["floor"] = _child("_floor", src, str(work / "copy.parquet"), str(args.batch_size))
        repeat = args.repeat if rows <= 2_000_000 else 1      # 10M rows: one run each
        run["cli"] = _cli_median(repeat, model, files[rows], work / "scored")
        if k == 0:
            run["cli_1thread"] = _cli_median(repeat, model, files[rows], work / "scored", "--threads", "1")
            run["cli_no_mlflow"] = _cli_median(repeat, model, files[rows], work / "scored", "--no-mlflow")
            if args.split_files > 1:
                parts = split(files[rows], work / f"{name}_{rows}_in_{args.split_files}", args.split_files)
                run["cli_files"] = _cli(model, parts, work / "scored")
            other = "bfloat16" if auto_dtype() == "float32" else "float32"
            run[f"cli_{other}"] = _cli_median(repeat, model, files[rows], work / "scored", "--precision", other)
            run["in_memory"] = _child("_in_memory", str(model), src)
            for key, precision in (("stages", "float32"), ("stages_bf16", "bfloat16")):
                run[key] = _child("_stages", str(model), src, str(work / "stages.parquet"), str(args.batch_size),
                                  precision)
            if args.pyod:
                try:
                    run["pyod"] = _child("_pyod", str(files[rows_list[0]]), src, str(args.train_rows),
                                         json.dumps(features))
                except RuntimeError as exc:
                    last = str(exc).strip().splitlines()[-1]        # the exception, not the traceback's head
                    print(f"  pyod reference failed: {last}", flush=True)
        for key in ("cli", "cli_1thread", "cli_no_mlflow", "cli_files", "cli_float32", "cli_bfloat16", "in_memory", "pyod"):
            if key in run:
                sec = run[key].get("seconds_in_ram", run[key]["seconds"])
                run[key]["rows_per_s"] = rows / sec
        run["floor"]["rows_per_s"] = rows / run["floor"]["seconds"]
        run["cli_share_of_floor"] = run["cli"]["rows_per_s"] / run["floor"]["rows_per_s"]
        run["cli_startup"] = startup
        # rows/s once started: the fixed costs of the 1,000-row run taken off
        run["cli_marginal_rows_per_s"] = rows / max(1e-9, run["cli"]["seconds"] - startup["seconds"])
        runs.append(run)
        print(f"[{name}] {rows:,} rows: cli {run['cli']['rows_per_s']:,.0f} rows/s "
              f"({run['cli_share_of_floor']:.0%} of the floor {run['floor']['rows_per_s']:,.0f}), "
              f"{run['cli_marginal_rows_per_s']:,.0f} rows/s without the fixed costs, "
              f"peak RSS {run['cli']['peak_rss_mb']:.0f} MB", flush=True)
    return {"table": name, "model": info, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tables", nargs="+", default=["demo", "wide"], choices=["demo", "wide"])
    p.add_argument("--width", type=int, default=20, help="columns of the wide table")
    p.add_argument("--rows", nargs="+", default=["1e6"], help="row counts, e.g. 1e6 1e7")
    p.add_argument("--train-rows", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=32768)
    p.add_argument("--pyod", action=argparse.BooleanOptionalAction, default=True,
                   help="PyOD VAE reference (needs the bench extra)")
    p.add_argument("--split-files", type=int, default=1000,
                   help="also score the first row count cut into this many files, as one directory (1: skip)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each `score` measurement up to 2M rows (the median is reported)")
    p.add_argument("--workdir", type=Path, default=None, help="data/models/outputs (default: a temp dir)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR / "throughput.json",
                   help="JSON file (a .csv is written beside it), or a directory for throughput.json")
    args = p.parse_args(argv)
    if args.results.is_dir():
        args.results = args.results / "throughput.json"
    if args.pyod and importlib.util.find_spec("pyod") is None:
        print("PyOD is not installed (pip install -e '.[bench]'): the PyOD reference rows are skipped "
              "(--no-pyod says so without this line)", file=sys.stderr)
        args.pyod = False

    work = args.workdir or Path(tempfile.mkdtemp(prefix="anomaly-vae-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ANOMALY_VAE_HOME", str(work))   # the scoring runs' MLflow store
    info = machine()
    print(f"workdir {work}; {info['cpu_count']} cpus ({info['cpu_capability']}), load {info['load_avg_start']}")
    try:
        tables = []
        for t in args.tables:                  # results are rewritten after every table
            tables.append(bench_table(t, args, work))
            info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
            result = {"machine": info, "batch_size": args.batch_size, "tables": tables,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(result, indent=1))
        rows = flat_rows(tables)
        with open(args.results.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print_table(rows)
        print_stages(tables)
        print(f"results: {args.results} and {args.results.with_suffix('.csv')}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def flat_rows(tables: list[dict]) -> list[dict]:
    out = []
    for t in tables:
        for r in t["runs"]:
            floor = r["floor"]["rows_per_s"]
            for key in ("floor", "cli_startup", "cli", "cli_1thread", "cli_no_mlflow", "cli_files", "cli_float32",
                        "cli_bfloat16", "in_memory", "pyod"):
                if key not in r:
                    continue
                m = r[key]
                out.append({"table": t["table"], "rows": m.get("rows", r["rows"]), "measurement": key,
                            "seconds": round(m.get("seconds_in_ram", m["seconds"]), 3),
                            "rows_per_s": round(m["rows_per_s"]), "share_of_floor": round(m["rows_per_s"] / floor, 3),
                            "cpu_seconds": round(m["cpu_seconds"], 2), "peak_rss_mb": round(m["peak_rss_mb"])})
                if key == "cli" and "cli_startup" in r:      # the same run without its fixed costs
                    sec = m["seconds"] - r["cli_startup"]["seconds"]
                    out.append({**out[-1], "measurement": "cli_minus_startup", "seconds": round(sec, 3),
                                "rows_per_s": round(r["rows"] / sec), "share_of_floor": round(r["rows"] / sec / floor, 3),
                                "cpu_seconds": round(m["cpu_seconds"] - r["cli_startup"]["cpu_seconds"], 2)})
    return out


def print_table(rows: list[dict]) -> None:
    head = f"{'table':<8} {'rows':>11} {'measurement':<10} {'s':>8} {'rows/s':>10} {'/floor':>7} {'CPU s':>7} {'peak RSS MB':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['table']:<8} {r['rows']:>11,} {r['measurement']:<10} {r['seconds']:>8.2f} {r['rows_per_s']:>10,} "
              f"{r['share_of_floor']:>6.0%} {r['cpu_seconds']:>7.1f} {r['peak_rss_mb']:>11,}")


def print_stages(tables: list[dict]) -> None:
    for t in tables:
        for key in ("stages", "stages_bf16"):
            st = t["runs"][0].get(key)
            if st:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in st["stage_seconds"].items())
                print(f"stages [{t['table']}, {st['rows']:,} rows, {st.get('precision', 'float32')}, one thread, "
                      f"seconds]: {parts}")


def _child_main(argv: list[str]) -> int:
    step, *a = argv
    if step == "_floor":
        out = child_floor(a[0], a[1], int(a[2]))
    elif step == "_in_memory":
        out = child_in_memory(a[0], a[1])
    elif step == "_stages":
        out = child_stages(*a)
    else:
        out = child_pyod(a[0], a[1], int(a[2]), json.loads(a[3]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        sys.exit(_child_main(sys.argv[1:]))
    sys.exit(main())
