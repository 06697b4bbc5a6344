#!/usr/bin/env python
"""Detection-quality benchmark: anomaly-vae vs. PyOD baselines (one-class protocol).

For every dataset (``<data-dir>/adbench/*.parquet`` and, with ``--mixed``,
``<data-dir>/mixed/*.parquet``) and every seed, the normal rows are shuffled with
``numpy.random.RandomState(seed)``; the first half is the training set, the test set is
the other half plus all anomalies.  Training is capped at 20,000 rows and the test set at
50,000 (stratified by label) with the same RNG; columns constant on the training set are
dropped.  Each (dataset, seed, method) run happens in a worker process with a time limit
and yields AUROC and AUPRC (average precision).  Results go to a resumable CSV; a summary
(mean AUROC/AUPRC, mean ranks, per-dataset table) is printed and written as Markdown.

See benchmarks/README.md for the full protocol and usage.
"""

from __future__ import annotations

import os

# Keep the benchmark polite on a shared machine: one BLAS/OpenMP/torch thread unless the
# caller explicitly exported something else.  Must happen before numpy/torch are imported.
for _var in (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
):
    os.environ.setdefault(_var, "1")

import argparse
import csv
import json
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "datasets"
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "quality.csv"

CSV_COLUMNS = [
    "dataset",
    "seed",
    "method",
    "auroc",
    "auprc",
    "fit_s",
    "score_s",
    "n_train",
    "n_test",
    "status",
]

BASELINES = ["IForest", "KNN", "KNN-mean", "LOF", "ECOD", "PCA", "OCSVM", "AutoEncoder", "VAE"]
# A method is "worst-case" on a dataset when its mean AUROC over seeds is more than this
# below the best compared method's mean AUROC on that dataset.
WORST_CASE_GAP = 0.05
OUR_METHOD = "anomaly-vae"
ALL_METHODS = BASELINES + [OUR_METHOD]

LABEL_COLUMN = "label"
# Columns removed from a mixed dataset before anything else, per mixed/README.md.
MIXED_DROP_COLUMNS = {
    # "`duration` leaks the label — drop it for a fair test"
    "bank_marketing": ["duration"],
}

MAX_TRAIN = 20_000
MAX_TEST = 50_000


# --------------------------------------------------------------------------------------
# Data: discovery, loading, split
# --------------------------------------------------------------------------------------


def discover_datasets(data_dir: Path, include_mixed: bool) -> dict[str, dict]:
    """Map dataset name -> {"path", "group"} for adbench (and mixed) parquet files."""
    found: dict[str, dict] = {}
    groups = ["adbench"] + (["mixed"] if include_mixed else [])
    for group in groups:
        folder = data_dir / group
        if not folder.is_dir():
            if group == "mixed":
                print(f"warning: {folder} not found; skipping the mixed datasets", file=sys.stderr)
            continue
        for path in sorted(folder.glob("*.parquet"), key=lambda p: p.stem.lower()):
            name = path.stem
            if name in found:
                name = f"{group}/{name}"
            found[name] = {"path": str(path), "group": group}
    return found


