"""Preprocessor: fitted per-column statistics -> float32 matrix X plus the layout of its dims.

Layout of X (n_rows, n_dims), in this order:
  numeric block    numeric columns (transformed + standardised) and datetime parts (hour, weekday sin/cos)
  indicator block  one 0/1 missing-indicator per numeric/datetime column (also for columns with no
                   nulls in training: a value missing at score time, never seen missing before, then
                   costs about log(2 n_train) nats instead of being imputed into a typical row)
  categorical block one-hot per categorical/boolean column (vocabulary incl. <unk>, <null>)
Every fitted parameter is a JSON number/list/string: no pickle anywhere.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .errors import DataError, ModelFormatError
from .schema import Schema

UNK, NULL = "<unk>", "<null>"
# Day-of-month is deliberately not a part: a model trained on a window shorter than a month
# flags every later day as unseen (measured on the demo: 98% false alarms on a time split).
DATETIME_PARTS = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")
_CLIP = 50.0   # standardised values are clipped to +-_CLIP so one wild value cannot overflow
_ABSURD = 1e6  # a training value this many robust scales (IQR / 1.349) from the median is left out
               # of the fitted mean/std, with a warning: it is a sentinel or a unit error, not data
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Span:
    """Where one original column lives in X."""

    column: str
    kind: str                 # numeric | datetime | categorical | boolean
    start: int                # value dims [start, stop): numeric/datetime block or one-hot block
    stop: int
    indicator: int = -1       # index of the missing-indicator dim, -1 when none


class Encoded(NamedTuple):
    """Encoded rows without the one-hot zeros (`Preprocessor.encode_compact`).

    head (n, cat_start) float32: X's numeric and indicator blocks, X[:, :cat_start];
    codes (n, n_categorical) int64: per categorical/boolean column (`categorical_spans` order)
    the dim of X that holds its 1; n_dims: X's width.
    """

    head: np.ndarray
    codes: np.ndarray
    n_dims: int

    def __len__(self) -> int:
        return len(self.head)

    def take(self, rows: np.ndarray) -> "Encoded":
        """These rows (positions or a boolean mask), still compact."""
        return Encoded(self.head[rows], self.codes[rows], self.n_dims)

    def dense(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """X (or X[rows]) as `Preprocessor.encode` gives it: (n, n_dims) float32."""
        head, codes = (self.head, self.codes) if rows is None else (self.head[rows], self.codes[rows])
        X = np.zeros((len(head), self.n_dims), dtype=np.float32)
        X[:, :head.shape[1]] = head
        np.put_along_axis(X, codes, 1.0, axis=1)
        return X


def dense(X: np.ndarray | Encoded, rows: np.ndarray | None = None) -> np.ndarray:
    """X (or its `rows`) as a dense (n, n_dims) array, whichever form it is in."""
    if isinstance(X, Encoded):
        return X.dense(rows)
    return X if rows is None else X[rows]


class Preprocessor:
    """Fit on training rows only; `encode` turns a validated frame into X."""

    def __init__(self, numeric_transform: str = "standard", max_categories: int = 64,
                 min_category_count: int = 5) -> None:
        self.numeric_transform = numeric_transform
        self.max_categories = max_categories
        self.min_category_count = min_category_count
        self.params: dict[str, dict[str, Any]] = {}
        self.spans: list[Span] = []
        self.n_dims = 0

    # ---------------------------------------------------------------- fit
    def fit(self, df: pd.DataFrame, schema: Schema) -> "Preprocessor":
        if len(df) == 0:
            raise DataError("cannot fit the preprocessor on zero rows")
        self.params = {}
        for col in schema.features:
            s = df[col.name]
            if col.kind == "numeric":
                self.params[col.name] = self._fit_numeric(col.name, s.to_numpy("float64", na_value=np.nan))
                self.params[col.name]["integer"] = col.dtype.lower().startswith(("int", "uint"))
            elif col.kind == "datetime":
                self.params[col.name] = {"kind": "datetime", "has_missing": bool(s.isna().any()),
                                         "missing_rate": _smoothed_rate(int(s.isna().sum()), len(s)),
                                         "indicator": True}
            else:
                self.params[col.name] = self._fit_categorical(col.kind, s)
                self.params[col.name]["integer"] = col.dtype.lower().startswith(("int", "uint"))
        self._layout(schema)
        return self

    def _fit_numeric(self, name: str, x: np.ndarray) -> dict[str, Any]:
        ok = np.isfinite(x)
        if not ok.any():
            raise DataError(f"column '{name}': no finite values to fit on")
        v = x[ok]
        median = float(np.median(v))
        with np.errstate(over="ignore", invalid="ignore"):
            q1, q3 = np.percentile(v, [25, 75])
            scale = float((q3 - q1) / 1.349)
            if not np.isfinite(scale):             # quartiles near +-1.8e308: halve before subtracting
                scale = float((q3 / 2 - q1 / 2) / (1.349 / 2))
            scale = scale or _moments(v)[1] or 1.0
            dist = np.abs(v - median) / scale
        absurd = ~(dist <= _ABSURD)                # also catches inf/nan from an overflowing difference
        if absurd.all():
            absurd[:] = False
        if absurd.any():
            log.warning("column '%s': %d training value(s) lie more than %.0e robust scales from the "
                        "median (e.g. %r); they are left out of the standardisation (otherwise one such "
                        "value would make the column irrelevant to every score) and count as extreme "
                        "values; check the data", name, int(absurd.sum()), _ABSURD,
                        float(v[absurd][np.argmax(np.abs(v[absurd]))]))
        fit_v = v[~absurd]
        p: dict[str, Any] = {"kind": "numeric", "transform": self.numeric_transform,
                             "median": median, "center": median, "scale": scale,
                             "min": float(fit_v.min()), "max": float(fit_v.max()),
                             "has_missing": bool((~ok).any()),
                             "missing_rate": _smoothed_rate(int((~ok).sum()), len(x)), "indicator": True}
        if self.numeric_transform == "yeo-johnson":
            from sklearn.preprocessing import PowerTransformer      # fit only: scoring skips the import

            pt = PowerTransformer(method="yeo-johnson", standardize=False)
            with np.errstate(all="ignore"):
                pt.fit(((fit_v - median) / scale).reshape(-1, 1))
            lam = float(pt.lambdas_[0])
            # lambda outside [0, 2] makes one tail bounded (x -> inf maps to a finite value), which
            # would hide exactly the extreme values we are looking for; clip to keep both unbounded.
            p["lambda"] = float(np.clip(lam, 0.0, 2.0)) if np.isfinite(lam) else 1.0
        elif self.numeric_transform == "quantile":
            from sklearn.preprocessing import QuantileTransformer

            qt = QuantileTransformer(n_quantiles=int(min(1000, len(fit_v))), output_distribution="normal",
                                     subsample=100_000, random_state=0).fit(fit_v.reshape(-1, 1))
            p["quantiles"] = qt.quantiles_[:, 0].tolist()
            p["references"] = qt.references_.tolist()
        t = _transform(fit_v, p)
        if self.numeric_transform == "robust":     # median / IQR scale is the standardisation
            p["mean"], p["std"] = 0.0, 1.0
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                mean, std = float(t.mean()), float(t.std())
            if not (np.isfinite(mean) and np.isfinite(std)):     # squares overflow past ~1e154
                mean, std = _moments(t)
            p["mean"], p["std"] = mean, std or 1.0
        if not all(np.isfinite(p[k]) for k in ("median", "scale", "mean", "std")):
            raise DataError(f"column '{name}': cannot standardise the training values (range "
                            f"{p['min']:.3g} to {p['max']:.3g} overflows); rescale the column or exclude it")
        return p

    def _fit_categorical(self, kind: str, s: pd.Series) -> dict[str, Any]:
        values = _category_strings(s, kind)
        counts = values.value_counts(dropna=True)
        min_count = 1 if kind == "boolean" else self.min_category_count
        keep = counts[counts >= min_count].index[: self.max_categories - 2]
        vocab = sorted(str(v) for v in keep)
        if values.isna().any():
            vocab.append(NULL)
        vocab.append(UNK)
        return {"kind": kind, "vocab": vocab}

    def _layout(self, schema: Schema) -> None:
        spans, pos = [], 0
        needs_ind = []
        for col in schema.features:            # numeric block first
            p = self.params[col.name]
            if col.kind in ("numeric", "datetime"):
                width = 1 if col.kind == "numeric" else len(DATETIME_PARTS)
                spans.append(Span(col.name, col.kind, pos, pos + width))
                pos += width
                if p.get("indicator", p["has_missing"]):    # older model files: only columns with nulls
                    needs_ind.append(len(spans) - 1)
        for i in needs_ind:                    # then indicators
            s = spans[i]
            spans[i] = Span(s.column, s.kind, s.start, s.stop, indicator=pos)
            pos += 1
        for col in schema.features:            # then one-hot blocks
            if col.kind in ("categorical", "boolean"):
                width = len(self.params[col.name]["vocab"])
                spans.append(Span(col.name, col.kind, pos, pos + width))
                pos += width
        order = {c.name: i for i, c in enumerate(schema.features)}
        self.spans = sorted(spans, key=lambda s: order[s.column])
        self.n_dims = pos

    # ------------------------------------------------------------- encode
    def encode(self, data: pd.DataFrame | dict[str, Any]) -> np.ndarray:
        """Validated columns -> float32 X of shape (n_rows, n_dims).

        `data` is a frame from `Schema.validate` or a {name: pyarrow Array} mapping from
        `schema.validate_arrow`; both give the same X. Arrow columns are read with Arrow
        kernels and numpy (no per-column pandas copies).
        """
        return self.encode_compact(data).dense()

    def encode_compact(self, data: pd.DataFrame | dict[str, Any]) -> Encoded:
        """`encode` without the one-hot zeros (`Encoded`: X's head and the index of each
        one-hot block's 1). Scoring reads the one-hot blocks as these indices."""
        n = len(data) if isinstance(data, pd.DataFrame) else (
            len(next(iter(data.values()))) if len(data) else 0)
        head = np.zeros((n, self.cat_start), dtype=np.float32)
        codes = np.empty((n, len(self.categorical_spans)), dtype=np.int64)
        block = 0
        for span in sorted(self.spans, key=lambda s: s.start):
            p = self.params[span.column]
            s = data[span.column]
            if span.kind == "numeric":
                x = _float_values(s)
                missing = ~np.isfinite(x)
                x = np.where(missing, p["median"], x)
                z = (_transform(x, p) - p["mean"]) / p["std"]
                head[:, span.start] = np.clip(np.nan_to_num(z, nan=0.0), -_CLIP, _CLIP)
            elif span.kind == "datetime":
                seconds, missing = _epoch_seconds(s)
                head[:, span.start:span.stop] = _datetime_parts(seconds, missing)
            else:
                codes[:, block] = span.start + _codes(s, span.kind, p["vocab"])
                block += 1
                continue
            if span.indicator >= 0:
                head[:, span.indicator] = missing
        return Encoded(head, codes, self.n_dims)

    @property
    def cat_start(self) -> int:
        """First dim of the one-hot blocks (they fill X's tail); n_dims when there are none."""
        spans = self.categorical_spans
        return min(a for a, _ in spans) if spans else self.n_dims

    # ---------------------------------------------------- introspection
    @property
    def numeric_dims(self) -> np.ndarray:
        """Indices of Gaussian-modelled dims (numeric block)."""
        return np.array([d for s in self.spans if s.kind in ("numeric", "datetime")
                         for d in range(s.start, s.stop)], dtype=np.int64)

    @property
    def indicator_dims(self) -> np.ndarray:
        return np.array(sorted(s.indicator for s in self.spans if s.indicator >= 0), dtype=np.int64)

    @property
    def indicator_rates(self) -> np.ndarray:
        """Smoothed training missing rate of each indicator dim, in `indicator_dims` order."""
        rate = {s.indicator: self.params[s.column].get("missing_rate", 0.5) for s in self.spans
                if s.indicator >= 0}
        return np.array([rate[d] for d in self.indicator_dims], dtype=np.float64)

    @property
    def n_varying_dims(self) -> int:
        """Dims that vary in the training data: all but the indicators of columns that had no
        missing values (the network size rule counts these, so always-present indicators do
        not change the architecture)."""
        silent = sum(1 for s in self.spans if s.indicator >= 0 and not self.params[s.column]["has_missing"])
        return self.n_dims - silent

    @property
    def categorical_spans(self) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self.spans if s.kind in ("categorical", "boolean")]

    def dim_to_column(self) -> np.ndarray:
        """(n_dims,) index of the original column (position in `spans`) owning each dim."""
        owner = np.zeros(self.n_dims, dtype=np.int64)
        for i, s in enumerate(self.spans):
            owner[s.start:s.stop] = i
            if s.indicator >= 0:
                owner[s.indicator] = i
        return owner

    def decode(self, X: np.ndarray, clip: bool = True) -> pd.DataFrame:
        """Approximate inverse of `encode` for numeric/categorical columns (used by `sample`).

        Numeric values are clipped to the training range (clip=False: not; `sample` maps them
        onto the training marginal instead) and integer columns rounded (nullable Int64); categories never come back as <unk>, <null> comes back as a null, and integer
        categoricals come back as Int64. Datetime columns cannot be inverted from cyclic parts
        and come back as hour-of-day.
        """
        out = {}
        for span in self.spans:
            p = self.params[span.column]
            if span.kind == "numeric":
                t = X[:, span.start].astype("float64") * p["std"] + p["mean"]
                vals = _inverse_transform(t, p)
                if clip and "min" in p:              # older model files lack the range
                    vals = np.clip(vals, p["min"], p["max"])
                if span.indicator >= 0:
                    vals = np.where(X[:, span.indicator] > 0.5, np.nan, vals)
                out[span.column] = pd.array(np.round(vals), dtype="Int64") if p.get("integer") else vals
            elif span.kind == "datetime":
                ang = np.arctan2(X[:, span.start], X[:, span.start + 1])
                out[span.column + "_hour"] = np.mod(ang / (2 * np.pi) * 24, 24)
            else:
                vocab = np.array(p["vocab"], dtype=object)
                logits = X[:, span.start:span.stop].astype(np.float64)
                logits[:, vocab == UNK] = -np.inf          # <unk> is a bucket, not a value to emit
                vals = np.where(np.isfinite(logits).any(1), vocab[np.argmax(logits, axis=1)], NULL)
                vals = np.where(vals == NULL, None, vals)
                if span.kind == "boolean":
                    vals = pd.array([None if v is None else v == "true" for v in vals], dtype="boolean")
                elif p.get("integer"):
                    vals = pd.array(pd.to_numeric(pd.Series(vals, dtype=object)), dtype="Int64")
                out[span.column] = vals
        return pd.DataFrame(out)

    # ------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {"numeric_transform": self.numeric_transform, "max_categories": self.max_categories,
                "min_category_count": self.min_category_count, "params": self.params,
                "spans": [s.__dict__ for s in self.spans], "n_dims": self.n_dims}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessor":
        try:
            pre = cls(d["numeric_transform"], d["max_categories"], d["min_category_count"])
            pre.params = d["params"]
            pre.spans = [Span(**s) for s in d["spans"]]
            pre.n_dims = int(d["n_dims"])
        except (KeyError, TypeError) as exc:
            raise ModelFormatError(f"preprocess.json is malformed: {exc}") from exc
        return pre


