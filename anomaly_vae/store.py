"""Where the MLflow store is: choosing and remembering the tracking/registry URI, experiments.

Store: ``sqlite:///<cwd>/mlruns/mlflow.db`` by default (``MLFLOW_TRACKING_URI`` overrides,
an explicit ``tracking_uri`` overrides both); artifacts of experiments created here go to
``<db dir>/artifacts``. One of the tracking modules (`store`, `tracking`, `registry`,
`mlflow_model`), the only ones that import mlflow; light on purpose (no pandas, torch or
plotting) so that registry commands start fast.
"""
from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "anomaly-vae"
_NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}
_configured: dict[str, str] = {}      # the URI chosen by the last `configure` call in this process


def _absolute_sqlite(uri: str) -> str:
    """sqlite:///relative/x.db -> sqlite:////<cwd>/relative/x.db (other URIs unchanged)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/") or uri == prefix + ":memory:":
        return uri
    return prefix + str((Path.cwd() / uri[len(prefix):]).resolve())


def _sqlite_path(uri: str) -> Path | None:
    """Database file of an absolute SQLite URI (query string ignored), else None."""
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]) if uri.startswith("sqlite:////") else None


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow tracking and registry at the store; returns the URI in use.

    Precedence: explicit `tracking_uri` > env ``MLFLOW_TRACKING_URI`` > ``sqlite:///mlruns/mlflow.db``
    (relative to the current directory; made absolute). For SQLite stores the database's
    directory (``mlruns/``) is created and holds the artifacts (``mlruns/artifacts``).
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    uri = _absolute_sqlite(str(uri))
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _configured["uri"] = uri
    return uri


def _ensure_configured(tracking_uri: str | None = None) -> str:
    if tracking_uri is not None or "uri" not in _configured:
        return configure(tracking_uri)
    return _configured["uri"]


@contextmanager
def preserve_configuration() -> Iterator[None]:
    """Context manager: on exit, put back the store chosen by `configure` and MLflow's tracking
    and registry URIs as they were on entry (with no store configured on entry: env
    ``MLFLOW_TRACKING_URI`` as it was then, else MLflow's default).

    For tests and scripts that `configure` another store for a while.
    """
    saved = dict(_configured)
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        _configured.clear()
        _configured.update(saved)
        uri = saved.get("uri") or env_uri or None
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifact root for a new experiment: ``<db dir>/artifacts/<experiment>`` as a file URI for
    SQLite stores; None (the server's default) otherwise."""
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None
    return (db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)).as_uri()


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            log.info("experiment %r was deleted; restoring it", name)
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(_configured["uri"], name))
    except MlflowException:            # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _param_value(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code in _NOT_FOUND_CODES or "not found" in str(exc).lower() \
        or "does not exist" in str(exc).lower()


@contextmanager
def _quiet_downloads():
    """Hide MLflow's per-file download progress bars (noise in cron logs)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
