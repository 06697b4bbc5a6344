"""Population stability index (PSI) between a model's training data and new data (pure).

PSI = sum_i (a_i - e_i) * ln(a_i / e_i) over bins, with expected fractions ``e`` (training)
and actual fractions ``a`` (new data), both floored at ``eps``. Rules of thumb: < 0.1 stable,
0.1-0.25 moderate shift, > 0.25 major shift.

Bins come from the profile the detector stores at fit (``VAEAnomalyDetector.reference_``):
numeric columns use the training deciles plus one "missing" bin; categorical and boolean
columns use the training categories, a ``<null>`` bin and one ``<new>`` bin for values never
seen in training. Scores use the deciles of the reference scores (e.g. the calibration
scores) plus one bin for non-finite scores.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import SchemaMismatchError

DEFAULT_EPS = 1e-4
DEFAULT_ALERT = 0.2
NULL = "<null>"
NEW = "<new>"
SCORE_ROW = "anomaly_score"


def psi(expected_fractions: Sequence[float], actual_fractions: Sequence[float],
        eps: float = DEFAULT_EPS) -> float:
    """PSI between two binned distributions over the same bins. (k,), (k,) -> float.

    Fractions are floored at ``eps`` (an empty bin would make the log infinite) and not
    renormalised, so PSI is 0 for identical inputs and grows with the shift.
    """
    e = np.asarray(expected_fractions, dtype=np.float64)
    a = np.asarray(actual_fractions, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1:
        raise ValueError(f"expected two 1-D arrays of equal length, got shapes {e.shape} and {a.shape}")
    if len(e) == 0:
        return 0.0
    e, a = np.maximum(e, eps), np.maximum(a, eps)
    return float(np.sum((a - e) * np.log(a / e)))


def numeric_fractions(values: Any, edges: Sequence[float]) -> tuple[np.ndarray, float]:
    """Fractions of finite values in the bins cut at ``edges`` and the missing fraction.

    Bin i holds edges[i-1] <= v < edges[i] (the detector's profile rule). (n,) -> (len(edges)+1,), float
    """
    v = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy("float64", na_value=np.nan)
    finite = v[np.isfinite(v)]
    n_edges = len(edges)
    if len(finite) == 0:
        return np.zeros(n_edges + 1), (1.0 if len(v) else 0.0)
    counts = np.bincount(np.searchsorted(np.asarray(edges, dtype=np.float64), finite, side="right"),
                         minlength=n_edges + 1)
    return counts / len(finite), float(1.0 - len(finite) / len(v))


def _numeric_psi(ref: Mapping[str, Any], s: pd.Series, eps: float) -> tuple[float, float]:
    ref_frac = np.asarray(ref["fractions"], dtype=np.float64)
    ref_miss = float(ref.get("missing", 0.0))
    new_frac, new_miss = numeric_fractions(s, ref["edges"])
    expected = np.r_[ref_frac * (1.0 - ref_miss), ref_miss]
    actual = np.r_[new_frac * (1.0 - new_miss), new_miss]
    return psi(expected, actual, eps), new_miss


def _categorical_psi(ref: Mapping[str, Any], s: pd.Series, eps: float) -> tuple[float, float]:
    freq = {str(k): float(v) for k, v in ref["freq"].items()}
    values = s.astype("string").fillna(NULL)
    new = values.value_counts(normalize=True)
    known = [k for k in freq if k != NEW]
    actual = [float(new.get(k, 0.0)) for k in known]
    unseen = float(new[~new.index.isin(known)].sum()) if len(new) else 0.0
    expected = [freq[k] for k in known] + [0.0]
    return psi(expected, actual + [unseen], eps), float((values == NULL).mean()) if len(values) else 0.0


def feature_psi(reference: Mapping[str, Mapping[str, Any]], df: pd.DataFrame,
                eps: float = DEFAULT_EPS) -> pd.DataFrame:
    """PSI of every profiled feature between the training profile and ``df``.

    ``reference`` is a detector's ``reference_``; ``df`` should already be cast to the
    model's schema (``det.schema_.validate(df)``) so booleans and categories print alike.
    Returns one row per feature: feature, kind, psi, missing_new (fraction null in ``df``).
    A profiled column absent from ``df`` raises SchemaMismatchError naming it.
    """
    missing = [name for name in reference if name not in df.columns]
    if missing:
        raise SchemaMismatchError(f"drift: column(s) {missing} of the reference profile are not in the "
                                  f"new data; columns are {list(df.columns)}")
    rows = []
    for name, ref in reference.items():
        if ref.get("kind") == "numeric":
            value, miss = _numeric_psi(ref, df[name], eps)
        elif ref.get("kind") == "categorical":
            value, miss = _categorical_psi(ref, df[name], eps)
        else:
            raise ValueError(f"drift: column '{name}': unknown profile kind {ref.get('kind')!r}")
        rows.append({"feature": name, "kind": ref["kind"], "psi": value, "missing_new": miss})
    return pd.DataFrame(rows, columns=["feature", "kind", "psi", "missing_new"])


def score_psi(reference_scores: Any, new_scores: Any, bins: int = 10, eps: float = DEFAULT_EPS) -> float:
    """PSI of anomaly scores: ``bins`` quantile bins of the reference plus a non-finite bin."""
    ref = np.asarray(reference_scores, dtype=np.float64)
    new = np.asarray(new_scores, dtype=np.float64)
    ref = ref[np.isfinite(ref)]
    if len(ref) == 0 or len(new) == 0:
        raise ValueError(f"score_psi needs finite reference scores and new scores, got {len(ref)} "
                         f"and {len(new)}")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_frac, _ = numeric_fractions(ref, edges)
    new_frac, new_nonfinite = numeric_fractions(np.where(np.isfinite(new), new, np.nan), edges)
    expected = np.r_[ref_frac, 0.0]
    actual = np.r_[new_frac * (1.0 - new_nonfinite), new_nonfinite]
    return psi(expected, actual, eps)


def drift_table(reference: Mapping[str, Mapping[str, Any]], df: pd.DataFrame, *,
                reference_scores: Any = None, new_scores: Any = None,
                alert: float = DEFAULT_ALERT, eps: float = DEFAULT_EPS) -> pd.DataFrame:
    """Feature PSI rows (+ one ``anomaly_score`` row when scores are given) with an alert flag.

    Columns: feature, kind, psi, missing_new, alert (psi > ``alert``); sorted by psi, largest first.
    """
    table = feature_psi(reference, df, eps)
    if reference_scores is not None and new_scores is not None:
        row = {"feature": SCORE_ROW, "kind": "score", "psi": score_psi(reference_scores, new_scores, eps=eps),
               "missing_new": float(np.mean(~np.isfinite(np.asarray(new_scores, dtype=np.float64))))}
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    table["alert"] = table["psi"] > alert
    return table.sort_values("psi", ascending=False, kind="stable").reset_index(drop=True)


def psi_plot(table: pd.DataFrame, alert: float = DEFAULT_ALERT, title: str = "Population stability index"):
    """Horizontal bar chart of PSI per feature with the alert threshold as a dashed line.

    Returns a matplotlib Figure built without pyplot (no GUI backend, no global state).
    """
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    t = table.sort_values("psi", kind="stable")
    names = t["feature"].astype(str)
    height = 0.35 * len(t) + 1.5
    fig = Figure(figsize=(7, height))
    # margins set here, not by tight_layout (which lays out every label twice; this figure is
    # drawn at the end of every scoring run: 0.27 -> 0.15 s): the left one fits the widest name
    renderer = FigureCanvasAgg(fig).get_renderer()
    font = FontProperties(size=rcParams["ytick.labelsize"])
    widest = max((renderer.get_text_width_height_descent(n, font, ismath=False)[0] for n in names), default=0.0)
    left = min(0.6, (widest + 0.15 * fig.dpi) / (7 * fig.dpi))
    fig.subplots_adjust(left=left, right=0.97, bottom=0.6 / height, top=1 - 0.4 / height)
    ax = fig.subplots()
    colors = ["tab:red" if p > alert else "tab:blue" for p in t["psi"]]
    ax.barh(names, t["psi"], color=colors)
    ax.axvline(alert, color="black", linestyle="--", linewidth=1, label=f"alert threshold {alert:g}")
    ax.set_xlabel("PSI (training profile vs new window)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return fig
