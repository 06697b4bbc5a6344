"""Pure scoring math: scores from per-column terms, contributions, thresholds, p-values."""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


class ScoreTerms(NamedTuple):
    """Per-row scoring terms. anomaly_score = recon_nll + kl = column_nll.sum(1) + kl."""

    anomaly_score: np.ndarray   # (n,)
    recon_nll: np.ndarray       # (n,)
    kl: np.ndarray              # (n,)
    column_nll: np.ndarray      # (n, n_columns)
    column_kl: np.ndarray | None = None   # (n, n_columns) KL each column causes (flagged rows), else None


def column_nll(dim_nll: np.ndarray, owner: np.ndarray, n_columns: int) -> np.ndarray:
    """Sum per-dim NLL into per-column NLL, float32 segment sums. (n, n_dims) -> (n, n_columns)."""
    owner = np.asarray(owner)
    out = np.zeros((dim_nll.shape[0], n_columns), dtype=np.float32)
    if dim_nll.shape[1] == 0 or dim_nll.shape[0] == 0:
        return out
    order = np.argsort(owner, kind="stable")
    cols, starts = np.unique(owner[order], return_index=True)
    out[:, cols] = np.add.reduceat(dim_nll[:, order].astype(np.float32, copy=False), starts, axis=1)
    return out


def anomaly_scores(dim_nll: np.ndarray, kl: np.ndarray, owner: np.ndarray, n_columns: int) -> ScoreTerms:
    """recon NLL + KL per row, with the per-column breakdown. Higher = stranger (nats)."""
    return scores_from_columns(column_nll(dim_nll, owner, n_columns), kl)


def scores_from_columns(col_nll: np.ndarray, kl: np.ndarray) -> ScoreTerms:
    """ScoreTerms from per-column NLL (n, c) and KL (n,); the row sums are float64."""
    recon = col_nll.sum(1, dtype=np.float64)
    kl = kl.astype(np.float64)
    return ScoreTerms(recon + kl, recon, kl, col_nll)


def feature_contributions(terms: ScoreTerms, reference_median: np.ndarray) -> np.ndarray:
    """Each column's NLL minus its median NLL on calibration normals, plus the KL the column
    causes where that was measured (`ScoreTerms.column_kl`). (n, c)"""
    contrib = terms.column_nll - reference_median[None, :]
    return contrib if terms.column_kl is None else contrib + terms.column_kl


