"""`anomaly-vae train` and `anomaly-vae evaluate`: fit a detector; measure it on labelled data."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import DataError, SchemaMismatchError

# Rows `train` fits on by default (a uniform sample of larger data); see README "Training on big data".
MAX_TRAIN_ROWS = 200_000
from .state import (CLIError, State, _check_labels, _column_list_option, _fmt, _mlflow_options, _model_option,
                    _where, pass_state)


# ------------------------------------------------------------------ train
@click.command(short_help="Fit a detector on parquet/CSV data and save / log / register it.")
@click.argument("data", nargs=-1, required=True)
@click.option("--label", metavar="COL",
              help="Label column: 1 / true / yes = anomaly (left out of training), 0 / false / no = normal.")
@_column_list_option("--categorical", "Treat these columns as categorical")
@_column_list_option("--exclude", "Leave these columns out entirely")
@_column_list_option("--id-col", "Pass these columns through as ids, not features")
@click.option("--target-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01,
              show_default=True, help="False-alarm rate on normal rows the threshold is calibrated to.")
@click.option("--contamination", type=click.FloatRange(0, 0.5, min_open=True, max_open=True), default=None,
              help="Unlabelled, possibly dirty data: flag this top fraction of training scores instead.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, show_default="automatic",
              help="Maximum epochs.")
@click.option("--latent-dim", type=click.IntRange(min=1), default=None, show_default="automatic",
              help="Latent dimensions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--max-rows", type=click.IntRange(min=2), default=MAX_TRAIN_ROWS, show_default=True,
              help="Fit on a uniform random sample of at most this many rows (streamed; every row's "
                   "label is still checked). Smaller data is used whole.")
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              show_default="models/<register name or first input's name>", help="Model directory to write.")
@click.option("--register", metavar="NAME", help="Register the model in the MLflow registry under NAME.")
@_mlflow_options
@pass_state
def train(state: State, data: tuple[str, ...], label: str | None, categorical: tuple[str, ...],
          exclude: tuple[str, ...], id_col: tuple[str, ...], target_fpr: float, contamination: float | None,
          epochs: int | None, latent_dim: int | None, seed: int, max_rows: int, output: str | None,
          register: str | None, no_mlflow: bool, experiment: str) -> None:
    """Fit a detector on DATA (parquet/CSV files, directories searched recursively, or globs;
    local paths or s3:// gs:// hdfs:// URIs).

    Data larger than --max-rows is streamed in record batches and a uniform random sample
    (fixed by --seed) is kept; train / validation / calibration splits are disjoint parts of it.

    Saves a model directory and, unless --no-mlflow, logs an MLflow run (params, per-epoch
    metrics, plots, the model) and optionally registers it.

    \b
    Examples:
      anomaly-vae train data/transactions.parquet --label label --exclude customer_id
      anomaly-vae train 'data/2026-*.parquet' --id-col txn_id --register payments
      anomaly-vae train data/ --epochs 20 --no-mlflow -o models/quick
    """
    from tqdm.auto import tqdm

    from .. import io
    from ..detector import VAEAnomalyDetector

    if register and no_mlflow:
        raise click.BadParameter("--register needs MLflow; drop --no-mlflow", param_hint="--register")
    paths = io.expand_inputs(data)
    counted = [io.count_rows(p) for p in paths]
    n_anom = 0

    def check(rb: Any, path: Any) -> None:       # every row's label, also those left out of the sample
        nonlocal n_anom
        n_anom += _check_labels(rb.select([label]).to_pandas() if label in rb.schema.names else
                                rb.slice(0, 0).to_pandas(), label, [path])

    with tqdm(total=sum(counted) if None not in counted else None, desc="read", unit="row",
              unit_scale=True, leave=False, disable=not state.progress) as bar:
        df, n_read = io.sample_rows(paths, max_rows, seed=seed, check=check if label else None,
                                    progress=bar.update)
    if n_read < 2:
        raise DataError(f"{_where(paths)}: {n_read} row(s); training needs at least 2")
    if label:                       # anomalies in the sample (all of them when the data is used whole)
        n_anom = _check_labels(df, label, paths) if n_read > len(df) else n_anom
    det = VAEAnomalyDetector(label=label, categorical=categorical or None, exclude=exclude or None,
                             id_cols=id_col or None, target_fpr=target_fpr, contamination=contamination,
                             max_epochs=epochs, latent_dim=latent_dim, random_state=seed,
                             n_threads=state.threads, verbose=state.progress, **state.detector_runtime())
    try:
        det.fit(df)
    except (DataError, SchemaMismatchError) as exc:   # fit names columns and rows; add the file(s)
        raise type(exc)(f"{_where(paths)}: {exc}") from exc
    out_dir = Path(output or Path("models") / (register or Path(io.basename(paths[0])).stem))
    det.save(out_dir)
    run = None
    if not no_mlflow:
        with state.muted():
            run = state.tracking().log_training_run(
                det, df, dataset_name=Path(io.basename(paths[0])).stem, dataset_source=",".join(str(p) for p in paths),
                label=label, experiment=experiment, register_as=register)
    _train_summary(state, det, len(df), n_anom, label, out_dir, run, register, n_read)


def _train_summary(state: State, det: Any, n_rows: int, n_anom: int, label: str | None, out_dir: Path,
                   run: Any, register: str | None, n_read: int | None = None) -> None:
    kinds: dict[str, list[str]] = {}
    for c in det.schema_.columns:
        kinds.setdefault(c.kind, []).append(c.name)
    h, cal = det.history_, det.calibration_
    feat = ", ".join(f"{len(kinds[k])} {k}" for k in ("numeric", "categorical", "boolean", "datetime") if k in kinds)
    sampled = f" ({n_rows:,} sampled)" if n_read and n_read > n_rows else ""
    state.echo(f"rows:       {n_read or n_rows:,} read{sampled}, {n_rows - n_anom:,} used for training"
               + (f" ({n_anom:,} labelled anomalies left out)" if label else ""))
    state.echo(f"columns:    {feat}; ids: {', '.join(kinds.get('id', [])) or 'none'}")
    state.echo(f"epochs:     {len(h.loss)} (best {h.best_epoch + 1}{', stopped early' if h.stopped_early else ''}), "
               f"latent dim {det.config_.latent_dim}, fit {det.fit_seconds_:.1f} s")
    target = (f"contamination {cal['contamination']}" if cal["method"] == "contamination"
              else f"target FPR {cal['target_fpr']}")
    state.echo(f"threshold:  {det.threshold_:.4f} nats ({cal['method']}, {target}, "
               f"{cal['n_calibration']:,} calibration rows)")
    state.echo(f"model dir:  {out_dir}")
    if run is not None:
        state.echo(f"mlflow run: {run.run_id} ({run.model_uri})")
        state.echo_store("store:", 12)
        tracking = state.tracking()
        exp_id = tracking.MlflowClient().get_run(run.run_id).info.experiment_id
        state.echo(f"ui:         {tracking.ui_url(exp_id)}")
        if register:
            state.echo(f"registered: {register} version {run.version} "
                       f"(promote: anomaly-vae models promote {register} {run.version} --alias champion)")


def _model_label(det: Any, model: str) -> str:
    """The label column recorded with the model at training; UsageError when there is none."""
    if not det.label:
        raise CLIError(f"{model} was trained without a label column; name the label column of the data "
                       "with --label COL")
    return det.label


# ------------------------------------------------------------------ evaluate
@click.command(short_help="AUROC / AUPRC / FPR / recall of a model on labelled data.")
@_model_option
@click.argument("data", nargs=-1, required=True)
@click.option("--label", default=None, metavar="COL", show_default="the label column the model was trained with",
              help="Label column: 1 / true / yes = anomaly, 0 / false / no = normal.")
@_mlflow_options
@pass_state
def evaluate(state: State, model: str, data: tuple[str, ...], label: str | None, no_mlflow: bool,
             experiment: str) -> None:
    """Measure a model on labelled DATA: AUROC, AUPRC, FPR on normals, recall at the threshold.

    \b
    Examples:
      anomaly-vae evaluate -m models:/payments@champion data/holdout.parquet --label label
      anomaly-vae evaluate -m models/demo data/transactions_holdout.parquet --no-mlflow
    """
    from .. import io

    paths = io.expand_inputs(data)
    df = io.read_tables(paths)
    if len(df) == 0:
        raise DataError(f"{_where(paths)}: no rows to evaluate")
    if label is not None:
        _check_labels(df, label, paths)           # before any model work
    det, info = state.load_model(model)
    if label is None:
        label = _model_label(det, model)
        _check_labels(df, label, paths)
    if no_mlflow:
        from ..evaluate import evaluate as run_eval
        metrics = run_eval(det, df, label=label)
    else:
        with state.muted():
            metrics = state.tracking().log_evaluation(det, df, label=label, model_uri=info["uri"],
                                                      experiment=experiment, dataset_name=paths[0].stem)
    target = det.calibration_.get("target_fpr")
    state.echo(f"rows:      {metrics['n']:,} ({metrics['n_anomalies']:,} anomalies)")
    state.echo(f"AUROC:     {_fmt(metrics['auroc'])}")
    state.echo(f"AUPRC:     {_fmt(metrics['auprc'])}")
    state.echo(f"FPR:       {_fmt(metrics['fpr'])} on normals (target {target})")
    state.echo(f"recall:    {_fmt(metrics['recall'])} at threshold {det.threshold_:.4f}")
    state.echo(f"flagged:   {metrics['flagged']:,}")
    if metrics.get("run_id"):
        state.echo(f"mlflow run: {metrics['run_id']}")
    state.echo_store("store:", 11)
