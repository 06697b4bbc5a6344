"""The MLflow model registry (versions, aliases) and loading of logged models.

`load_detector` reads the native model directory (JSON + safetensors, artifact "model_dir"
of the pyfunc) back; nothing is ever unpickled. Store selection lives in `store`.
"""
from __future__ import annotations

import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .errors import ModelNotFoundError
from .store import _ensure_configured, _not_found, _param_value, _quiet_downloads, _quote, in_store

if TYPE_CHECKING:
    from .detector import VAEAnomalyDetector

MODEL_ARTIFACT_PATH = "model"           # runs:/<run_id>/model
MODEL_DIR_ARTIFACT = "model_dir"        # key of the native model dir in the pyfunc's artifacts


def _logged_model_uri(client: MlflowClient, run_id: str) -> str:
    """``models:/<model_id>`` of the run's logged model named 'model' (MLflow 3 stores logged
    models outside the run's artifacts); falls back to ``runs:/<run_id>/model``."""
    run = client.get_run(run_id)
    for out in getattr(run.outputs, "model_outputs", None) or []:
        if client.get_logged_model(out.model_id).name == MODEL_ARTIFACT_PATH:
            return f"models:/{out.model_id}"
    return f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}"


def register(run_id: str, name: str) -> int:
    """Register the model logged by run `run_id` (``runs:/<run_id>/model``) under `name`
    (created if new); returns the new version number."""
    _ensure_configured()
    try:
        source = _logged_model_uri(MlflowClient(), run_id)
        mv = mlflow.register_model(source, name)
    except MlflowException as exc:
        if _not_found(exc):
            raise ModelNotFoundError(f"run {run_id!r} has no logged model at '{MODEL_ARTIFACT_PATH}' "
                                     f"{in_store()} ({exc.message})") from exc
        raise
    return int(mv.version)


def set_alias(name: str, version: int, alias: str) -> None:
    """Point `alias` (e.g. champion, challenger) of registered model `name` at `version`."""
    _ensure_configured()
    try:
        MlflowClient().set_registered_model_alias(name, alias, str(int(version)))
    except MlflowException as exc:
        if _not_found(exc):
            raise ModelNotFoundError(f"registered model '{name}' version {version} not found "
                                     f"{in_store()}") from exc
        raise


def set_version_tags(name: str, version: int, tags: Mapping[str, Any]) -> None:
    """Set tags on version `version` of registered model `name`; None values are skipped."""
    _ensure_configured()
    client = MlflowClient()
    for k, v in tags.items():
        if v is not None:
            client.set_model_version_tag(name, str(version), k, _param_value(v))


def get_alias_version(name: str, alias: str) -> int | None:
    """Version that `alias` points at, or None when the model or the alias does not exist."""
    _ensure_configured()
    try:
        return int(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise


def _registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            known = sorted(m.name for m in client.search_registered_models(max_results=50))
            raise ModelNotFoundError(f"registered model '{name}' not found {in_store()}; registered models: "
                                     f"{', '.join(known) or 'none'}") from exc
        raise


def list_versions(name: str) -> list[dict]:
    """All versions of registered model `name`, oldest first.

    Each: {"version": int, "aliases": [...], "run_id", "created": ISO time (UTC),
    "metrics": the run's scalar metrics (latest values)}. ModelNotFoundError for an unknown name.
    """
    _ensure_configured()
    client = MlflowClient()
    model = _registered_model(client, name)
    aliases: dict[int, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(int(version), []).append(alias)
    out = []
    for mv in client.search_model_versions(f"name = '{_quote(name)}'"):
        metrics: dict[str, float] = {}
        if mv.run_id:
            try:
                metrics = dict(client.get_run(mv.run_id).data.metrics)
            except MlflowException:
                metrics = {}
        out.append({"version": int(mv.version), "aliases": sorted(aliases.get(int(mv.version), [])),
                    "run_id": mv.run_id,
                    "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(),
                    "metrics": metrics})
    return sorted(out, key=lambda d: d["version"])


def list_models() -> list[dict]:
    """Every registered model, by name: {"name", "latest": newest version or None,
    "aliases": {alias: version}}."""
    _ensure_configured()
    client, found, token = MlflowClient(), [], None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            break
    return [{"name": rm.name,
             "latest": max((int(v.version) for v in rm.latest_versions or []), default=None),
             "aliases": {a: int(v) for a, v in (rm.aliases or {}).items()}}
            for rm in sorted(found, key=lambda m: m.name)]


# -------------------------------------------------------------- loading
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")
_LOGGED_MODEL_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)/?$")     # MLflow 3 logged model
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+?)/?$")


