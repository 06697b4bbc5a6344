"""MLflow tracking, model registry and loading of logged models.

Store: ``sqlite:///<cwd>/mlruns/mlflow.db`` by default (``MLFLOW_TRACKING_URI`` overrides,
an explicit ``tracking_uri`` overrides both); artifacts of experiments created here go to
``<db dir>/artifacts``. A training run logs params, per-epoch metrics, calibration and
evaluation metrics, plots, the training dataset and the model as a pyfunc logged from code
(``mlflow_model.py``) with the native model directory (JSON + safetensors) as artifact
"model_dir". `load_detector` reads that native directory back; nothing is ever unpickled.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, NamedTuple

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient

from . import __version__
from . import plots
from . import score as S
from .errors import ModelNotFoundError
from .evaluate import evaluate_scores, labels_from

if TYPE_CHECKING:
    from .detector import VAEAnomalyDetector

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "anomaly-vae"
MODEL_ARTIFACT_PATH = "model"           # runs:/<run_id>/model
MODEL_DIR_ARTIFACT = "model_dir"        # key of the native model dir in the pyfunc's artifacts
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
HISTORY_METRICS = ("loss", "recon_nll", "kl", "beta", "val_loss", "val_recon_nll", "val_kl", "active_units")
EVAL_METRIC_NAMES = {"auroc": "auroc", "auprc": "auprc", "fpr": "fpr_at_threshold", "recall": "recall",
                     "n": "eval_rows", "n_anomalies": "eval_anomalies", "flagged": "eval_flagged",
                     "flag_rate": "eval_flag_rate"}
INPUT_EXAMPLE_ROWS = 5
PLOT_MAX_ROWS = 50_000      # training rows scored for the plots when no eval_df is given
_NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}
_configured: dict[str, str] = {}      # the URI chosen by the last `configure` call in this process


class TrainRun(NamedTuple):
    """What `log_training_run` logged: run id, ``runs:/<id>/model``, registered version, scalar metrics."""

    run_id: str
    model_uri: str
    version: int | None
    metrics: dict


# ------------------------------------------------------------------ store
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


# -------------------------------------------------------------- helpers
def _param_value(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def _params(det: "VAEAnomalyDetector") -> dict[str, str]:
    """Estimator arguments under their own names; the resolved Config as ``config.<field>``."""
    out = {k: _param_value(v) for k, v in det.get_params().items()}
    out.update({f"config.{k}": _param_value(v) for k, v in det.config_.to_dict().items()})
    out["calibration.method"] = str(det.calibration_.get("method"))
    out["n_features"] = str(det.n_features_in_)
    out["anomaly_vae_version"] = __version__
    return out


def _history_metrics(det: "VAEAnomalyDetector", now_ms: int) -> list[Metric]:
    h = det.history_.to_dict()
    return [Metric(key, float(v), now_ms, step) for key in HISTORY_METRICS
            for step, v in enumerate(h.get(key) or []) if v is not None and np.isfinite(v)]


def _scalar_metrics(det: "VAEAnomalyDetector") -> dict[str, float]:
    h, cal = det.history_, det.calibration_
    out = {"threshold": det.threshold_, "calibration_flag_rate": cal.get("calibration_flag_rate"),
           "train_flag_rate": cal.get("train_flag_rate"), "n_calibration": cal.get("n_calibration"),
           "epochs": len(h.loss), "best_epoch": h.best_epoch, "fit_seconds": det.fit_seconds_}
    if h.val_loss:
        out["best_val_loss"] = h.val_loss[h.best_epoch] if h.best_epoch < len(h.val_loss) else min(h.val_loss)
    if h.active_units:
        out["final_active_units"] = h.active_units[-1]
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(float(v))}


def _eval_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {EVAL_METRIC_NAMES[k]: float(v) for k, v in result.items()
            if k in EVAL_METRIC_NAMES and v is not None}


def _split_labels(df: pd.DataFrame, label: str | None) -> tuple[pd.DataFrame, np.ndarray | None]:
    if label is None or label not in df.columns:
        return df, None
    return df.drop(columns=[label]), labels_from(df, label)


def _model_frame(det: "VAEAnomalyDetector", df: pd.DataFrame) -> pd.DataFrame:
    """The columns the pyfunc accepts (features + ids, schema order), with pandas' nullable
    extension dtypes made plain: nullable ints (Int64, ...) -> float64 ("double" in the
    signature, so a null at serving time still matches), nullable booleans -> object."""
    cols = [c.name for c in det.schema_.columns if c.name in df.columns]
    out = df[cols].copy()
    for name in cols:
        dtype = out[name].dtype
        if isinstance(dtype, pd.api.extensions.ExtensionDtype) and pd.api.types.is_integer_dtype(dtype):
            out[name] = out[name].astype("float64")
        elif isinstance(dtype, pd.BooleanDtype):
            out[name] = out[name].astype(object).where(out[name].notna(), None)
    return out


@contextmanager
def _integer_columns_ok():
    """Silence MLflow's 'integer column may not hold nulls' hint: non-nullable int columns are
    declared "long" on purpose (pandas/Spark send int64; "double" would reject it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column")
        warnings.filterwarnings("ignore", message=".*dataset source can be interpreted in multiple ways")
        yield


def model_signature(det: "VAEAnomalyDetector", example: pd.DataFrame) -> tuple[ModelSignature, pd.DataFrame]:
    """Explicit column signature from an input example; id columns optional; param top_k."""
    from mlflow.types.schema import ColSpec, Schema as MlflowSchema

    x = _model_frame(det, example)
    out = det.explain(x)
    ids = [c for c in det.schema_.ids if c in x.columns]
    if ids:
        out = pd.concat([x[ids].reset_index(drop=True), out], axis=1)
    with _integer_columns_ok():
        sig = infer_signature(x, out, params={"top_k": int(det.config_.top_k)})
    inputs = MlflowSchema([ColSpec(c.type, c.name, required=c.name not in ids) for c in sig.inputs.inputs])
    outputs = MlflowSchema([ColSpec(c.type, c.name, required=c.name not in ids) for c in sig.outputs.inputs])
    return ModelSignature(inputs, outputs, sig.params), x


def _log_model(det: "VAEAnomalyDetector", example_source: pd.DataFrame) -> None:
    example = example_source.head(INPUT_EXAMPLE_ROWS)
    signature, example = model_signature(det, example)
    with tempfile.TemporaryDirectory(prefix="anomaly-vae-") as tmp, _quiet_downloads():
        native = det.save(Path(tmp) / "anomaly_vae_model")
        mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_PATH,
            python_model=str(MODEL_CODE),
            artifacts={MODEL_DIR_ARTIFACT: native},
            signature=signature,
            input_example=example,
            # the package travels inside the model (code/anomaly_vae), so a fresh environment
            # (virtualenv env manager, Spark workers) needs only these PyPI packages
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=_runtime_requirements(),
        )


