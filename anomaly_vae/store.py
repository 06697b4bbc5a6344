"""Where the MLflow store is: choosing and remembering the tracking/registry URI, experiments.

Store (first that is set): an explicit ``tracking_uri`` (``--tracking-uri``) > env
``MLFLOW_TRACKING_URI`` > ``sqlite:///$ANOMALY_VAE_HOME/mlruns/mlflow.db`` >
``sqlite:///<$XDG_DATA_HOME or ~/.local/share>/anomaly-vae/mlruns/mlflow.db``; never the current
directory, so cron jobs and other directories find the same store. Artifacts of experiments
created here go to ``<db dir>/artifacts``. One of the tracking modules (`store`, `tracking`, `registry`,
`mlflow_model`), the only ones that import mlflow; light on purpose (no pandas, torch or
plotting) so that registry commands start fast.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

HOME_ENV = "ANOMALY_VAE_HOME"           # project directory: its mlruns/ holds the store
DEFAULT_EXPERIMENT = "anomaly-vae"
# The MLflow 3 UI opens an experiment on its GenAI "Traces" overview unless told otherwise: the
# experiment tag below (set on every experiment used here) marks it as classic ML, and the URL
# parameter in `ui_url` opens the runs table whatever the tag (the UI remembers the last choice).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_QUERY = "workflowType=machine_learning"
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


def default_tracking_uri() -> str:
    """``sqlite:///$ANOMALY_VAE_HOME/mlruns/mlflow.db`` when ANOMALY_VAE_HOME is set (a relative
    value is taken from the current directory), else
    ``sqlite:///<$XDG_DATA_HOME or ~/.local/share>/anomaly-vae/mlruns/mlflow.db``; absolute."""
    home = os.environ.get(HOME_ENV)
    if home:
        root = Path(home).expanduser()
    else:
        xdg = os.environ.get("XDG_DATA_HOME", "")
        # the XDG spec ignores relative values
        root = (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share") / "anomaly-vae"
    return "sqlite:///" + str((root / "mlruns" / "mlflow.db").resolve())


def _user_env_uri() -> str | None:
    """MLFLOW_TRACKING_URI as the user set it. `mlflow.set_tracking_uri` (in `configure`) writes
    the variable too, for child processes; a value we wrote ourselves is not the user's choice
    (else one `--tracking-uri` would become every later default in this process)."""
    env = os.environ.get("MLFLOW_TRACKING_URI") or None
    if env is not None and "wrote_env" in _configured and env == _configured["wrote_env"]:
        return _configured.get("user_env")
    return env


def resolve_tracking_uri(tracking_uri: str | None = None) -> tuple[str, str]:
    """(URI, where it came from) by the store precedence: `tracking_uri` ("--tracking-uri") >
    env MLFLOW_TRACKING_URI > env ANOMALY_VAE_HOME > the XDG data directory ("default").
    Relative SQLite paths are made absolute; nothing is created."""
    if tracking_uri:
        uri, source = str(tracking_uri), "--tracking-uri"
    elif _user_env_uri():
        uri, source = _user_env_uri(), "MLFLOW_TRACKING_URI"
    else:
        uri, source = default_tracking_uri(), HOME_ENV if os.environ.get(HOME_ENV) else "default"
    return _absolute_sqlite(uri), source


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow tracking and registry at the store; returns the URI in use.

    Precedence: explicit `tracking_uri` > env ``MLFLOW_TRACKING_URI`` >
    ``sqlite:///$ANOMALY_VAE_HOME/mlruns/mlflow.db`` > ``sqlite:///<$XDG_DATA_HOME or
    ~/.local/share>/anomaly-vae/mlruns/mlflow.db`` (see `resolve_tracking_uri`). For SQLite
    stores the database's directory (``mlruns/``) is created and holds the artifacts
    (``mlruns/artifacts``).
    """
    uri, source = resolve_tracking_uri(tracking_uri)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    user_env = _user_env_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _configured.update(uri=uri, user_env=user_env, wrote_env=os.environ.get("MLFLOW_TRACKING_URI"))
    log.debug("store: %s (from %s)", uri, source)
    return uri


def in_store() -> str:
    """'in store <URI>' for "not found" messages (the store configured last, else the one
    `configure` would choose)."""
    return f"in store {_configured.get('uri') or resolve_tracking_uri()[0]}"


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
    """Id of experiment `name`: created (with the experiment-kind tag) if missing, restored if
    deleted, tagged as a classic-ML experiment if it has no kind yet."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            log.info("experiment %r was deleted; restoring it", name)
            client.restore_experiment(exp.experiment_id)
        mark_experiment_kind(client, exp)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(_configured["uri"], name),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:            # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def mark_experiment_kind(client: MlflowClient, experiment: Any) -> None:
    """Tag `experiment` (an mlflow Experiment) ``mlflow.experimentKind=custom_model_development``
    unless it already has a kind (someone's choice in the UI is kept)."""
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def ui_url(experiment_id: str, run_id: str | None = None, tracking_uri: str | None = None) -> str:
    """Where the MLflow UI shows an experiment's runs table (or one run): the tracking server
    itself for http(s) stores, else ``http://127.0.0.1:5000`` (``make ui`` / ``mlflow ui``)."""
    uri = tracking_uri or _configured.get("uri") or ""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    path = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base}/{path}?{UI_QUERY}"


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


# ------------------------------------------- runs of killed processes (no RUNNING ghosts)
# (here, not in `tracking`: the scoring-run child process needs them without pandas and sklearn)
OWNER_TAGS = ("anomaly_vae.host", "anomaly_vae.pid", "anomaly_vae.pid_start")


def _process_start(pid: int) -> str:
    """Start time of process `pid` (clock ticks since boot, Linux /proc); "" when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[19]       # field 22, after "pid (comm)"


def _owner_tags() -> dict[str, str]:
    """Tags naming the process that opens a run, so a later start can tell whether it died."""
    pid = os.getpid()
    return dict(zip(OWNER_TAGS, (socket.gethostname(), str(pid), _process_start(pid))))


def _owner_alive(tags: Mapping[str, str]) -> bool:
    try:
        pid = int(tags.get("anomaly_vae.pid", ""))
        os.kill(pid, 0)
    except ValueError:
        return True                      # not our tag format: leave the run alone
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                             # alive, another user's
    started, now = tags.get("anomaly_vae.pid_start", ""), _process_start(pid)
    return not (started and now and started != now)      # same pid, another process: dead


def end_interrupted_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of `experiment_id` opened on this host by a process that no
    longer exists (a SIGKILLed or crashed `train` / `retrain`); returns their ids. Runs of other
    hosts, or without the owner tags, are left alone (their processes cannot be checked here)."""
    host = socket.gethostname()
    where = f"attributes.status = 'RUNNING' and tags.`anomaly_vae.host` = '{_quote(host)}'"
    runs = client.search_runs([experiment_id], filter_string=where, max_results=500)
    ended = []
    for run in runs:
        if not _owner_alive(run.data.tags):
            client.set_tag(run.info.run_id, "anomaly_vae.ended_by",
                           f"a later start: process {run.data.tags.get('anomaly_vae.pid')} on {host} had exited "
                           "without ending this run (killed or crashed)")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    if ended:
        log.warning("marked %d run(s) of killed processes as KILLED: %s", len(ended), ", ".join(ended))
    return ended