def resolve_model_uri(model: str) -> dict[str, Any]:
    """Parse and check a registry / run / logged-model URI: {"uri", "name", "version", "run_id",
    "source"}. Accepted: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/model and
    models:/<model_id> (MLflow 3 logged model, as shown in the UI).

    ``source`` is the URI whose artifacts hold the pyfunc model. ModelNotFoundError when the
    name, alias, version or run does not exist.
    """
    _ensure_configured()
    client = MlflowClient()
    m = _LOGGED_MODEL_URI.match(model)
    if m:
        try:
            logged = client.get_logged_model(m["model_id"])
        except MlflowException as exc:
            if _not_found(exc):
                raise ModelNotFoundError(f"{model}: logged model '{m['model_id']}' not found "
                                         f"{in_store()}") from exc
            raise
        return {"uri": model, "name": None, "version": None, "run_id": logged.source_run_id,
                "source": logged.artifact_location}
    m = _MODELS_URI.match(model)
    if m:
        name = m["name"]
        _registered_model(client, name)
        try:
            mv = (client.get_model_version_by_alias(name, m["alias"]) if m["alias"]
                  else client.get_model_version(name, m["version"]))
        except MlflowException as exc:
            if not _not_found(exc):
                raise
            what = f"alias '@{m['alias']}'" if m["alias"] else f"version {m['version']}"
            have = [f"v{v['version']}" + (f" @{','.join(v['aliases'])}" if v["aliases"] else "")
                    for v in list_versions(name)]
            raise ModelNotFoundError(f"{model}: registered model '{name}' has no {what} {in_store()}; "
                                     f"versions: {', '.join(have) or 'none'}") from exc
        return {"uri": model, "name": name, "version": int(mv.version), "run_id": mv.run_id,
                "source": f"models:/{name}/{mv.version}"}
    m = _RUNS_URI.match(model)
    if m:
        try:
            client.get_run(m["run_id"])
        except MlflowException as exc:
            if _not_found(exc):
                raise ModelNotFoundError(f"{model}: run '{m['run_id']}' not found {in_store()}") from exc
            raise
        return {"uri": model, "name": None, "version": None, "run_id": m["run_id"], "source": model}
    raise ModelNotFoundError(f"{model}: expected a model directory, runs:/<run_id>/model, "
                             "models:/<name>/<version> or models:/<name>@<alias>")


def _download(uri: str, dst: str) -> str:
    try:
        with _quiet_downloads():
            return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except MlflowException as exc:
        if _not_found(exc):
            raise ModelNotFoundError(f"{uri}: not found in the artifact store of {in_store()[3:]} "
                                     f"({exc.message})") from exc
        raise
    except OSError as exc:
        raise ModelNotFoundError(f"{uri}: cannot download ({exc})") from exc


def load_detector(model: str | os.PathLike, cls: type | None = None) -> tuple["VAEAnomalyDetector", dict]:
    """Load a detector from a local model dir or an MLflow URI; returns (detector, info).
    `cls`: VAEAnomalyDetector (default), or `fitted.FittedDetector` to score without sklearn.

    info = {"uri", "name", "version", "run_id"} (None where not applicable). For URIs only the
    pyfunc's MLmodel file and its native "model_dir" artifact (JSON + safetensors, hash-checked)
    are downloaded, into a temporary directory removed after loading.
    """
    from mlflow.models import Model

    from .persist import model_exists

    if cls is None:
        from .detector import VAEAnomalyDetector as cls
    text = os.fspath(model)
    if not re.match(r"^[a-z][a-z0-9+.-]*:/", text) or text.startswith("file:"):
        path = Path(text[len("file://"):] if text.startswith("file://") else text)
        if not path.exists() and not model_exists(path):
            raise ModelNotFoundError(f"{text}: no such model directory (or use runs:/<run_id>/model, "
                                     "models:/<name>/<version>, models:/<name>@<alias>)")
        det = cls.load(path)
        return det, {"uri": str(path), "name": None, "version": None, "run_id": None}
    info = resolve_model_uri(text)
    source = info.pop("source")
    with tempfile.TemporaryDirectory(prefix="anomaly-vae-dl-") as tmp:
        mlmodel = Model.load(_download(f"{source}/MLmodel", os.path.join(tmp, "meta")))
        flavor = mlmodel.flavors.get("python_function", {})
        art = (flavor.get("artifacts") or {}).get(MODEL_DIR_ARTIFACT)
        if not art:
            raise ModelNotFoundError(f"{text}: not an anomaly-vae model (its MLmodel has no "
                                     f"'{MODEL_DIR_ARTIFACT}' artifact)")
        rel = art["path"] if isinstance(art, dict) else str(art)
        local = _download(f"{source}/{rel}", os.path.join(tmp, "model"))
        det = cls.load(local)
    return det, info