RUNTIME_PACKAGES = ("torch", "numpy", "scipy", "pandas", "scikit-learn", "pyarrow", "safetensors", "mlflow")


def _runtime_requirements() -> list[str]:
    """Pinned requirements of the logged model (local version labels like '+cpu' dropped)."""
    from importlib.metadata import version
    return [f"{name}=={version(name).split('+')[0]}" for name in RUNTIME_PACKAGES]


def _log_dataset(df: pd.DataFrame, name: str | None, source: str | None, label: str | None,
                 context: str) -> None:
    with _integer_columns_ok():
        mlflow.log_input(_dataset(df, name, source, label), context=context)


def _dataset(df: pd.DataFrame, name: str | None, source: str | None, label: str | None):
    targets = label if label is not None and label in df.columns else None
    if source is not None:
        try:
            return mlflow.data.from_pandas(df, source=source, name=name, targets=targets)
        except MlflowException:          # a source MLflow has no resolver for (e.g. 'warehouse://x')
            log.info("dataset source %r not resolvable by MLflow; recorded as a tag only", source)
            mlflow.set_tag(f"anomaly_vae.dataset_source.{name}", source)
    return mlflow.data.from_pandas(df, name=name, targets=targets)


# ------------------------------------------------------------- training
def log_training_run(det: "VAEAnomalyDetector", train_df: pd.DataFrame, *, dataset_name: str,
                     dataset_source: str | None = None, eval_df: pd.DataFrame | None = None,
                     label: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                     run_name: str | None = None, register_as: str | None = None,
                     tags: dict[str, str] | None = None, tracking_uri: str | None = None) -> TrainRun:
    """Log a fitted detector as one MLflow run; optionally register a model version (no alias).

    Logs params (estimator args + resolved config), per-epoch metrics (step = epoch),
    calibration metrics, evaluation metrics when `eval_df` has the `label` column (auroc,
    auprc, fpr_at_threshold, recall), plots (``plots/*.png``), the training dataset
    (context "training"), ``schema.json`` and the pyfunc model at ``runs:/<run_id>/model``.
    `label` defaults to the detector's ``label`` parameter.
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(det, "vae_")
    uri = _ensure_configured(tracking_uri)
    label = label if label is not None else det.label
    client = MlflowClient()
    exp_id = _experiment_id(client, experiment)
    run_tags = {"anomaly_vae.run_type": "training", "anomaly_vae.dataset": dataset_name, **(tags or {})}
    nested = mlflow.active_run() is not None      # e.g. inside a retrain pipeline's parent run
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=run_tags, nested=nested) as run:
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        scalars = _scalar_metrics(det)
        metrics = _history_metrics(det, now) + [Metric(k, v, now, 0) for k, v in scalars.items()]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in _params(det).items()])
        _log_dataset(train_df, dataset_name, dataset_source, label, "training")
        mlflow.log_text(det.schema_.to_json(), "schema.json")
        mlflow.log_dict(det.calibration_, "calibration.json")

        mlflow.log_figure(plots.loss_curves(det.history_), "plots/loss_curves.png")
        if eval_df is not None:
            hist_df, hist_name = eval_df, "evaluation"
        else:
            hist_df, hist_name = train_df, "training"
            if len(train_df) > PLOT_MAX_ROWS:
                hist_df = train_df.sample(PLOT_MAX_ROWS, random_state=det.config_.seed)
        X, y = _split_labels(hist_df, label)
        terms = det.score_terms(X)
        flags = terms.anomaly_score > det.threshold_
        if eval_df is not None:
            if y is not None:
                result = evaluate_scores(y, terms.anomaly_score, flags)
                scalars.update(_eval_metrics(result))
                mlflow.log_metrics(_eval_metrics(result))
            else:
                log.warning("eval_df has no label column %r; no evaluation metrics logged", label)
                mlflow.log_metric("eval_flag_rate", float(flags.mean()))
                scalars["eval_flag_rate"] = float(flags.mean())
            eval_name = f"{dataset_name}-eval"
            _log_dataset(eval_df, eval_name, None, label, "evaluation")
        mlflow.log_figure(plots.score_histogram(terms.anomaly_score, y, det.threshold_),
                          f"plots/score_histogram_{hist_name}.png")
        contrib = S.feature_contributions(terms, det.column_median_)   # = det.contributions(X), no re-scoring
        mlflow.log_figure(plots.column_error(det, contrib, y=y, contributions=True), "plots/column_error.png")

        _log_model(det, train_df if label is None or label not in train_df.columns
                   else train_df.drop(columns=[label]))
    version = register(run_id, register_as) if register_as else None
    log.info("logged training run %s to %s%s", run_id, uri,
             f" (registered {register_as} v{version})" if version else "")
    return TrainRun(run_id, f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}", version, scalars)


def log_evaluation(det: "VAEAnomalyDetector", df: pd.DataFrame, *, label: str = "label",
                   model_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                   dataset_name: str | None = None, tracking_uri: str | None = None,
                   run_name: str | None = None, tags: dict[str, str] | None = None) -> dict:
    """Score labelled `df` and log an evaluation run: metrics (auroc, auprc, fpr_at_threshold,
    recall, ...), ``plots/score_histogram_evaluation.png``, the dataset (context "evaluation")
    when `dataset_name` is given, and tag ``model_uri``.

    Returns the `evaluate.evaluate` dict plus ``run_id``. DataError when `label` is missing.
    """
    _ensure_configured(tracking_uri)
    y = labels_from(df, label)
    terms = det.score_terms(df.drop(columns=[label]))
    result = {**evaluate_scores(y, terms.anomaly_score, terms.anomaly_score > det.threshold_),
              "threshold": float(det.threshold_)}
    client = MlflowClient()
    exp_id = _experiment_id(client, experiment)
    run_tags = {"anomaly_vae.run_type": "evaluation", **({"model_uri": model_uri} if model_uri else {}),
                **(tags or {})}
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=run_tags, nested=nested) as run:
        mlflow.log_metrics({**_eval_metrics(result), "threshold": result["threshold"]})
        if dataset_name:
            _log_dataset(df, dataset_name, None, label, "evaluation")
        mlflow.log_figure(plots.score_histogram(terms.anomaly_score, y, det.threshold_),
                          "plots/score_histogram_evaluation.png")
    return {**result, "run_id": run.info.run_id}


def log_run(run_name: str, *, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
            tags: dict[str, str] | None = None, json_artifacts: dict[str, Any] | None = None,
            experiment: str = DEFAULT_EXPERIMENT, tracking_uri: str | None = None) -> str:
    """Log a small summary run (e.g. a retraining decision or drift report); returns its run id.

    `json_artifacts` maps artifact file names (``decision.json``) to JSON-serialisable objects.
    None metric values are skipped. Nests under an active run if there is one.
    """
    _ensure_configured(tracking_uri)
    exp_id = _experiment_id(MlflowClient(), experiment)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags, nested=nested) as run:
        if params:
            mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        for name, obj in (json_artifacts or {}).items():
            mlflow.log_dict(obj, name)
    return run.info.run_id


# ------------------------------------------------ runs kept open by explicit id
class RunSummary(NamedTuple):
    """A run found by `find_runs`: id, status (RUNNING, FINISHED, FAILED, KILLED) and tags."""

    run_id: str
    status: str
    tags: dict[str, str]


def create_run(experiment: str, *, run_name: str | None = None, tags: Mapping[str, str] | None = None,
               params: Mapping[str, Any] | None = None) -> str:
    """Create a run (status RUNNING) in `experiment` (created if missing); returns its id.

    Unlike `log_run` the run is not made the active run and stays open until `end_run`, so
    other runs (e.g. `log_training_run`) can start and end meanwhile. Write to it with
    `set_run_tags`, `log_metrics`, `log_text`, `log_json`, `log_table` and `log_figure`.
    """
    _ensure_configured()
    client = MlflowClient()
    run = client.create_run(_experiment_id(client, experiment), run_name=run_name, tags=dict(tags or {}))
    if params:
        client.log_batch(run.info.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """End run `run_id` with `status` (FINISHED, FAILED or KILLED)."""
    _ensure_configured()
    MlflowClient().set_terminated(run_id, status)


def find_runs(experiment: str, tags: Mapping[str, str], *, max_results: int = 50) -> list[RunSummary]:
    """Runs of `experiment` (created if missing) whose tags equal all of `tags`, newest first."""
    _ensure_configured()
    client = MlflowClient()
    where = " and ".join(f"tags.`{k}` = '{_quote(str(v))}'" for k, v in tags.items())
    runs = client.search_runs([_experiment_id(client, experiment)], filter_string=where,
                              order_by=["attributes.start_time DESC"], max_results=max_results)
    return [RunSummary(r.info.run_id, r.info.status, dict(r.data.tags)) for r in runs]


def set_run_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Set tags on run `run_id`; None values are skipped."""
    _ensure_configured()
    run_tags = [RunTag(k, _param_value(v)) for k, v in tags.items() if v is not None]
    if run_tags:
        MlflowClient().log_batch(run_id, tags=run_tags)


