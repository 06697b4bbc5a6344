"""MLflow runs: training and evaluation runs, summary runs and runs kept open by id.

A training run logs params, per-epoch metrics, calibration and evaluation metrics, plots,
the training dataset and the model as a pyfunc logged from code (``mlflow_model.py``) with
the native model directory (JSON + safetensors) as artifact "model_dir". Where the store is:
`store`; registered models, aliases and loading: `registry` (their public names are
re-exported here for older callers).
"""
from __future__ import annotations

import logging
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

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
from .evaluate import evaluate_scores, labels_from
from .registry import (MODEL_ARTIFACT_PATH, MODEL_DIR_ARTIFACT, get_alias_version, list_models,  # noqa: F401
                       list_versions, load_detector, register, resolve_model_uri, set_alias,
                       set_version_tags)
from .store import (DEFAULT_EXPERIMENT, OWNER_TAGS, _configured, _ensure_configured,  # noqa: F401
                    _experiment_id, _owner_alive, _owner_tags, _param_value, _process_start, _quiet_downloads, _quote,
                    artifact_location, configure, end_interrupted_runs, preserve_configuration, ui_url)

if TYPE_CHECKING:
    from .detector import VAEAnomalyDetector

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
HISTORY_METRICS = ("loss", "recon_nll", "kl", "beta", "val_loss", "val_recon_nll", "val_kl", "active_units")
EVAL_METRIC_NAMES = {"auroc": "auroc", "auprc": "auprc", "fpr": "fpr_at_threshold", "recall": "recall",
                     "n": "eval_rows", "n_anomalies": "eval_anomalies", "flagged": "eval_flagged",
                     "flag_rate": "eval_flag_rate"}
INPUT_EXAMPLE_ROWS = 5
PLOT_MAX_ROWS = 50_000      # training rows scored for the plots when no eval_df is given


class TrainRun(NamedTuple):
    """What `log_training_run` logged: run id, ``runs:/<id>/model``, registered version, scalar metrics."""

    run_id: str
    model_uri: str
    version: int | None
    metrics: dict


def _params(det: "VAEAnomalyDetector") -> dict[str, str]:
    """Estimator arguments under their own names; the resolved Config as ``config.<field>``."""
    out = {k: _param_value(v) for k, v in det.get_params().items()}
    out.update({f"config.{k}": _param_value(v) for k, v in det.config_.to_dict().items()})
    out["calibration.method"] = str(det.calibration_.get("method"))
    out["n_features"] = str(det.n_features_in_)
    out["anomaly_vae_version"] = __version__
    return out


def _history_metrics(det: "VAEAnomalyDetector", now_ms: int) -> list[Metric]:
    """Per-epoch metrics; step = the epoch number, 1-based as in the CLI summary and the plots."""
    h = det.history_.to_dict()
    return [Metric(key, float(v), now_ms, step) for key in HISTORY_METRICS
            for step, v in enumerate(h.get(key) or [], start=1) if v is not None and np.isfinite(v)]


def _scalar_metrics(det: "VAEAnomalyDetector") -> dict[str, float]:
    h, cal = det.history_, det.calibration_
    out = {"threshold": det.threshold_, "calibration_flag_rate": cal.get("calibration_flag_rate"),
           "train_flag_rate": cal.get("train_flag_rate"), "n_calibration": cal.get("n_calibration"),
           "epochs": len(h.loss), "best_epoch": h.best_epoch + 1,          # 1-based, as in the summary
           "fit_seconds": det.fit_seconds_}
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
    """Explicit column signature from an input example; id columns optional; param top_k.

    Input columns are named (features required) but typed ``Any``: MLflow then passes the
    values as received, and the model casts them with the library's own `Schema.validate`, so
    served scores equal the library's (MLflow's own casts would read "no" as True, truncate 1.5
    in an integer column and refuse a null there).
    """
    from mlflow.types.schema import AnyType, ColSpec, Schema as MlflowSchema

    x = _model_frame(det, example)
    out = det.explain(x)
    ids = [c for c in det.schema_.ids if c in x.columns]
    if ids:
        out = pd.concat([x[ids].reset_index(drop=True), out], axis=1)
    with _integer_columns_ok():
        sig = infer_signature(x, out, params={"top_k": int(det.config_.top_k)})
    inputs = MlflowSchema([ColSpec(AnyType(), c.name, required=c.name not in ids) for c in sig.inputs.inputs])
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


def _start_tags(client: MlflowClient, experiment_id: str, tags: Mapping[str, str] | None) -> dict[str, str]:
    """Owner tags + `tags` for a run about to start, after ending the runs of dead processes."""
    end_interrupted_runs(client, experiment_id)
    return {**_owner_tags(), **(tags or {})}


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
    collapse = getattr(det.history_, "posterior_collapse", "")
    run_tags = _start_tags(client, exp_id, {
        "anomaly_vae.run_type": "training", "anomaly_vae.dataset": dataset_name,
        "anomaly_vae.posterior_collapse": "true" if collapse else "false",
        **({"anomaly_vae.posterior_collapse_reason": collapse} if collapse else {}), **(tags or {})})
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
    run_tags = _start_tags(client, exp_id, {"anomaly_vae.run_type": "evaluation",
                                            **({"model_uri": model_uri} if model_uri else {}), **(tags or {})})
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
    client = MlflowClient()
    exp_id = _experiment_id(client, experiment)
    tags = _start_tags(client, exp_id, tags)
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
    exp_id = _experiment_id(client, experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=_start_tags(client, exp_id, tags))
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
