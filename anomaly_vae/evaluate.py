"""Evaluation metrics for a detector on labelled data (pure; no MLflow, no torch)."""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from .errors import DataError


class Scorer(Protocol):
    """What `evaluate` needs of a fitted detector (VAEAnomalyDetector; evaluate sits below it)."""

    threshold_: float

    def score_terms(self, X: Any) -> Any: ...

# label rule shared by fit, evaluate, the CLI and retraining: 1 / True = anomaly, 0 / False = normal
ANOMALY_TEXT = ("1", "1.0", "true", "yes")
NORMAL_TEXT = ("0", "0.0", "false", "no")


def anomaly_mask(values: Any, name: str = "y", strict: bool = True) -> np.ndarray:
    """Labels -> boolean anomaly mask: 1 / True (also as text) is an anomaly, 0 / False normal.

    Any other value raises DataError naming `name`: a label column of categories, ids or
    sklearn's -1 = outlier convention would otherwise be read silently as "all normal".
    strict=False (the `y` argument of fit, which sklearn tooling fills with class labels)
    only refuses -1, whose convention is the opposite of ours, and counts the rest as normal.
    Missing labels are refused in both modes.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"label {name}: expected one label per row (1-D), got shape {arr.shape}")
    if arr.dtype.kind == "b":
        return arr.astype(bool)
    missing = pd.isna(arr) if arr.dtype.kind in "fO" else np.zeros(len(arr), dtype=bool)
    if missing.any():
        raise DataError(f"label {name}: {int(missing.sum()):,} of {len(arr):,} values are missing; "
                        "fill or drop them (1 = anomaly, 0 = normal)")
    if arr.dtype.kind in "iuf":
        bad = ~np.isin(arr, (0, 1))
        mask = arr == 1
    else:
        text = pd.Series(arr.astype(object)).astype("string").str.strip().str.lower()
        mask = text.isin(ANOMALY_TEXT).fillna(False).to_numpy(dtype=bool)
        bad = ~(mask | text.isin(NORMAL_TEXT).fillna(False).to_numpy(dtype=bool))
    if not strict:
        bad &= np.isin(pd.Series(arr).astype(str).to_numpy(), ("-1", "-1.0"))
    if bad.any():
        examples = list(pd.unique(pd.Series(arr[bad]).astype(str)))[:5]
        hint = (" (sklearn's outlier convention is not accepted: map -1 to 1 and its 1 = inlier to 0)"
                if "-1" in examples else "")
        raise DataError(f"label {name}: expected 1 = anomaly / 0 = normal (or true/false), found "
                        f"{int(bad.sum()):,} of {len(arr):,} other values, e.g. {examples}{hint}")
    return mask


def evaluate_scores(y_true: Any, scores: Any, flags: Any) -> dict[str, Any]:
    """Ranking and flagging quality of anomaly scores against 0/1 labels.

    Parameters
    ----------
    y_true : (n,) labels, truthy / 1 = anomaly.
    scores : (n,) anomaly scores, higher = stranger. Non-finite scores (a row the model
        could not score) rank as the most anomalous.
    flags : (n,) booleans, True where the detector flagged the row.

    Returns
    -------
    dict with auroc and auprc (None when only one class is present), fpr (flag rate on
    normals, None without normals), recall (flag rate on anomalies, None without anomalies),
    n, n_anomalies, flagged (number of flagged rows) and flag_rate.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    f = np.asarray(flags).astype(bool).ravel()
    if not len(y) == len(s) == len(f):
        raise DataError(f"evaluate_scores: lengths differ (labels {len(y)}, scores {len(s)}, flags {len(f)})")
    if len(y) == 0:
        raise DataError("evaluate_scores: no rows to evaluate")
    finite = np.isfinite(s)
    if not finite.all():
        top = s[finite].max() + 1.0 if finite.any() else 0.0
        s = np.where(finite, s, top)
    n_anom = int(y.sum())
    two_classes = 0 < n_anom < len(y)
    return {
        "auroc": float(roc_auc_score(y, s)) if two_classes else None,
        "auprc": float(average_precision_score(y, s)) if two_classes else None,
        "fpr": float(f[~y].mean()) if n_anom < len(y) else None,
        "recall": float(f[y].mean()) if n_anom else None,
        "n": int(len(y)),
        "n_anomalies": n_anom,
        "flagged": int(f.sum()),
        "flag_rate": float(f.mean()),
    }


def labels_from(df: pd.DataFrame, label: str) -> np.ndarray:
    """Boolean anomaly mask from a label column; DataError naming the column when unusable."""
    if label not in df.columns:
        raise DataError(f"label column '{label}' not found; columns are {list(df.columns)}")
    return anomaly_mask(df[label].to_numpy(), f"column '{label}'")


def evaluate(det: Scorer, df: pd.DataFrame, label: str | None = "label") -> dict[str, Any]:
    """Score `df` with `det` (label column removed first) and compare with the labels.

    ``label=None`` treats every row as normal (fpr only). Adds ``threshold`` to the
    `evaluate_scores` keys.
    """
    if label is None:
        y = np.zeros(len(df), dtype=bool)
        X = df
    else:
        y = labels_from(df, label)
        X = df.drop(columns=[label])
    terms = det.score_terms(X)
    flags = terms.anomaly_score > det.threshold_
    return {**evaluate_scores(y, terms.anomaly_score, flags), "threshold": float(det.threshold_)}
