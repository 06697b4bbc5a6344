"""Promotion gates for the retrain pipeline: a pure decision on two metric dicts.

Metric dicts come from `pipelines.retrain.holdout_metrics` (scores on one shared holdout):
auroc, auprc (None without two label classes), fpr (flag rate on held-out normals at the
model's own threshold), n, n_nonfinite (scores that are NaN/inf) and score_psi (shift of the
model's holdout scores from its own calibration scores) and labelled (False when the holdout
has no label column: fpr is then the flag rate on all holdout rows, anomalies included).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

DEFAULT_TOLERANCE = 0.02
DEFAULT_TARGET_FPR = 0.01
DEFAULT_FPR_BAND = 0.01
DEFAULT_MAX_SCORE_PSI = 0.25


class Decision(NamedTuple):
    """promote: every gate passed. reasons: the failed gates, or (when promoting) the passed ones."""

    promote: bool
    reasons: list[str]


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def should_promote(candidate: Mapping[str, Any], champion: Mapping[str, Any] | None, *,
                   tolerance: float = DEFAULT_TOLERANCE, target_fpr: float = DEFAULT_TARGET_FPR,
                   fpr_band: float = DEFAULT_FPR_BAND,
                   max_score_psi: float | None = DEFAULT_MAX_SCORE_PSI) -> Decision:
    """Decide whether the candidate replaces the champion (pure; no I/O).

    Gates, all of which must pass:

    1. finite: every holdout score of the candidate is finite.
    2. fpr band: the candidate's flag rate on held-out normals lies in
       [max(0, target_fpr - fpr_band), target_fpr + fpr_band].
    3. score shift (when ``max_score_psi`` is not None): the PSI between the candidate's
       calibration scores and its scores on held-out normals is at most ``max_score_psi``.
    4. not worse (when there is a champion and the holdout has both label classes):
       candidate AUPRC >= champion AUPRC - tolerance, and the same for AUROC.
       Without labels the ranking is not compared; gates 1-3 decide alone.

    With no champion, gates 1-3 decide.
    """
    passed: list[str] = []
    failed: list[str] = []

    def gate(ok: bool, message: str) -> None:
        (passed if ok else failed).append(message)

    n = int(candidate.get("n") or 0)
    bad = int(candidate.get("n_nonfinite") or 0)
    gate(n > 0 and bad == 0,
         f"candidate scores finite on all {n:,} holdout rows" if bad == 0 and n > 0 else
         f"candidate: {bad:,} of {n:,} holdout scores are not finite" if n > 0 else
         "holdout is empty: nothing to evaluate the candidate on")

    fpr = candidate.get("fpr")
    where = "held-out normals" if candidate.get("labelled", True) else "holdout rows (no labels)"
    lo, hi = max(0.0, target_fpr - fpr_band), target_fpr + fpr_band
    if fpr is None or (isinstance(fpr, float) and math.isnan(fpr)):
        gate(False, "holdout has no normal rows: the candidate's false-positive rate is unknown")
    else:
        inside = lo <= fpr <= hi
        gate(inside, f"candidate FPR {fpr:.4f} on {where} {'within' if inside else 'outside'} "
                     f"[{lo:.4f}, {hi:.4f}] (target {target_fpr:g} +/- {fpr_band:g})")

    if max_score_psi is not None:
        psi_value = candidate.get("score_psi")
        if psi_value is None or (isinstance(psi_value, float) and math.isnan(psi_value)):
            gate(False, "candidate score PSI unavailable (no finite holdout scores on normals)")
        else:
            ok = psi_value <= max_score_psi
            gate(ok, f"candidate score PSI {psi_value:.4f} (calibration vs holdout normals) "
                     f"{'<=' if ok else '>'} {max_score_psi:g}")

    if champion is None:
        passed.append("no champion yet: the first candidate that passes the gates is promoted")
    elif candidate.get("auprc") is None or champion.get("auprc") is None:
        passed.append("holdout has no labels of both classes: ranking quality not compared with "
                      "the champion")
    else:
        for metric in ("auprc", "auroc"):
            c, ch = candidate.get(metric), champion.get(metric)
            if c is None or ch is None:
                continue
            ok = c >= ch - tolerance
            gate(ok, f"candidate {metric.upper()} {_fmt(c)} {'>=' if ok else '<'} champion "
                     f"{_fmt(ch)} - tolerance {tolerance:g}")
    return Decision(promote=not failed, reasons=failed or passed)