def log_metrics(run_id: str, metrics: Mapping[str, float | None]) -> None:
    """Log `metrics` to run `run_id` at step 0 with one timestamp; None values are skipped."""
    _ensure_configured()
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
    if batch:
        MlflowClient().log_batch(run_id, metrics=batch)


def log_text(run_id: str, text: str, path: str) -> None:
    """Save `text` as artifact `path` (e.g. ``comparison.csv``) of run `run_id`."""
    _ensure_configured()
    MlflowClient().log_text(run_id, text, path)


def log_json(run_id: str, obj: Any, path: str) -> None:
    """Save JSON-serialisable `obj` as artifact `path` (``window.json``) of run `run_id`."""
    _ensure_configured()
    MlflowClient().log_dict(run_id, obj, path)


def log_table(run_id: str, table: pd.DataFrame, path: str) -> None:
    """Save `table` as an MLflow table artifact `path` (``*.json``, shown in the UI) of run `run_id`."""
    _ensure_configured()
    MlflowClient().log_table(run_id, table, path)


def log_figure(run_id: str, figure: Any, path: str) -> None:
    """Save a matplotlib `figure` as image artifact `path` (``*.png``) of run `run_id`."""
    _ensure_configured()
    MlflowClient().log_figure(run_id, figure, path)


