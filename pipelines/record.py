"""The retrain decision run in MLflow: one run per retrain in experiment ``anomaly-vae-retrain``.

The run is created up front (so failures are recorded too) and written through
`MlflowClient` with an explicit run id, never as the "active run", so the candidate's own
training run (`anomaly_vae.tracking.log_training_run`) can start while it is open.

Tags: model_name, window_key, window_start/window_end/window_files, decision
(promoted | kept | refused), reasons, candidate_run_id, candidate_version,
champion_before, champion_after, drift_alert, drift_alerts. Artifacts: comparison.csv /
comparison.json, drift/drift.csv / drift/drift.json, drift/psi.png, window.json.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

FINAL_DECISIONS = ("promoted", "kept")      # decisions that make a rerun of the window a no-op
_TAG_LIMIT = 5000


def artifact_location(uri: str, experiment: str) -> str | None:
    """``<SQLite store dir>/artifacts/<experiment>`` as a file URI; None (server default) otherwise."""
    if not uri.startswith("sqlite:////"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)).as_uri()


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """Id of experiment `name`, created (artifacts beside the SQLite store) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))
    except Exception:                      # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_processed(client: MlflowClient, exp_id: str, name: str, key: str) -> dict[str, Any] | None:
    """The latest finished decision run for this model and window key, or None.

    Only runs that ended with a final decision (promoted or kept) count; refused and failed
    runs are retried.
    """
    runs = client.search_runs([exp_id], filter_string=f"tags.window_key = '{key}'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    for run in runs:
        tags = run.data.tags
        if (run.info.status == "FINISHED" and tags.get("model_name") == name
                and tags.get("decision") in FINAL_DECISIONS):
            return {"run_id": run.info.run_id, "decision": tags.get("decision"),
                    "candidate_version": tags.get("candidate_version"),
                    "champion_after": tags.get("champion_after")}
    return None


def start(client: MlflowClient, exp_id: str, *, name: str, key: str, run_name: str,
          tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
    """Create the decision run (status RUNNING); returns its id."""
    run = client.create_run(exp_id, run_name=run_name,
                            tags={"anomaly_vae.run_type": "retrain", "model_name": name,
                                  "window_key": key, **tags})
    client.log_batch(run.info.run_id, params=[Param(k, _text(v, 500)) for k, v in params.items()])
    return run.info.run_id


def _text(v: Any, limit: int = _TAG_LIMIT) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, _text(v)) for k, v in tags.items() if v is not None])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, Any]) -> None:
    """Log the finite numeric values of `metrics` (None / NaN are skipped)."""
    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in metrics.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    if ms:
        client.log_batch(run_id, metrics=ms)


def log_comparison(client: MlflowClient, run_id: str, table: pd.DataFrame) -> None:
    client.log_text(run_id, table.to_csv(index=False), "comparison.csv")
    client.log_table(run_id, table.astype(object).where(table.notna(), None), "comparison.json")


def log_drift(client: MlflowClient, run_id: str, table: pd.DataFrame, figure: Any) -> None:
    client.log_text(run_id, table.to_csv(index=False), "drift/drift.csv")
    client.log_table(run_id, table, "drift/drift.json")
    client.log_figure(run_id, figure, "drift/psi.png")
    metrics = {f"psi.{f}": p for f, p in zip(table["feature"], table["psi"])}
    log_metrics(client, run_id, metrics)


def log_window(client: MlflowClient, run_id: str, window: dict[str, Any]) -> None:
    client.log_dict(run_id, window, "window.json")


def finish(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(run_id, status)


def tag_version(client: MlflowClient, name: str, version: int, tags: Mapping[str, Any]) -> None:
    for k, v in tags.items():
        if v is not None:
            client.set_model_version_tag(name, str(version), k, _text(v))
