#!/usr/bin/env python
"""Explanation-accuracy benchmark: does the explanation name the column we broke?

Protocol (per dataset, seed 0): the normal rows are shuffled with RandomState(0); up to 20,000
train the default detector, up to N held-out normal rows are corrupted, one corruption per
row, and each method ranks the columns of the corrupted row. hit@k = share of rows whose
corrupted column (either column, for two-column corruptions) is among the method's top k.

Corruptions (only rows whose value actually changes are kept):
  num_range   numeric column (>= 20 distinct values) pushed past the training range:
              max + U(0.2, 1) * (max - min)
  num_swap    numeric value swapped for a distant row's: the training 0.5% or 99.5% quantile,
              whichever is farther from the row's value (inside the training range)
  cat_rare    categorical swapped for its rarest training category (>= 5 rows)
  cat_swap    categorical swapped for another row's (different) category, drawn by frequency;
              often still a normal-looking row, so no method can be right every time
  dependency  a pair (a, b) of dependent columns (highest normalised mutual information on
              the training rows, numeric columns binned into deciles): b takes a common value
              (bin share >= 5%) that occurs in < 1% of training rows with the row's value of a
              (each value is valid alone, the combination is not; e.g. a cash amount at a pharmacy)

Methods, each giving a per-column score (largest = the explanation):
  vae           the product's contributions (`det.contributions`, what `top_features` lists)
  vae_klall     the same with the KL share computed for every row (the product does it for
                flagged rows only)
  vae_cond      conditional surprisal: each column's NLL under the decoder's prediction with
                that column occluded (set to its typical value), i.e. -log p(x_j | x_rest)
                approximately, minus its median on training rows (`det.conditional_nll`)
  marginal      per-column surprisal: numeric 0.5 z^2 (z-score on training mean/std),
                categorical -log frequency; minus its median on training rows
  ae_sqerr      per-column squared reconstruction error of a plain autoencoder
                (sklearn MLPRegressor on the detector's own encoding; what H2O's
                per_feature=True reports), summed over the column's encoded dims
  ae_sqerr_med  the same minus its median on training rows

Usage:  python benchmarks/explain.py [--rows 300] [--datasets demo german_credit ...]
Writes benchmarks/results/explain.csv and explain.json and prints the table.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import normalized_mutual_info_score
from sklearn.neural_network import MLPRegressor

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from anomaly_vae import VAEAnomalyDetector  # noqa: E402
from anomaly_vae import explain as E  # noqa: E402
from anomaly_vae.demo import DEMO_EXCLUDE, make_transactions  # noqa: E402

MIXED = REPO_ROOT.parent / "shared" / "datasets" / "mixed"
RESULTS = REPO_ROOT / "benchmarks" / "results"
KINDS = ("num_range", "num_swap", "cat_rare", "cat_swap", "dependency")
METHODS = ("vae", "vae_klall", "vae_cond", "marginal", "ae_sqerr", "ae_sqerr_med")
TARGETS = {"num_range": "hit@1 >= 0.9", "num_swap": "hit@1 >= 0.9", "cat_rare": "hit@1 >= 0.9",
           "cat_swap": "hit@1 >= 0.9", "dependency": "better than every baseline"}


def load(name: str) -> tuple[pd.DataFrame, dict]:
    """Normal rows of a dataset and the detector arguments for it."""
    if name == "demo":
        df = make_transactions(40_000, seed=0)
        return df[df["label"] == 0].drop(columns=["label"]).reset_index(drop=True), {"exclude": DEMO_EXCLUDE}
    df = pd.read_parquet(MIXED / f"{name}.parquet")
    return df[df["label"] == 0].drop(columns=["label"]).reset_index(drop=True), {}


def numeric_candidates(det, train: pd.DataFrame) -> list[str]:
    return [c.name for c in det.schema_.features if c.kind == "numeric" and train[c.name].nunique() >= 20]


def categorical_candidates(det, train: pd.DataFrame) -> list[str]:
    return [c.name for c in det.schema_.features if c.kind in ("categorical", "boolean")
            and (train[c.name].astype(str).value_counts() >= 5).sum() >= 2]


def binned(s: pd.Series, numeric: bool) -> np.ndarray:
    if numeric:
        edges = np.unique(np.nanquantile(s.astype(float), np.linspace(0.1, 0.9, 9)))
        return np.searchsorted(edges, s.astype(float).to_numpy(), side="right")
    return pd.factorize(s.astype(str))[0]


def dependent_pairs(det, train: pd.DataFrame, n_pairs: int = 3) -> list[tuple[str, str]]:
    """Column pairs with the highest normalised mutual information (on <= 5,000 rows)."""
    cols = [c for c in det.schema_.features if c.kind in ("numeric", "categorical", "boolean")
            and train[c.name].nunique() >= 2]
    sub = train.sample(min(len(train), 5000), random_state=0)
    bins = {c.name: binned(sub[c.name], c.kind == "numeric") for c in cols}
    scores = []
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            nmi = normalized_mutual_info_score(bins[a.name], bins[b.name])
            if nmi < 0.999:            # identical columns say nothing about an explanation
                scores.append((nmi, a.name, b.name))
    scores.sort(reverse=True)
    return [(a, b) for _, a, b in scores[:n_pairs]]


def corrupt(kind: str, det, train: pd.DataFrame, rows: pd.DataFrame, rng: np.random.Generator
            ) -> tuple[pd.DataFrame, list[set[str]], np.ndarray]:
    """Corrupted copies of `rows`, the set of corrupted columns per row, and which of `rows`
    were kept (a row whose value would not change is dropped)."""
    out, truth = rows.copy(), []
    keep = np.ones(len(rows), dtype=bool)
    num, cat = numeric_candidates(det, train), categorical_candidates(det, train)
    kinds = {c.name: c.kind for c in det.schema_.features}
    for c in num:
        out[c] = out[c].astype(float)
    for i in range(len(rows)):
        if kind in ("num_range", "num_swap"):
            col = num[rng.integers(len(num))]
            x, v = rows[col].iloc[i], train[col].astype(float)
            if kind == "num_range":
                lo, hi = v.min(), v.max()
                new = hi + rng.uniform(0.2, 1.0) * (hi - lo)
            else:
                q_lo, q_hi = v.quantile([0.005, 0.995])
                new = q_hi if abs(q_hi - x) >= abs(x - q_lo) else q_lo
            if pd.isna(x) or new == x:
                keep[i] = False
            out.loc[out.index[i], col] = new
            truth.append({col})
        elif kind in ("cat_rare", "cat_swap"):
            col = cat[rng.integers(len(cat))]
            counts = train[col].astype(str).value_counts()
            counts = counts[counts >= 5]
            cur = str(rows[col].iloc[i])
            others = counts[counts.index != cur]
            if kind == "cat_rare":
                new = others.index[-1]
            else:
                new = rng.choice(others.index.to_numpy(), p=(others / others.sum()).to_numpy())
            out.loc[out.index[i], col] = _typed(train[col], new)
            truth.append({col})
        else:
            truth.append(set())
    if kind == "dependency":
        pairs = dependent_pairs(det, train)
        binned_train = {c: binned(train[c], kinds[c] == "numeric") for p in pairs for c in p}
        for i in range(len(rows)):
            a, b = pairs[rng.integers(len(pairs))]
            a_all = pd.concat([train[a], rows[a].iloc[[i]]], ignore_index=True)
            a_bin = binned(a_all, kinds[a] == "numeric")
            ab, bb = a_bin[:-1], binned_train[b]
            same_a = ab == a_bin[-1]
            share_b = np.bincount(bb) / len(bb)
            cond = np.bincount(bb[same_a], minlength=len(share_b)) / max(1, same_a.sum())
            ok = np.flatnonzero((share_b >= 0.05) & (cond < 0.01))
            if not len(ok) or same_a.sum() < 20:
                keep[i] = False
                truth[i] = {a, b}
                continue
            target = rng.choice(ok)
            donors = np.flatnonzero(bb == target)
            new = train[b].iloc[rng.choice(donors)]
            if new == rows[b].iloc[i]:
                keep[i] = False
            out.loc[out.index[i], b] = new
            truth[i] = {a, b}
    return out[keep].reset_index(drop=True), [t for t, k in zip(truth, keep) if k], keep


def _typed(col: pd.Series, value: str):
    """A category given as text back in the column's dtype (booleans, ints)."""
    if pd.api.types.is_bool_dtype(col):
        return value == "True" or value == "true"
    if pd.api.types.is_integer_dtype(col):
        return int(value)
    return value