# ------------------------------------------------------------- registry
def _not_found(exc: MlflowException) -> bool:
    return exc.error_code in _NOT_FOUND_CODES or "not found" in str(exc).lower() \
        or "does not exist" in str(exc).lower()


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
                                     f"({exc.message})") from exc
        raise
    return int(mv.version)


def set_alias(name: str, version: int, alias: str) -> None:
    """Point `alias` (e.g. champion, challenger) of registered model `name` at `version`."""
    _ensure_configured()
    try:
        MlflowClient().set_registered_model_alias(name, alias, str(int(version)))
    except MlflowException as exc:
        if _not_found(exc):
            raise ModelNotFoundError(f"registered model '{name}' version {version} not found") from exc
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
            raise ModelNotFoundError(f"registered model '{name}' not found; registered models: "
                                     f"{known or 'none'}") from exc
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


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


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
                raise ModelNotFoundError(f"{model}: logged model '{m['model_id']}' not found in "
                                         f"{_configured['uri']}") from exc
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
            raise ModelNotFoundError(f"{model}: registered model '{name}' has no {what}; "
                                     f"versions: {', '.join(have) or 'none'}") from exc
        return {"uri": model, "name": name, "version": int(mv.version), "run_id": mv.run_id,
                "source": f"models:/{name}/{mv.version}"}
    m = _RUNS_URI.match(model)
    if m:
        try:
            client.get_run(m["run_id"])
        except MlflowException as exc:
            if _not_found(exc):
                raise ModelNotFoundError(f"{model}: run '{m['run_id']}' not found in {_configured['uri']}") from exc
            raise
        return {"uri": model, "name": None, "version": None, "run_id": m["run_id"], "source": model}
    raise ModelNotFoundError(f"{model}: expected a model directory, runs:/<run_id>/model, "
                             "models:/<name>/<version> or models:/<name>@<alias>")


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


