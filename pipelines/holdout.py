"""Data and evaluation for one retrain: read the window, split off the holdout, check the
champion's schema, score models on the shared holdout, compare them, and measure drift."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anomaly_vae.detector import VAEAnomalyDetector
from anomaly_vae.drift import DEFAULT_ALERT, drift_table, score_psi
from anomaly_vae.errors import DataError
from anomaly_vae.evaluate import evaluate_scores, labels_from
from anomaly_vae.io import read_table
from pipelines.window import Partition

DRIFT_SAMPLE = 100_000
COMPARED = ("auprc", "auroc", "fpr", "recall", "score_psi", "n_nonfinite", "threshold", "n",
            "n_anomalies", "flagged")


# ------------------------------------------------------------------ data
def load_partitions(parts: Sequence[Partition], label: str | None) -> list[pd.DataFrame]:
    """Read every partition; DataError naming the file when it is empty or its label column is
    absent or holds values other than 1/0 (or true/false)."""
    frames = []
    for p in parts:
        df = read_table(p.path)
        if len(df) == 0:
            raise DataError(f"{p.path}: partition has no rows")
        if label is not None:
            try:
                labels_from(df, label)
            except DataError as exc:
                raise DataError(f"{p.path}: {exc}") from exc
        frames.append(df)
    return frames


def split_holdout(frames: Sequence[pd.DataFrame], holdout_partitions: int = 1,
                  holdout_fraction: float = 0.2,
                  groups: Sequence[Any] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Train on the older partitions, hold out the newest ``holdout_partitions``.

    ``groups`` gives each frame's partition (e.g. its date, so that several part files of one
    day stay together); by default every frame is its own partition, and frames are oldest
    first. With too few partitions, the newest ``holdout_fraction`` of the rows (by the first
    datetime column, else by row order) is held out instead. Returns (train, holdout, rule).
    """
    groups = list(range(len(frames))) if groups is None else list(groups)
    distinct = list(dict.fromkeys(groups))
    if len(distinct) > holdout_partitions:
        held = set(distinct[-holdout_partitions:])
        train = pd.concat([f for f, g in zip(frames, groups) if g not in held], ignore_index=True)
        holdout = pd.concat([f for f, g in zip(frames, groups) if g in held], ignore_index=True)
        return train, holdout, f"newest {holdout_partitions} partition(s)"
    df = pd.concat(frames, ignore_index=True)
    times = [c for c in df.columns if pd.api.types.is_datetime64_any_dtype(df[c])]
    if times:
        df = df.sort_values(times[0], kind="stable").reset_index(drop=True)
    n_hold = int(round(holdout_fraction * len(df)))
    if n_hold < 1 or n_hold >= len(df):
        raise DataError(f"window has {len(df):,} rows in {len(distinct)} partition(s): too few to hold "
                        f"out {holdout_fraction:.0%} for evaluation")
    how = f"by '{times[0]}'" if times else "by row order"
    return (df.iloc[:-n_hold].reset_index(drop=True), df.iloc[-n_hold:].reset_index(drop=True),
            f"newest {holdout_fraction:.0%} of rows {how}")


def check_compatible(det: VAEAnomalyDetector, parts: Sequence[Partition],
                     frames: Sequence[pd.DataFrame], champion: str) -> None:
    """Every feature column of the champion exists in every partition and casts to its kind.

    Raises SchemaMismatchError naming the file, the column and the problem.
    """
    for p, df in zip(parts, frames):
        det.schema_.validate(df, source=f"{p.path} (schema of {champion})")


# ------------------------------------------------------------ evaluation
def holdout_metrics(det: VAEAnomalyDetector, holdout: pd.DataFrame, label: str | None) -> dict[str, Any]:
    """Score `holdout` with `det`: evaluate_scores keys + n_nonfinite, score_psi, threshold.

    Without a label every holdout row counts as normal, so fpr is the flag rate on the
    holdout. score_psi compares the model's calibration scores with its scores on held-out
    normals (None when there are none).
    """
    if label is not None:
        y = labels_from(holdout, label)
        X = holdout.drop(columns=[label])
    else:
        y = np.zeros(len(holdout), dtype=bool)
        X = holdout
    s = det.score_terms(X).anomaly_score
    out = evaluate_scores(y, s, s > det.threshold_)
    normals = s[~y]
    out["n_nonfinite"] = int(np.count_nonzero(~np.isfinite(s)))
    out["score_psi"] = (score_psi(det.calibration_scores_, normals)
                        if len(normals) and len(det.calibration_scores_) else None)
    out["threshold"] = float(det.threshold_)
    out["labelled"] = label is not None
    return out


def comparison_table(candidate: dict[str, Any], champion: dict[str, Any] | None) -> pd.DataFrame:
    """metric | candidate | champion | delta (candidate - champion) for the compared metrics."""
    rows = []
    for m in COMPARED:
        c = candidate.get(m)
        ch = champion.get(m) if champion else None
        delta = c - ch if isinstance(c, (int, float)) and isinstance(ch, (int, float)) else None
        rows.append({"metric": m, "candidate": c, "champion": ch, "delta": delta})
    return pd.DataFrame(rows, columns=["metric", "candidate", "champion", "delta"])


def window_drift(ref: VAEAnomalyDetector, window: pd.DataFrame, label: str | None, *,
                 alert: float = DEFAULT_ALERT, sample: int = DRIFT_SAMPLE, seed: int = 0) -> pd.DataFrame:
    """Feature and score PSI of the window's normal rows against `ref`'s training profile."""
    df = window
    if label is not None:
        df = df.loc[~labels_from(df, label)].drop(columns=[label])
    if len(df) > sample:
        df = df.sample(sample, random_state=seed)
    validated = ref.schema_.validate(df, source="drift window")
    scores = ref.score_terms(df).anomaly_score
    return drift_table(ref.reference_, validated, reference_scores=ref.calibration_scores_,
                       new_scores=scores, alert=alert)


def worst_drift(window: pd.DataFrame, newest: pd.DataFrame, alert: float = DEFAULT_ALERT) -> pd.DataFrame:
    """One drift table from the whole window's and the newest partitions' tables: per feature the
    larger PSI (`psi`), both PSIs (`psi_window`, `psi_newest`) and an alert on the larger one, so
    a shift in the last day is not diluted by the window and a shifted window is not hidden by a
    clean last day."""
    both = window.merge(newest, on=["feature", "kind"], how="outer", suffixes=("_window", "_newest"))
    both["psi"] = both[["psi_window", "psi_newest"]].max(axis=1)
    both["missing_new"] = both[["missing_new_window", "missing_new_newest"]].max(axis=1)
    both["alert"] = both["psi"] > alert
    cols = ["feature", "kind", "psi", "psi_window", "psi_newest", "missing_new", "alert"]
    return both[cols].sort_values("psi", ascending=False, kind="stable").reset_index(drop=True)


def weekday_warning(det: VAEAnomalyDetector, train_dates: Sequence[Any]) -> list[str]:
    """A warning when the training partitions span under a week and the model uses day-of-week."""
    dated = [d for d in train_dates if d is not None]
    has_time = any(c.kind == "datetime" for c in det.schema_.features)
    if has_time and dated and (max(dated) - min(dated)).days + 1 < 7:
        return [f"training partitions span {(max(dated) - min(dated)).days + 1} day(s) and the model "
                "uses day-of-week: holdout days on unseen weekdays will look anomalous; use a window "
                "of at least 8 days"]
    return []
