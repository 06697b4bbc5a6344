"""Synthetic rows: draws from the VAE, numeric marginals mapped onto the training marginals.

The decoder models a numeric column as a Gaussian in standardised units with one variance per
column. For a skewed, bounded column (an amount, a distance) that noise is as wide for a 40.00
grocery purchase as for a 4,000 flight, so raw draws fall below the training minimum and, clipped
there, piled up at it (demo model: 9% of amounts and 44% of distances sat exactly on the
minimum). `sample_rows` keeps the model's draws for the structure of a row (which rows are high
or low, given the latent code and the other columns) and maps each numeric column monotonically
onto its training marginal: a draw at the model's q-th quantile becomes the training data's q-th
quantile (a copula-style calibration; ranks, and so rank correlations, are unchanged).
Timestamps come back as timestamps: hour of day and weekday from the model, the date uniform
over the training range among the days with that weekday.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .preprocess import Preprocessor, _inverse_transform
from .schema import Schema

N_QUANTILES = 513             # stored training quantiles per numeric column (JSON numbers)
MIN_REFERENCE_DRAWS = 20_000  # draws used to estimate the model's marginal CDF for small n


def fit_marginals(df: pd.DataFrame, schema: Schema) -> dict[str, dict[str, Any]]:
    """Training marginals for sampling: quantiles of numeric columns, the range of datetimes."""
    out: dict[str, dict[str, Any]] = {}
    for col in schema.features:
        s = df[col.name]
        if col.kind == "numeric":
            v = s.to_numpy("float64", na_value=np.nan)
            v = v[np.isfinite(v)]
            if len(v):
                out[col.name] = {"kind": "numeric",
                                 "quantiles": np.quantile(v, np.linspace(0, 1, N_QUANTILES)).tolist()}
        elif col.kind == "datetime" and s.notna().any():
            tz = getattr(s.dt, "tz", None)
            out[col.name] = {"kind": "datetime", "min": str(s.min()), "max": str(s.max()),
                             "tz": None if tz is None else str(tz)}
    return out


def match_quantiles(values: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Map finite values onto a marginal given by equally spaced quantiles, by rank. (n,) -> (n,)

    Ties (rare in continuous draws) share their mean rank; non-finite values stay as they are.
    """
    from scipy.stats import rankdata     # here: importing scipy.stats takes ~1 s, and scoring never samples

    out = np.array(values, dtype=np.float64, copy=True)
    ok = np.isfinite(out)
    if ok.sum() == 0:
        return out
    u = (rankdata(out[ok]) - 0.5) / ok.sum()
    out[ok] = np.interp(u, np.linspace(0, 1, len(quantiles)), quantiles)
    return out


def sample_rows(vae, pre: Preprocessor, marginals: dict[str, dict[str, Any]], n: int,
                seed: int = 0) -> pd.DataFrame:
    """n synthetic rows in the original schema (see module docstring). Deterministic by seed.

    `vae` is the fitted `model.VAE`; `marginals` from `fit_marginals` (older models have none:
    numeric draws are then clipped to the training range and timestamps come back as hours).
    """
    n_draw = max(n, MIN_REFERENCE_DRAWS) if marginals else n
    X = vae.sample(n_draw, seed=seed)
    df = pre.decode(X, clip=not marginals)
    rng = np.random.default_rng(seed)
    for span in pre.spans:
        m = marginals.get(span.column)
        if m is None:
            continue
        p = pre.params[span.column]
        if span.kind == "numeric":     # from X: decode() has rounded integer columns (ties)
            v = _inverse_transform(X[:, span.start].astype(np.float64) * p["std"] + p["mean"], p)
            if span.indicator >= 0:
                v = np.where(X[:, span.indicator] > 0.5, np.nan, v)
            v = match_quantiles(v, np.asarray(m["quantiles"]))
            df[span.column] = pd.array(np.round(v), dtype="Int64") if p.get("integer") else v
        elif span.kind == "datetime":
            ts = _timestamps(X[:, span.start:span.stop], m, rng)
            if span.indicator >= 0:
                ts = ts.where(X[:, span.indicator] < 0.5)
            pos = list(df.columns).index(span.column + "_hour")
            df = df.drop(columns=[span.column + "_hour"])
            df.insert(pos, span.column, ts)
    return df.iloc[:n].reset_index(drop=True)


def _timestamps(parts: np.ndarray, m: dict[str, Any], rng: np.random.Generator) -> pd.Series:
    """Drawn (hour sin, hour cos, weekday sin, weekday cos) -> timestamps in the training range:
    hour and weekday from the angles, the date uniform among the range's days with that weekday."""
    hour = np.mod(np.arctan2(parts[:, 0], parts[:, 1]) / (2 * np.pi) * 24, 24)
    dow = np.mod(np.round(np.arctan2(parts[:, 2], parts[:, 3]) / (2 * np.pi) * 7), 7).astype(np.int64)
    first = pd.Timestamp(m["min"]).tz_localize(None).normalize()
    last = pd.Timestamp(m["max"]).tz_localize(None).normalize()
    n_days = int((last - first).days) + 1
    # days d in [0, n_days) with (first + d).weekday() == dow: offset0 + 7 k
    offset0 = (dow - first.weekday()) % 7
    count = np.maximum(1, (n_days - offset0 + 6) // 7)
    day = offset0 + 7 * np.floor(rng.random(len(dow)) * count).astype(np.int64)
    seconds = np.round(hour * 3600).astype(np.int64)
    ts = pd.Series(first + pd.to_timedelta(day, unit="D") + pd.to_timedelta(seconds, unit="s"))
    return ts.dt.tz_localize(m["tz"]) if m.get("tz") else ts
