"""The retrain decision run in MLflow: one run per retrain in experiment ``anomaly-vae-retrain``.

The run is created up front (so failures are recorded too) and written by explicit run id
(`anomaly_vae.tracking.create_run` and friends), never as the "active run", so the
candidate's own training run (`anomaly_vae.tracking.log_training_run`) can start while it is open.

Tags: model_name, window_key, window_start/window_end/window_files, decision
(promoted | kept | refused), reasons, candidate_run_id, candidate_version,
champion_before, champion_after, drift_alert, drift_alerts. Artifacts: comparison.csv /
comparison.json, drift/drift.csv / drift/drift.json, drift/psi.png, window.json.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Mapping

import pandas as pd

from anomaly_vae import tracking

log = logging.getLogger(__name__)

FINAL_DECISIONS = ("promoted", "kept")      # decisions that make a rerun of the window a no-op
_TAG_LIMIT = 5000


def find_processed(experiment: str, name: str, key: str) -> dict[str, Any] | None:
    """The latest finished decision run for this model and window key, or None.

    Only runs that ended with a final decision (promoted or kept) count; refused and failed
    runs are retried. Creates `experiment` when missing.
    """
    for run in tracking.find_runs(experiment, {"window_key": key}, max_results=50):
        tags = run.tags
        if (run.status == "FINISHED" and tags.get("model_name") == name
                and tags.get("decision") in FINAL_DECISIONS):
            return {"run_id": run.run_id, "decision": tags.get("decision"),
                    "candidate_version": tags.get("candidate_version"),
                    "champion_after": tags.get("champion_after")}
    return None


def start(experiment: str, *, name: str, key: str, run_name: str,
          tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
    """Create the decision run (status RUNNING) in `experiment`; returns its id."""
    return tracking.create_run(experiment, run_name=run_name,
                               tags={"anomaly_vae.run_type": "retrain", "model_name": name,
                                     "window_key": key, **tags},
                               params={k: _text(v, 500) for k, v in params.items()})


def _text(v: Any, limit: int = _TAG_LIMIT) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    tracking.set_run_tags(run_id, {k: _text(v) for k, v in tags.items() if v is not None})


def log_metrics(run_id: str, metrics: Mapping[str, Any]) -> None:
    """Log the finite numeric values of `metrics` (None / NaN are skipped)."""
    tracking.log_metrics(run_id, {k: float(v) for k, v in metrics.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and math.isfinite(float(v))})


def log_comparison(run_id: str, table: pd.DataFrame) -> None:
    tracking.log_text(run_id, table.to_csv(index=False), "comparison.csv")
    tracking.log_table(run_id, table.astype(object).where(table.notna(), None), "comparison.json")


def log_drift(run_id: str, table: pd.DataFrame, figure: Any) -> None:
    tracking.log_text(run_id, table.to_csv(index=False), "drift/drift.csv")
    tracking.log_table(run_id, table, "drift/drift.json")
    tracking.log_figure(run_id, figure, "drift/psi.png")
    metrics = {f"psi.{f}": p for f, p in zip(table["feature"], table["psi"])}
    log_metrics(run_id, metrics)


def log_window(run_id: str, window: dict[str, Any]) -> None:
    tracking.log_json(run_id, window, "window.json")


def finish(run_id: str, status: str = "FINISHED") -> None:
    tracking.end_run(run_id, status)


def tag_version(name: str, version: int, tags: Mapping[str, Any]) -> None:
    tracking.set_version_tags(name, version, {k: _text(v) for k, v in tags.items() if v is not None})