def top_columns(contrib: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest contributions per row, largest first. (n, c) -> (n, k) x2"""
    n, c = contrib.shape
    k = min(k, c)
    if k == 0:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=contrib.dtype)
    idx = np.argpartition(-contrib, k - 1, axis=1)[:, :k] if k < c else np.tile(np.arange(c), (n, 1))
    vals = np.take_along_axis(contrib, idx, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)


def top_features(contrib: np.ndarray, names: Sequence[str], k: int = 3) -> pd.Series:
    """The k columns with the largest positive contributions per row, as 'name:+1.23;...'.
    (n, c) -> string Series of length n ('' when no column is above its normal median),
    Arrow-backed: no per-row Python strings."""
    return pd.Series(pd.arrays.ArrowStringArray(top_feature_text(contrib, names, k)))


def top_feature_text(contrib: np.ndarray, names: Sequence[str], k: int = 3) -> pa.StringArray:
    """`top_features` as an Arrow string array.

    Built with Arrow kernels (no per-row Python), as this runs on every scored row: each
    positive entry's 'name:+x.xx' is taken from a table of them (`_entry_table`; entries above
    its range are formatted), then joined per row as a list.
    """
    n, c = contrib.shape
    if c == 0 or n == 0:
        return pa.array([""] * n, type=pa.string())
    idx, vals = top_columns(contrib, k)
    keep = vals > 0
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(keep.sum(1), out=offsets[1:])
    cols, cents = idx[keep].astype(np.int64), _cents(vals[keep])
    table, m, prefix = _entry_table(tuple(names))
    inside = cents < m
    if inside.all():
        text = table.take(pa.array(cols * m + cents))
    else:                               # rare: contributions beyond the table, formatted here
        text = in_order([table.take(pa.array(cols[inside] * m + cents[inside])),
                         pc.binary_join_element_wise(prefix.take(pa.array(cols[~inside])),
                                                     _cents_text(cents[~inside]), "")],
                        [np.flatnonzero(inside), np.flatnonzero(~inside)])
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), text), ";")


def in_order(parts: Sequence[pa.Array], positions: Sequence[np.ndarray]) -> pa.Array:
    """Arrays made for disjoint sets of positions (parts[i] holds positions[i], in that order),
    as one array in position order."""
    order = np.concatenate(positions)
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.arange(len(order))
    return pa.concat_arrays(parts).take(pa.array(inverse))


TABLE_ENTRIES = 1 << 18     # size of `_entry_table` (about 5 MB for 20 columns)


@functools.lru_cache(maxsize=8)
def _entry_table(names: tuple[str, ...]) -> tuple[pa.Array, int, pa.Array]:
    """('name:+x.xx' for every column and every value 0.00 .. (m - 1) / 100, column-major; m;
    the 'name:+' prefixes): m = TABLE_ENTRIES / columns, between 100 and 10,000 (up to 99.99
    nats). Made once per column set, so that top_features is one `take` per batch."""
    c = len(names)
    m = int(np.clip(TABLE_ENTRIES // max(c, 1), 100, 10_000))
    prefix = pa.array([f"{x}:+" for x in names], type=pa.string())
    values = _cents_text(np.arange(m, dtype=np.int64))
    return pc.binary_join_element_wise(prefix.take(pa.array(np.repeat(np.arange(c), m))),
                                       values.take(pa.array(np.tile(np.arange(m), c))), ""), m, prefix


def _cents(values: np.ndarray) -> np.ndarray:
    """|values| in hundredths, rounded (int64)."""
    return np.round(np.abs(values) * 100).astype(np.int64)


def _cents_text(cents: np.ndarray) -> pa.Array:
    """Hundredths -> strings with exactly two decimals (300 -> '3.00'), vectorised."""
    whole = pa.array(cents // 100).cast(pa.string())
    frac = pc.utf8_lpad(pa.array(cents % 100).cast(pa.string()), 2, padding="0")
    return pc.binary_join_element_wise(whole, frac, ".")


def calibrate_threshold(calibration_scores: np.ndarray, target_fpr: float) -> float:
    """Conformal (1 - alpha) threshold on held-out normal scores.

    The ceil((n + 1)(1 - alpha))-th smallest calibration score, so that a new normal row
    exceeds it with probability <= alpha (exchangeability). When n is too small for
    that rank to exist, the largest calibration score is used (flag rate then < alpha
    cannot be guaranteed; the provenance records n).
    """
    s = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    s = s[np.isfinite(s)]
    if len(s) == 0:
        raise ValueError("no finite calibration scores")
    rank = int(np.ceil((len(s) + 1) * (1.0 - target_fpr)))
    return float(s[min(rank, len(s)) - 1])


def contamination_threshold(train_scores: np.ndarray, contamination: float) -> float:
    """Threshold flagging the top `contamination` fraction of (possibly dirty) training scores."""
    s = np.asarray(train_scores, dtype=np.float64)
    return float(np.quantile(s[np.isfinite(s)], 1.0 - contamination))


def p_values(scores: np.ndarray, calibration_scores: np.ndarray) -> np.ndarray:
    """Conformal p-value (1 + #{cal >= s}) / (n_cal + 1). (n,) -> (n,)"""
    cal = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    n_ge = len(cal) - np.searchsorted(cal, np.asarray(scores, dtype=np.float64), side="left")
    return (1.0 + n_ge) / (len(cal) + 1.0)