def load_dataset(path: str, group: str, name: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Return (feature DataFrame with original dtypes, label array)."""
    df = pd.read_parquet(path)
    if LABEL_COLUMN not in df.columns:
        raise ValueError(f"{path}: no '{LABEL_COLUMN}' column")
    y = df[LABEL_COLUMN].to_numpy().astype(int)
    if group == "adbench":
        feats = [c for c in df.columns if c != LABEL_COLUMN and str(c).startswith("f")]
    else:
        drop = set(MIXED_DROP_COLUMNS.get(Path(path).stem, []))
        feats = [c for c in df.columns if c != LABEL_COLUMN and c not in drop]
    return df[feats].reset_index(drop=True), y


def one_class_split(
    y: np.ndarray, seed: int, max_train: int = MAX_TRAIN, max_test: int = MAX_TEST
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test) of the one-class protocol."""
    from sklearn.model_selection import train_test_split

    rng = np.random.RandomState(seed)
    normal = rng.permutation(np.flatnonzero(y == 0))
    anomalies = np.flatnonzero(y == 1)
    half = len(normal) // 2
    train_idx = normal[:half]
    test_idx = np.concatenate([normal[half:], anomalies])
    if len(train_idx) > max_train:
        train_idx = rng.choice(train_idx, size=max_train, replace=False)
    if len(test_idx) > max_test:
        test_idx, _ = train_test_split(
            test_idx, train_size=max_test, stratify=y[test_idx], random_state=rng
        )
    return train_idx, np.sort(test_idx)


def drop_constant_columns(train: pd.DataFrame, test: pd.DataFrame):
    keep = [c for c in train.columns if train[c].nunique(dropna=False) > 1]
    return train[keep], test[keep]


def is_categorical(series: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)


def encode_for_baselines(train: pd.DataFrame, test: pd.DataFrame):
    """Numeric matrices for the PyOD baselines.

    All-numeric data: StandardScaler fitted on train.  Mixed data: one-hot categoricals
    (OneHotEncoder, handle_unknown='ignore') + median-imputed, standardized numerics.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    cats = [c for c in train.columns if is_categorical(train[c])]
    nums = [c for c in train.columns if c not in cats]
    if not cats:
        scaler = StandardScaler().fit(train.to_numpy(dtype=np.float64))
        return (
            scaler.transform(train.to_numpy(dtype=np.float64)),
            scaler.transform(test.to_numpy(dtype=np.float64)),
        )
    transformers = []
    if nums:
        transformers.append(
            ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), nums)
        )
    # Categories as plain strings (missing -> "<NA>") so the encoder sees one dtype.
    to_str = lambda d: d[cats].astype("object").where(d[cats].notna(), "<NA>").astype(str)
    ct = ColumnTransformer(transformers, remainder="drop", sparse_threshold=0.0)
    ohe = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
    x_train_num = ct.fit_transform(train) if nums else np.empty((len(train), 0))
    x_test_num = ct.transform(test) if nums else np.empty((len(test), 0))
    x_train_cat = ohe.fit_transform(to_str(train))
    x_test_cat = ohe.transform(to_str(test))
    return (
        np.hstack([x_train_num, x_train_cat]).astype(np.float64),
        np.hstack([x_test_num, x_test_cat]).astype(np.float64),
    )


# --------------------------------------------------------------------------------------
# Methods (run inside the worker process)
# --------------------------------------------------------------------------------------


def make_baseline(method: str, seed: int):
    """PyOD detector with library defaults (random_state where accepted, quiet)."""
    if method == "IForest":
        from pyod.models.iforest import IForest

        return IForest(random_state=seed)
    if method == "KNN":
        from pyod.models.knn import KNN

        return KNN()
    if method == "KNN-mean":
        # mean distance to the 5 nearest training rows (DTE-NP's non-parametric score in effect)
        from pyod.models.knn import KNN

        return KNN(method="mean")
    if method == "LOF":
        from pyod.models.lof import LOF

        return LOF()
    if method == "ECOD":
        from pyod.models.ecod import ECOD

        return ECOD()
    if method == "PCA":
        from pyod.models.pca import PCA

        return PCA(random_state=seed)
    if method == "OCSVM":
        from pyod.models.ocsvm import OCSVM

        return OCSVM()
    if method == "AutoEncoder":
        from pyod.models.auto_encoder import AutoEncoder

        return AutoEncoder(random_state=seed, verbose=0)
    if method == "VAE":
        from pyod.models.vae import VAE

        return VAE(random_state=seed, verbose=0)
    raise ValueError(f"unknown baseline {method!r}")


class MethodUnavailable(Exception):
    """Our package cannot be imported: skip the method, record nothing."""


def import_our_detector():
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from anomaly_vae import VAEAnomalyDetector
    except Exception as exc:  # ImportError, or any error raised while importing
        raise MethodUnavailable(f"{type(exc).__name__}: {exc}") from exc
    return VAEAnomalyDetector


class _Worker:
    """State kept by the worker process between tasks (last dataset/split cache)."""

    def __init__(self):
        self.data_key = None
        self.data = None
        self.split_key = None
        self.split = None
        self.encoded = None

    def get_split(self, task):
        data_key = task["path"]
        if self.data_key != data_key:
            self.data = load_dataset(task["path"], task["group"], task["dataset"])
            self.data_key = data_key
            self.split_key = None
        split_key = (data_key, task["seed"], task["max_train"], task["max_test"])
        if self.split_key != split_key:
            x, y = self.data
            tr, te = one_class_split(y, task["seed"], task["max_train"], task["max_test"])
            x_train, x_test = drop_constant_columns(
                x.iloc[tr].reset_index(drop=True), x.iloc[te].reset_index(drop=True)
            )
            self.split = (x_train, x_test, y[te])
            self.encoded = None
            self.split_key = split_key
        return self.split

    def get_encoded(self, task):
        x_train, x_test, _ = self.get_split(task)
        if self.encoded is None:
            self.encoded = encode_for_baselines(x_train, x_test)
        return self.encoded

    def run(self, task) -> dict:
        from sklearn.metrics import average_precision_score, roc_auc_score

        method = task["method"]
        seed = task["seed"]
        x_train, x_test, y_test = self.get_split(task)
        if method in BASELINES:
            a_train, a_test = self.get_encoded(task)
            det = make_baseline(method, seed)
            t0 = time.perf_counter()
            det.fit(a_train)
            t1 = time.perf_counter()
            scores = det.decision_function(a_test)
            t2 = time.perf_counter()
            if method == "PCA" and not np.all(np.isfinite(scores)):
                # scikit-learn >= 1.5 picks the 'covariance_eigh' solver for tall data and
                # clips eigenvalues of collinear columns (e.g. one-hot groups) to exactly 0;
                # PyOD's weighted PCA then divides by 0.  Retry with the 'full' SVD solver
                # (scikit-learn's pre-1.5 choice for these shapes); timings are the retry's.
                print(f"note: PCA default solver gave non-finite scores on {task['dataset']} "
                      f"seed {seed}; retrying with svd_solver='full'", file=sys.stderr, flush=True)
                from pyod.models.pca import PCA

                det = PCA(random_state=seed, svd_solver="full")
                t0 = time.perf_counter()
                det.fit(a_train)
                t1 = time.perf_counter()
                scores = det.decision_function(a_test)
                t2 = time.perf_counter()
        else:  # our method, possibly a named variant with extra parameters
            cls = import_our_detector()
            t0 = time.perf_counter()
            det = cls(random_state=seed, **task["vae_params"]).fit(x_train)
            t1 = time.perf_counter()
            scores = det.anomaly_score(x_test)
            t2 = time.perf_counter()
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if scores.shape[0] != len(y_test):
            raise ValueError(f"got {scores.shape[0]} scores for {len(y_test)} test rows")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"{int((~np.isfinite(scores)).sum())} non-finite scores")
        return {
            "auroc": float(roc_auc_score(y_test, scores)),
            "auprc": float(average_precision_score(y_test, scores)),
            "fit_s": t1 - t0,
            "score_s": t2 - t1,
            "n_train": len(x_train),
            "n_test": len(x_test),
            "status": "ok",
        }


def worker_main(conn, repo_root: str):
    """Entry point of the worker process: receive tasks, send results."""
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        torch.set_num_interop_threads(1)
    except Exception:
        pass
    import pyod  # noqa: F401  (warm import so the time limit measures the method)
    import sklearn.metrics  # noqa: F401

    state = _Worker()
    conn.send({"ready": True})
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        try:
            result = state.run(task)
        except MethodUnavailable as exc:
            result = {"status": "unavailable", "message": str(exc)}
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            result = {"status": f"error: {msg[:300]}"}
        conn.send(result)


class WorkerHandle:
    """A persistent worker process that is killed and replaced when a run times out."""

    def __init__(self):
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.conn = None

    def _start(self):
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=worker_main, args=(child, str(REPO_ROOT)), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        if not self.conn.poll(600):
            self.stop()
            raise RuntimeError("worker process did not start within 600 s")
        self.conn.recv()

    def run(self, task: dict, timeout: float) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(task)
        try:
            ready = self.conn.poll(timeout)
        except (EOFError, OSError):
            ready = True
        if not ready:
            self.stop()
            return {"status": "timeout"}
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            if self.proc is not None:
                self.proc.join(5)
            code = self.proc.exitcode if self.proc is not None else None
            self.stop()
            return {"status": f"error: worker crashed (exit code {code})"}

    def stop(self, graceful: bool = False):
        if self.proc is None:
            return
        if graceful and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(10)
            except Exception:
                pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        try:
            self.conn.close()
        except Exception:
            pass
        self.proc = None
        self.conn = None


# --------------------------------------------------------------------------------------
# Results CSV
# --------------------------------------------------------------------------------------


def read_results(path: Path) -> pd.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=CSV_COLUMNS)
    df = pd.read_csv(path, dtype={"dataset": str, "method": str, "status": str})
    for col in CSV_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    df = df[CSV_COLUMNS]
    df["seed"] = df["seed"].astype(int)
    for col in ("n_train", "n_test"):
        df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
    return df.drop_duplicates(["dataset", "seed", "method"], keep="last").reset_index(drop=True)


def append_result(path: Path, row: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def compact_results(path: Path):
    """Rewrite the CSV without superseded duplicates (after --force / --retry-failed)."""
    if not path.exists():
        return
    df = read_results(path)
    tmp = path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def format_row(dataset, seed, method, result) -> dict:
    def num(key, digits):
        v = result.get(key)
        return "" if v is None else f"{v:.{digits}f}"

    return {
        "dataset": dataset,
        "seed": seed,
        "method": method,
        "auroc": num("auroc", 6),
        "auprc": num("auprc", 6),
        "fit_s": num("fit_s", 3),
        "score_s": num("score_s", 3),
        "n_train": result.get("n_train", ""),
        "n_test": result.get("n_test", ""),
        "status": result["status"],
    }


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def md_table(df: pd.DataFrame, index_name: str = "", floatfmt: str = ".3f",
             formats: dict[str, str] | None = None) -> str:
    fmts = [(formats or {}).get(str(c), floatfmt) for c in df.columns]
    cols = [index_name] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * len(df.columns)) + "|"]
    for row in df.itertuples(index=True, name=None):
        cells = [str(row[0])]
        for v, fmt in zip(row[1:], fmts):
            if isinstance(v, (float, np.floating)):
                cells.append("" if np.isnan(v) else format(v, fmt))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def common_pairs(ok: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Keep only (dataset, seed) pairs where every method in ``methods`` has a result."""
    ok = ok[ok["method"].isin(methods)]
    n = ok.groupby(["dataset", "seed"])["method"].nunique()
    full = n[n == len(methods)].index
    keys = pd.MultiIndex.from_frame(ok[["dataset", "seed"]])
    return ok[keys.isin(full)].copy()


def worst_case_counts(ok: pd.DataFrame, gap: float = WORST_CASE_GAP) -> pd.Series:
    """Per method, the number of datasets where its mean AUROC over seeds is more than `gap`
    below the best compared method's mean AUROC on that dataset. (methods,) ints."""
    per_ds = ok.groupby(["dataset", "method"])["auroc"].mean().unstack("method")
    behind = per_ds.max(axis=1).to_numpy()[:, None] - per_ds > gap + 1e-12
    return behind.sum(axis=0).astype(int)


def method_table(ok: pd.DataFrame) -> pd.DataFrame:
    ok = ok.copy()
    grp = ok.groupby(["dataset", "seed"])
    ok["rank_auroc"] = grp["auroc"].rank(ascending=False, method="average")
    ok["rank_auprc"] = grp["auprc"].rank(ascending=False, method="average")
    table = ok.groupby("method").agg(
        mean_auroc=("auroc", "mean"),
        mean_auprc=("auprc", "mean"),
        rank_auroc=("rank_auroc", "mean"),
        rank_auprc=("rank_auprc", "mean"),
        runs=("auroc", "size"),
        fit_s_total=("fit_s", "sum"),
        score_s_total=("score_s", "sum"),
    )
    table.insert(4, "worst_case", worst_case_counts(ok).reindex(table.index).to_numpy())
    table = table.sort_values(["rank_auroc", "mean_auroc"], ascending=[True, False])
    table.index.name = "method"
    return table


def best_baseline_ceiling(ok: pd.DataFrame) -> dict[str, float] | None:
    """Mean over (dataset, seed) of the best PyOD baseline's AUROC and AUPRC, each picked separately.

    A ceiling for "beat every baseline with one configuration": no single method reaches it.
    """
    base = ok[ok["method"].isin(BASELINES)]
    if base.empty:
        return None
    best = base.groupby(["dataset", "seed"])[["auroc", "auprc"]].max()
    return {m: float(best[m].mean()) for m in ("auroc", "auprc")}


def build_summary(results: pd.DataFrame, groups: dict[str, str], methods: list[str] | None) -> str:
    if results.empty:
        return "No results yet.\n"
    ok = results[results["status"] == "ok"].copy()
    for col in ("auroc", "auprc", "fit_s", "score_s"):
        ok[col] = pd.to_numeric(ok[col], errors="coerce")
    if methods is None:
        methods = [m for m in ALL_METHODS if m in set(ok["method"])]
        methods += sorted(set(ok["method"]) - set(methods))
    if not methods:
        return "No successful runs yet.\n"
    out = []
    out.append(
        "Methods compared: " + ", ".join(methods) + ".  Only (dataset, seed) pairs where every "
        "compared method has a successful run are used; ranks are computed among these methods "
        "per (dataset, seed) (1 = best, ties averaged) and then averaged.  worst_case = number of "
        f"datasets where the method's mean AUROC over seeds is more than {WORST_CASE_GAP} below the "
        "best compared method's.  fit_s_total/score_s_total are seconds summed over the counted runs.\n"
    )

    sections = [("All datasets", None)]
    present_groups = sorted({groups.get(d, "other") for d in ok["dataset"]})
    if len(present_groups) > 1:
        sections += [(f"{g} datasets", g) for g in present_groups]
    common_all = common_pairs(ok, methods)
    for title, group in sections:
        sub = common_all if group is None else common_all[common_all["dataset"].map(lambda d: groups.get(d, "other")) == group]
        n_pairs = sub[["dataset", "seed"]].drop_duplicates().shape[0]
        n_ds = sub["dataset"].nunique()
        out.append(f"### {title} ({n_ds} datasets, {n_pairs} dataset-seed pairs)\n")
        if sub.empty:
            out.append("No (dataset, seed) pair has results for every method.\n")
            continue
        table = method_table(sub)
        out.append(md_table(table, "method",
                            formats={"rank_auroc": ".2f", "rank_auprc": ".2f",
                                     "fit_s_total": ".1f", "score_s_total": ".1f"}))
        out.append("")
        ceiling = best_baseline_ceiling(sub)
        if ceiling is not None:
            out.append("Best baseline picked per (dataset, seed), an oracle that no single method is: "
                       f"mean AUROC {ceiling['auroc']:.3f}, mean AUPRC {ceiling['auprc']:.3f}.\n")

    if not common_all.empty:
        for metric in ("auroc", "auprc"):
            pivot = common_all.pivot_table(index="dataset", columns="method", values=metric, aggfunc="mean")
            pivot = pivot[[m for m in methods if m in pivot.columns]]
            pivot = pivot.sort_index(key=lambda s: [(groups.get(d, "other"), d.lower()) for d in s])
            pivot.loc["**mean**"] = pivot.mean(axis=0)
            seeds = sorted(common_all["seed"].unique())
            out.append(f"### Per-dataset mean {metric.upper()} (over seeds {', '.join(map(str, seeds))})\n")
            out.append(md_table(pivot, "dataset"))
            out.append("")

    # What was left out and why.
    all_pairs = results[["dataset", "seed"]].drop_duplicates()
    used = common_all[["dataset", "seed"]].drop_duplicates()
    dropped = all_pairs.merge(used, how="left", indicator=True)
    dropped = dropped[dropped["_merge"] == "left_only"]
    if not dropped.empty:
        out.append("### Pairs left out of the comparison\n")
        for _, r in dropped.sort_values(["dataset", "seed"]).iterrows():
            have = set(ok[(ok["dataset"] == r["dataset"]) & (ok["seed"] == r["seed"])]["method"])
            missing = [m for m in methods if m not in have]
            out.append(f"- {r['dataset']} seed {r['seed']}: no result for {', '.join(missing)}")
        out.append("")
    failed = results[results["status"] != "ok"]
    if not failed.empty:
        out.append("### Failed or timed-out runs\n")
        for _, r in failed.sort_values(["dataset", "seed", "method"]).iterrows():
            out.append(f"- {r['dataset']} seed {r['seed']} {r['method']}: {r['status']}")
        out.append("")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def split_list(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out: list[str] = []
    for v in values:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def parse_vae_params(items: list[str] | None) -> dict:
    params = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--vae-param expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[key.strip()] = value
    return params


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Detection-quality benchmark of anomaly-vae against PyOD baselines "
        "(one-class protocol on ADBench and mixed-type datasets).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="folder holding adbench/ and mixed/")
    p.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the mixed-type datasets in <data-dir>/mixed")
    p.add_argument("--datasets", nargs="+", metavar="NAME",
                   help="restrict to these datasets (names = parquet stems; comma or space separated)")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help=f"restrict to these methods; choices: {', '.join(ALL_METHODS)} "
                        f"('{OUR_METHOD}' runs our detector under --method-name)")
    p.add_argument("--seeds", nargs="+", metavar="N", default=["0", "1", "2"], help="seeds")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="time limit in seconds per (dataset, seed, method) run")
    p.add_argument("--vae-param", action="append", metavar="KEY=VALUE",
                   help="extra keyword argument for VAEAnomalyDetector (repeatable; value "
                        "parsed as JSON, else kept as a string)")
    p.add_argument("--method-name", default=None,
                   help=f"name recorded for our detector (default '{OUR_METHOD}', or "
                        f"'{OUR_METHOD}[k=v,...]' when --vae-param is given)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results CSV")
    p.add_argument("--summary", type=Path, default=None,
                   help="summary Markdown (default: <results dir>/quality_summary.md)")
    p.add_argument("--force", action="store_true", help="re-run runs already in the CSV")
    p.add_argument("--retry-failed", action="store_true",
                   help="re-run runs recorded with a status other than ok (timeouts, errors)")
    p.add_argument("--summary-only", action="store_true",
                   help="do not run anything; summarize the CSV")
    p.add_argument("--summary-methods", nargs="+", metavar="NAME",
                   help="methods to compare in the summary (default: every method in the CSV)")
    p.add_argument("--max-train", type=int, default=MAX_TRAIN, help="training-set cap")
    p.add_argument("--max-test", type=int, default=MAX_TEST, help="test-set cap (stratified)")
    p.add_argument("--list", action="store_true", help="list datasets and methods, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_dir: Path = args.data_dir.resolve()
    results_path: Path = args.results.resolve()
    summary_path: Path = (args.summary or results_path.parent / "quality_summary.md").resolve()

    if not (data_dir / "adbench").is_dir():
        print(
            f"Dataset folder not found: {data_dir / 'adbench'}\n"
            f"The benchmark reads the shared datasets from <data-dir>/adbench (and "
            f"<data-dir>/mixed); pass --data-dir to point elsewhere.",
            file=sys.stderr,
        )
        if not args.summary_only:
            return 2

    available = discover_datasets(data_dir, args.mixed) if (data_dir / "adbench").is_dir() else {}
    groups = {name: info["group"] for name, info in available.items()}
    # Mixed datasets in the CSV keep their group even when run with --no-mixed.
    if (data_dir / "mixed").is_dir():
        groups.update({p.stem: "mixed" for p in (data_dir / "mixed").glob("*.parquet")})

    vae_params = parse_vae_params(args.vae_param)
    our_name = args.method_name
    if our_name is None:
        our_name = OUR_METHOD
        if vae_params:
            our_name += "[" + ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                       for k, v in vae_params.items()) + "]"

    methods = split_list(args.methods) or list(ALL_METHODS)
    resolved_methods = []
    for m in methods:
        if m in BASELINES:
            resolved_methods.append(m)
        elif m in (OUR_METHOD, our_name):
            resolved_methods.append(OUR_METHOD)
        else:
            print(f"unknown method {m!r}; choices: {', '.join(ALL_METHODS)} (or {our_name!r})",
                  file=sys.stderr)
            return 2
    methods = list(dict.fromkeys(resolved_methods))

    if args.list:
        for name, info in available.items():
            print(f"{info['group']:8s} {name}")
        print("methods:", ", ".join(ALL_METHODS))
        return 0

    if not args.summary_only:
        wanted = split_list(args.datasets)
        if wanted:
            unknown = [d for d in wanted if d not in available]
            if unknown:
                print(f"unknown dataset(s): {', '.join(unknown)}; available: "
                      f"{', '.join(available)}", file=sys.stderr)
                return 2
            datasets = [d for d in available if d in wanted]
        else:
            datasets = list(available)
        try:
            seeds = [int(s) for s in split_list(args.seeds)]
        except ValueError:
            print("--seeds expects integers", file=sys.stderr)
            return 2
        run_benchmark(args, datasets, available, seeds, methods, our_name, vae_params, results_path)

    results = read_results(results_path)
    summary_methods = split_list(args.summary_methods)
    summary = build_summary(results, groups, summary_methods)
    text = f"# Quality benchmark summary\n\nSource: `{_rel(results_path)}`\n\n{summary}"
    print("\n" + text)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(text)
    print(f"summary written to {_rel(summary_path)}")
    return 0


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def run_benchmark(args, datasets, available, seeds, methods, our_name, vae_params, results_path):
    existing = read_results(results_path)
    done = {}
    for r in existing.itertuples(index=False):
        done[(r.dataset, int(r.seed), r.method)] = r.status

    tasks = []
    for seed in seeds:  # seed-major: a complete seed 0 is available early
        for ds in datasets:
            for m in methods:
                name = our_name if m == OUR_METHOD else m
                status = done.get((ds, seed, name))
                if status is not None and not args.force and not (args.retry_failed and status != "ok"):
                    continue
                tasks.append((ds, seed, m, name))
    skipped = len(datasets) * len(seeds) * len(methods) - len(tasks)
    print(f"{len(tasks)} runs to do ({skipped} already in {_rel(results_path)}); "
          f"time limit {args.timeout:g} s per run", flush=True)
    if OUR_METHOD in methods and vae_params:
        print(f"{our_name}: VAEAnomalyDetector(**{vae_params})", flush=True)

    worker = WorkerHandle()
    unavailable: str | None = None
    rewrote = False
    t_start = time.perf_counter()
    try:
        for i, (ds, seed, m, name) in enumerate(tasks, 1):
            if m == OUR_METHOD and unavailable is not None:
                continue
            info = available[ds]
            task = {
                "dataset": ds, "path": info["path"], "group": info["group"], "seed": seed,
                "method": m, "vae_params": vae_params,
                "max_train": args.max_train, "max_test": args.max_test,
            }
            t0 = time.perf_counter()
            result = worker.run(task, args.timeout)
            wall = time.perf_counter() - t0
            if result["status"] == "unavailable":
                unavailable = result.get("message", "")
                print(f"WARNING: cannot import anomaly_vae.VAEAnomalyDetector ({unavailable}); "
                      f"skipping {name}", file=sys.stderr, flush=True)
                continue
            if (ds, seed, name) in done:
                rewrote = True
            append_result(results_path, format_row(ds, seed, name, result))
            if result["status"] == "ok":
                msg = (f"auroc={result['auroc']:.4f} auprc={result['auprc']:.4f} "
                       f"fit={result['fit_s']:.1f}s score={result['score_s']:.1f}s "
                       f"n_train={result['n_train']} n_test={result['n_test']}")
            else:
                msg = result["status"]
            print(f"[{i}/{len(tasks)}] {ds} seed={seed} {name}: {msg} (wall {wall:.1f}s)", flush=True)
    except KeyboardInterrupt:
        print("interrupted; finished runs are saved", file=sys.stderr)
    finally:
        worker.stop(graceful=True)
        if rewrote:
            compact_results(results_path)
    print(f"benchmark runs took {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