def _download(uri: str, dst: str) -> str:
    try:
        with _quiet_downloads():
            return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except MlflowException as exc:
        if _not_found(exc):
            raise ModelNotFoundError(f"{uri}: not found in the artifact store ({exc.message})") from exc
        raise
    except OSError as exc:
        raise ModelNotFoundError(f"{uri}: cannot download ({exc})") from exc


def load_detector(model: str | os.PathLike) -> tuple["VAEAnomalyDetector", dict]:
    """Load a detector from a local model dir or an MLflow URI; returns (detector, info).

    info = {"uri", "name", "version", "run_id"} (None where not applicable). For URIs only the
    pyfunc's MLmodel file and its native "model_dir" artifact (JSON + safetensors, hash-checked)
    are downloaded, into a temporary directory removed after loading.
    """
    from mlflow.models import Model

    from .detector import VAEAnomalyDetector

    text = os.fspath(model)
    if not re.match(r"^[a-z][a-z0-9+.-]*:/", text) or text.startswith("file:"):
        path = Path(text[len("file://"):] if text.startswith("file://") else text)
        if not path.exists():
            raise ModelNotFoundError(f"{text}: no such model directory (or use runs:/<run_id>/model, "
                                     "models:/<name>/<version>, models:/<name>@<alias>)")
        det = VAEAnomalyDetector.load(path)
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
        det = VAEAnomalyDetector.load(local)
    return det, info