class Baselines:
    """The per-column scores a user could build without the VAE."""

    def __init__(self, det, train: pd.DataFrame, seed: int = 0) -> None:
        self.det, self.names = det, [s.column for s in det.preprocessor_.spans]
        self.kinds = {s.column: s.kind for s in det.preprocessor_.spans}
        self.stats = {}
        for c in self.names:
            s = train[c]
            if self.kinds[c] == "numeric":
                v = s.astype(float)
                self.stats[c] = (v.mean(), v.std() or 1.0)
            elif self.kinds[c] in ("categorical", "boolean"):
                self.stats[c] = (s.astype(str).value_counts() + 0.5) / (len(s) + 1.0)
        sub = train.sample(min(len(train), 20_000), random_state=seed)
        X = det.preprocessor_.encode(det.schema_.validate(sub))
        h = int(min(max(2 * X.shape[1], 64), 256))
        self.ae = MLPRegressor(hidden_layer_sizes=(h, max(8, X.shape[1] // 4), h), max_iter=60,
                               early_stopping=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.ae.fit(X, X)
        self.owner = det.preprocessor_.dim_to_column()
        self.marg_median = np.median(self.marginal(sub), axis=0)
        self.ae_median = np.median(self.ae_sqerr(sub), axis=0)

    def marginal(self, df: pd.DataFrame) -> np.ndarray:
        out = np.zeros((len(df), len(self.names)))
        for j, c in enumerate(self.names):
            kind = self.kinds[c]
            if kind == "numeric":
                mean, std = self.stats[c]
                z = (df[c].astype(float) - mean) / std
                out[:, j] = np.nan_to_num(0.5 * z.to_numpy() ** 2, nan=0.0)
            elif kind in ("categorical", "boolean"):
                p = self.stats[c]
                freq = df[c].astype(str).map(p).to_numpy(dtype=float)
                out[:, j] = -np.log(np.where(np.isnan(freq), 0.5 / (p.sum() + 1), freq))
            # datetime: hour / weekday surprisal is not part of this baseline
        return out

    def ae_sqerr(self, df: pd.DataFrame) -> np.ndarray:
        X = self.det.preprocessor_.encode(self.det.schema_.validate(df))
        err = (self.ae.predict(X) - X) ** 2
        out = np.zeros((len(df), len(self.names)))
        np.add.at(out.T, self.owner, err.T)
        return out

    def scores(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        ae = self.ae_sqerr(df)
        return {"marginal": self.marginal(df) - self.marg_median, "ae_sqerr": ae,
                "ae_sqerr_med": ae - self.ae_median}


def hits(scores: np.ndarray, names: list[str], truth: list[set[str]], k: int) -> float:
    if len(truth) == 0:
        return float("nan")
    idx, _ = E.top_columns(scores, k)
    top = np.array(names, dtype=object)[idx]
    return float(np.mean([bool(set(t) & set(row)) for t, row in zip(truth, top)]))


def interval_coverage(det, rows: pd.DataFrame, corrupted: pd.DataFrame, truth: list[set[str]]) -> float:
    """Share of numeric corruptions named in the explanation whose interval [low, high]
    contains the row's original (uncorrupted) value."""
    ex = E.to_frame(det.explain(corrupted, explain_all=True)["explanation"])
    got = []
    for i, t in enumerate(truth):
        col = next(iter(t))
        hit = ex[(ex["row"] == i) & (ex["column"] == col) & (ex["kind"] == "numeric")]
        if len(hit):
            x = float(rows[col].iloc[i])
            got.append(hit["low"].iloc[0] <= x <= hit["high"].iloc[0])
    return float(np.mean(got)) if got else float("nan")


def run(name: str, n_rows: int) -> list[dict]:
    df, kwargs = load(name)
    perm = np.random.RandomState(0).permutation(len(df))
    n_test = min(n_rows * 3, len(df) // 4)
    test_idx, train_idx = perm[:n_test], perm[n_test:n_test + 20_000]
    train, pool = df.iloc[train_idx].reset_index(drop=True), df.iloc[test_idx].reset_index(drop=True)
    t0 = time.perf_counter()
    det = VAEAnomalyDetector(random_state=0, n_threads=1, **kwargs).fit(train)
    fit_s = time.perf_counter() - t0
    base = Baselines(det, train)
    cond_median = np.median(det.conditional_nll(train.iloc[:2000]).to_numpy(), axis=0)

    def cond(frame: pd.DataFrame) -> np.ndarray:
        return det.conditional_nll(frame).to_numpy() - cond_median

    def klall(frame: pd.DataFrame) -> np.ndarray:
        X = det.preprocessor_.encode(det.schema_.validate(frame))
        terms = det._terms_from_X(X, attribute=False)
        owner = det.preprocessor_.dim_to_column()
        kl = det.vae_.kl_occlusion(X, [np.flatnonzero(owner == j) for j in range(len(names))], det.typical_x_)
        return terms.column_nll - det.column_median_ + kl
    names = [s.column for s in det.preprocessor_.spans]
    out = []
    for kind in KINDS:
        rng = np.random.default_rng(KINDS.index(kind))
        rows = pool.iloc[:n_rows].reset_index(drop=True)
        if kind.startswith("num") and not numeric_candidates(det, train) or \
                kind.startswith("cat") and not categorical_candidates(det, train):
            continue
        corrupted, truth, kept = corrupt(kind, det, train, rows, rng)
        if len(corrupted) == 0:
            continue
        scores = {"vae": det.contributions(corrupted).to_numpy(), "vae_klall": klall(corrupted),
                  "vae_cond": cond(corrupted),
                  **base.scores(corrupted)}
        is_flagged = det.predict(corrupted) == -1
        flagged = float(np.mean(is_flagged))
        truth_f = [t for t, f in zip(truth, is_flagged) if f]
        cover = interval_coverage(det, rows[kept].reset_index(drop=True), corrupted, truth) \
            if kind.startswith("num") else float("nan")
        for method in METHODS:
            out.append({"dataset": name, "kind": kind, "method": method, "n": len(corrupted),
                        "hit@1": hits(scores[method], names, truth, 1),
                        "hit@3": hits(scores[method], names, truth, 3),
                        "hit@1_flagged": hits(scores[method][is_flagged], names, truth_f, 1),
                        "hit@3_flagged": hits(scores[method][is_flagged], names, truth_f, 3),
                        "flagged": flagged if method == "vae" else float("nan"),
                        "interval_covers_original": cover if method == "vae" else float("nan"),
                        "fit_s": round(fit_s, 1)})
        print(f"  {name:16s} {kind:10s} n={len(corrupted):4d} " + "  ".join(
            f"{r['method']}={r['hit@1']:.2f}/{r['hit@3']:.2f}" for r in out[-len(METHODS):]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300, help="held-out normal rows per corruption kind")
    ap.add_argument("--datasets", nargs="*", default=["demo", "german_credit", "bank_marketing", "nsl_kdd_train20"])
    args = ap.parse_args()
    datasets = [d for d in args.datasets if d == "demo" or (MIXED / f"{d}.parquet").is_file()]
    skipped = sorted(set(args.datasets) - set(datasets))
    if skipped:
        print(f"skipping {skipped}: not found under {MIXED}")
    rows = []
    for name in datasets:
        rows += run(name, args.rows)
    res = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    res.to_csv(RESULTS / "explain.csv", index=False, float_format="%.4f")
    summary = summarise(res)
    (RESULTS / "explain.json").write_text(json.dumps({"rows_per_kind": args.rows, "results": rows,
                                                      "summary": summary.to_dict(orient="records")}, indent=1))
    print(summary.to_markdown(index=False, floatfmt=".2f") if _has_tabulate() else summary.to_string(index=False))


def summarise(res: pd.DataFrame) -> pd.DataFrame:
    """Mean over datasets of hit@1 / hit@3 per corruption kind and method, with the target."""
    g = res.groupby(["kind", "method"], sort=False)[["hit@1", "hit@3"]].mean().unstack("method")
    out = pd.DataFrame({"kind": g.index})
    for m in METHODS:
        out[f"{m} hit@1"] = g[("hit@1", m)].to_numpy()
        out[f"{m} hit@3"] = g[("hit@3", m)].to_numpy()
    f = res[res["method"] == "vae"].groupby("kind", sort=False)[["hit@1_flagged", "flagged"]].mean()
    out["vae hit@1 (flagged rows)"] = f.loc[out["kind"], "hit@1_flagged"].to_numpy()
    out["flagged"] = f.loc[out["kind"], "flagged"].to_numpy()
    out["target"] = [TARGETS[k] for k in out["kind"]]
    return out


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
