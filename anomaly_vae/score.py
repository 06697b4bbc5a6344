"""Pure scoring math: scores from per-column terms, contributions, thresholds, p-values."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class ScoreTerms(NamedTuple):
    """Per-row scoring terms. anomaly_score = recon_nll + kl = column_nll.sum(1) + kl."""

    anomaly_score: np.ndarray   # (n,)
    recon_nll: np.ndarray       # (n,)
    kl: np.ndarray              # (n,)
    column_nll: np.ndarray      # (n, n_columns)


def column_nll(dim_nll: np.ndarray, owner: np.ndarray, n_columns: int) -> np.ndarray:
    """Sum per-dim NLL into per-column NLL. (n, n_dims) -> (n, n_columns)."""
    M = np.zeros((dim_nll.shape[1], n_columns), dtype=np.float64)
    M[np.arange(len(owner)), owner] = 1.0
    return dim_nll.astype(np.float64) @ M


def anomaly_scores(dim_nll: np.ndarray, kl: np.ndarray, owner: np.ndarray, n_columns: int) -> ScoreTerms:
    """recon NLL + KL per row, with the per-column breakdown. Higher = stranger (nats)."""
    col = column_nll(dim_nll, owner, n_columns)
    recon = col.sum(1)
    kl = kl.astype(np.float64)
    return ScoreTerms(recon + kl, recon, kl, col)


def feature_contributions(col_nll: np.ndarray, reference_median: np.ndarray) -> np.ndarray:
    """Each column's NLL minus its median NLL on calibration normals. (n, c) -> (n, c)."""
    return col_nll - reference_median[None, :]


def top_features(contrib: np.ndarray, names: Sequence[str], k: int = 3) -> list[str]:
    """The k columns with the largest positive contributions per row, as 'name:+1.23;...'."""
    if contrib.shape[1] == 0:
        return [""] * len(contrib)
    k = min(k, contrib.shape[1])
    idx = np.argpartition(-contrib, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(contrib, idx, 1)
    order = np.argsort(-vals, axis=1)
    idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
    names = np.asarray(names, dtype=object)
    return [";".join(f"{names[j]}:{v:+.2f}" for j, v in zip(r_idx, r_val) if v > 0)
            for r_idx, r_val in zip(idx, vals)]


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