# -------------------------------------------------------------- helpers
def _transform(x: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """Per-column monotone transform before standardisation. (n,) -> (n,)"""
    t = p["transform"]
    with np.errstate(all="ignore"):
        if t == "standard":
            return x
        if t == "robust":
            return (x - p["center"]) / p["scale"]
        if t == "signed-log":
            return np.sign(x) * np.log1p(np.abs(x))
        if t == "yeo-johnson":
            from scipy import stats

            r = np.clip((x - p["center"]) / p["scale"], -1e6, 1e6)
            return np.clip(stats.yeojohnson(r, lmbda=p["lambda"]), -1e12, 1e12)
        if t == "quantile":
            u = np.interp(x, p["quantiles"], p["references"])
            lo, hi = p["quantiles"][0], p["quantiles"][-1]
            # beyond the training range keep growing (linearly in robust units) instead of saturating
            return u + np.where(x > hi, (x - hi) / p["scale"], 0) + np.where(x < lo, (x - lo) / p["scale"], 0)
    raise ModelFormatError(f"unknown numeric transform '{t}'")


def _inverse_transform(t: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    kind = p["transform"]
    with np.errstate(all="ignore"):
        if kind == "standard":
            return t
        if kind == "robust":
            return t * p["scale"] + p["center"]
        if kind == "signed-log":
            return np.sign(t) * np.expm1(np.abs(t))
        if kind == "yeo-johnson":
            lam = p["lambda"]
            r = np.where(
                t >= 0,
                np.expm1(np.log1p(t * lam) / lam) if abs(lam) > 1e-8 else np.expm1(t),
                1 - np.exp(np.log1p(-(2 - lam) * t) / (2 - lam)) if abs(lam - 2) > 1e-8 else -np.expm1(-t),
            )
            return r * p["scale"] + p["center"]
        if kind == "quantile":
            return np.interp(t, p["references"], p["quantiles"])
    raise ModelFormatError(f"unknown numeric transform '{kind}'")


def _float_values(s: Any) -> np.ndarray:
    """A numeric column (pandas Series or float64 Arrow array) as float64 numpy, NaN for nulls."""
    if isinstance(s, pd.Series):
        return s.to_numpy("float64", na_value=np.nan)
    return s.to_numpy(zero_copy_only=False)


def _epoch_seconds(s: Any) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps (pandas datetime Series or Arrow timestamp array; tz-aware values count in
    UTC) -> whole seconds since the epoch (int64, 0 where missing) and the missing mask."""
    if isinstance(s, pd.Series):
        missing = s.isna().to_numpy()
        ticks = s.to_numpy("datetime64[ns]").view(np.int64)
        per_second = 10 ** 9
    else:
        import pyarrow as pa
        import pyarrow.compute as pc

        missing = s.is_null().to_numpy(zero_copy_only=False)
        ticks = pc.fill_null(s.cast(pa.int64()), 0).to_numpy()
        per_second = {"s": 1, "ms": 10 ** 3, "us": 10 ** 6, "ns": 10 ** 9}[s.type.unit]
    seconds = np.floor_divide(ticks, per_second)
    seconds[missing] = 0
    return seconds, missing


def _datetime_parts(seconds: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Epoch seconds -> (n, 4) sin/cos of hour-of-day (to the minute) and day-of-week; missing -> zeros."""
    second_of_day = np.mod(seconds, 86400)
    hour = (second_of_day // 3600 + (second_of_day % 3600 // 60) / 60.0) / 24.0
    dow = np.mod(np.floor_divide(seconds, 86400) + 3, 7) / 7.0      # 1970-01-01 was a Thursday (3)
    ang = 2 * np.pi * np.stack([hour, dow], axis=1)
    parts = np.empty((len(seconds), 4), dtype=np.float64)
    parts[:, 0::2], parts[:, 1::2] = np.sin(ang), np.cos(ang)
    parts[missing] = 0.0
    return parts


def _moments(v: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of finite values without overflow: computed on v / max|v|
    (a plain v.std() squares the values, so anything above ~1e154 gives inf). (n,) -> 2 floats"""
    if len(v) == 0:
        return 0.0, 0.0
    top = float(np.max(np.abs(v)))
    if top == 0.0 or not np.isfinite(top):
        return float(np.mean(v)) if np.isfinite(top) else float("nan"), 0.0
    u = v / top
    return float(np.mean(u) * top), float(np.std(u) * top)


def _smoothed_rate(k: int, n: int) -> float:
    """Missing rate with half a pseudo-count each way: never 0 or 1, so log-likelihoods stay finite."""
    return (k + 0.5) / (n + 1.0)


def _category_strings(s: pd.Series, kind: str) -> pd.Series:
    if kind == "boolean":
        return s.astype("boolean").map({True: "true", False: "false"}, na_action="ignore").astype("string")
    return s.astype("string")


def _category_codes(values: pd.Series, vocab: list[str]) -> np.ndarray:
    """Strings -> indices into vocab; null -> <null> (or <unk>), unseen -> <unk>."""
    unk = len(vocab) - 1
    null = vocab.index(NULL) if NULL in vocab else unk
    isna = values.isna().to_numpy()
    codes = pd.Index(vocab[:-1]).get_indexer(values.fillna(UNK)).astype(np.int64)
    codes[codes < 0] = unk
    codes[isna] = null
    return codes


def _codes(s: Any, kind: str, vocab: list[str]) -> np.ndarray:
    """A categorical/boolean column (pandas Series, or Arrow string / dictionary / bool array)
    -> int64 indices into vocab, with the rules of `_category_codes`."""
    if isinstance(s, pd.Series):
        return _category_codes(_category_strings(s, kind), vocab)
    import pyarrow as pa
    import pyarrow.compute as pc

    unk = len(vocab) - 1
    null = vocab.index(NULL) if NULL in vocab else unk
    known = vocab[:-1]

    def lookup(strings: Any) -> np.ndarray:
        idx = pc.index_in(strings, value_set=pa.array(known, type=pa.string()))
        return pc.fill_null(idx, unk).to_numpy(zero_copy_only=False).astype(np.int64)

    if pa.types.is_boolean(s.type):
        table = lookup(pa.array(["false", "true"]))
        codes = table[pc.fill_null(s, False).cast(pa.int8()).to_numpy(zero_copy_only=False)]
    elif pa.types.is_dictionary(s.type):          # look up the few distinct values only
        table = lookup(s.dictionary.cast(pa.string()))
        codes = table[pc.fill_null(s.indices, 0).to_numpy(zero_copy_only=False).astype(np.int64)] \
            if len(table) else np.full(len(s), unk, dtype=np.int64)
    else:
        codes = lookup(s)
    if s.null_count:
        codes[s.is_null().to_numpy(zero_copy_only=False)] = null
    return codes
