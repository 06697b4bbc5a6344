"""Diagnostic figures for MLflow runs and notebooks.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), which renders
through the Agg canvas on ``savefig``: no pyplot state, no GUI backend, nothing to close.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

NORMAL_COLOR, ANOMALY_COLOR = "tab:blue", "tab:red"


def _history_dict(history: Any) -> dict[str, Any]:
    return history.to_dict() if hasattr(history, "to_dict") else dict(history)


def loss_curves(history: Any) -> Figure:
    """Per-epoch training curves: loss, NLL / KL, and KL weight with active latent units.

    history : a `train.History` or its ``to_dict()``. Epochs are numbered from 1 (as in the
    CLI summary and MLflow's step); a dotted line marks the best epoch.
    """
    h = _history_dict(history)
    epochs = np.arange(1, len(h.get("loss", [])) + 1)
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_loss, ax_terms, ax_beta = fig.subplots(1, 3)

    def curve(ax, key: str, **kw) -> None:
        values = h.get(key) or []
        if len(values):
            ax.plot(np.arange(1, len(values) + 1), values, label=key, **kw)

    curve(ax_loss, "loss")
    curve(ax_loss, "val_loss", linestyle="--")
    ax_loss.set_title("loss (train: annealed beta; val: full beta)")
    curve(ax_terms, "recon_nll", color="tab:green")
    curve(ax_terms, "val_recon_nll", color="tab:green", linestyle="--")
    curve(ax_terms, "kl", color="tab:purple")
    curve(ax_terms, "val_kl", color="tab:purple", linestyle="--")
    ax_terms.set_title("reconstruction NLL and KL (nats/row)")
    curve(ax_beta, "beta", color="black")
    ax_beta.set_ylabel("beta")
    ax_beta.set_title("KL weight and active latent units")
    ax_units = ax_beta.twinx()
    units = h.get("active_units") or []
    if len(units):
        ax_units.step(np.arange(1, len(units) + 1), units, where="mid", color="tab:orange", label="active_units")
    ax_units.set_ylabel("active units")
    best = h.get("best_epoch")
    for ax in (ax_loss, ax_terms, ax_beta):
        ax.set_xlabel("epoch")
        if best is not None and len(epochs):
            ax.axvline(best + 1, color="grey", linewidth=0.8, linestyle=":")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="center right" if ax is ax_beta else "best")
    if len(units):
        ax_units.legend(fontsize=8, loc="lower right")
    return fig


def score_histogram(scores: Any, y: Any = None, threshold: float | None = None, *,
                    clip_quantile: float = 0.995) -> Figure:
    """Histogram of anomaly scores, normal vs anomalous rows when labels `y` are given.

    Scores above the `clip_quantile` of all finite scores are piled into the last bin so a
    few extreme anomalies do not squash the normal mass; non-finite scores are counted in the title.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.zeros(len(s), dtype=bool) if y is None else np.asarray(y).astype(bool).ravel()
    finite = np.isfinite(s)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    title = "anomaly score (nats)"
    if finite.any():
        lo = float(np.min(s[finite]))
        hi = float(np.quantile(s[finite], clip_quantile))
        if threshold is not None and np.isfinite(threshold):
            hi = max(hi, float(threshold))
        hi = hi if hi > lo else lo + 1.0
        bins = np.linspace(lo, hi, 61)
        clipped = np.clip(s, lo, hi)
        groups = [("normal", ~labels, NORMAL_COLOR)]
        if y is not None:
            groups.append(("anomalous", labels, ANOMALY_COLOR))
        for name, mask, color in groups:
            m = mask & finite
            if m.any():
                ax.hist(clipped[m], bins=bins, density=y is not None, histtype="stepfilled", alpha=0.45,
                        color=color, edgecolor=color, label=f"{name} (n={int(m.sum()):,})")
        if (s[finite] > hi).any():
            title += f"; {int((s[finite] > hi).sum()):,} scores above {hi:.3g} shown in the last bin"
    if (~finite).any():
        title += f"; {int((~finite).sum()):,} non-finite"
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("anomaly_score")
    ax.set_ylabel("density" if y is not None else "rows")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def _as_contributions(det: Any, data: Any, contributions: bool | None) -> pd.DataFrame:
    names = [s.column for s in det.preprocessor_.spans]
    if isinstance(data, np.ndarray) and contributions is not False:
        return pd.DataFrame(data, columns=names)
    if contributions is None:
        contributions = (isinstance(data, pd.DataFrame) and list(data.columns) == names
                         and all(pd.api.types.is_float_dtype(t) for t in data.dtypes))
    return pd.DataFrame(data) if contributions else det.contributions(data)


def column_error(det: Any, df_or_contrib: Any, *, y: Any = None,
                 contributions: bool | None = None, max_columns: int = 30) -> Figure:
    """Mean per-column contribution (column NLL minus its calibration median, nats), per group.

    df_or_contrib : raw rows to score with ``det.contributions``, or precomputed contributions
        (an (n, n_columns) array, or the DataFrame ``det.contributions`` returns: recognised by
        having exactly the model's feature columns, all float; pass ``contributions=True/False``
        to decide explicitly, e.g. for an all-numeric raw table).
    y : optional labels; anomalous rows get their own bars.
    """
    contrib = _as_contributions(det, df_or_contrib, contributions)
    labels = None if y is None else np.asarray(y).astype(bool).ravel()
    if labels is None:
        groups = {"normal": contrib}
    else:
        groups = {k: contrib[m] for k, m in (("normal", ~labels), ("anomalous", labels)) if m.any()}
    means = pd.DataFrame({k: v.mean(axis=0) for k, v in groups.items()})
    key = "anomalous" if "anomalous" in means else "normal"
    means = means.reindex(means[key].abs().sort_values(ascending=False).index)[:max_columns][::-1]
    fig = Figure(figsize=(7, 0.32 * len(means) + 1.6), layout="constrained")
    ax = fig.subplots()
    pos = np.arange(len(means))
    height = 0.8 / len(means.columns)
    for i, (name, color) in enumerate(zip(means.columns, (NORMAL_COLOR, ANOMALY_COLOR))):
        ax.barh(pos + i * height, means[name].to_numpy(), height=height, color=color,
                label=f"{name} (n={len(groups[name]):,})")
    ax.set_yticks(pos + height * (len(means.columns) - 1) / 2, list(means.index), fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("mean contribution: column NLL minus calibration median (nats)")
    ax.set_title("per-column reconstruction error", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def scores_vs_calibration(scores: Any, calibration_scores: Any, threshold: float | None = None, *,
                          title: str = "scores of this run vs calibration") -> Figure:
    """Density histograms (log scale) of new anomaly scores (e.g. a scoring run's sample) over
    the model's calibration scores (held-out normal rows), with the threshold: a shift of the
    blue mass away from the grey one is score drift; the blue area right of the line is the
    flag rate.

    The x axis spans the calibration scores' bulk and the threshold (up to the calibration
    99.9th percentile plus half the threshold's distance from the minimum); higher scores pile
    into the last bin, counted in the title.
    """
    new = np.asarray(scores, dtype=np.float64).ravel()
    cal = np.asarray(calibration_scores, dtype=np.float64).ravel()
    new, cal = new[np.isfinite(new)], cal[np.isfinite(cal)]
    # fixed margins, no layout engine: the labels are always the same size, and constrained
    # layout was half the time of rendering this figure on the critical path of every
    # scoring run (about 0.35 vs 0.16 s per savefig)
    fig = Figure(figsize=(7, 4))
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.93)
    ax = fig.subplots()
    both = np.r_[new, cal]
    text = title
    if len(both):
        lo = float(both.min())
        ref = cal if len(cal) else new
        hi = float(np.quantile(ref, 0.999))
        if threshold is not None and np.isfinite(threshold):
            hi = max(hi, float(threshold))
        hi = hi + 0.5 * (hi - lo) if hi > lo else lo + 1.0
        bins = np.linspace(lo, hi, 61)
        for name, values, color in (("calibration (held-out normal rows)", cal, "grey"),
                                    ("this run", new, NORMAL_COLOR)):
            if len(values):
                ax.hist(np.clip(values, lo, hi), bins=bins, density=True, histtype="stepfilled", alpha=0.45,
                        color=color, edgecolor=color, label=f"{name} (n={len(values):,})")
        above = int((new > hi).sum())
        if above:
            text += f"; {above:,} scores above {hi:.3g} in the last bin"
        ax.set_yscale("log")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("anomaly_score (nats)")
    ax.set_ylabel("density (log scale)")
    ax.set_title(text, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig
