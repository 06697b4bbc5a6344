"""`anomaly-vae demo`: synthetic transactions -> train -> score -> evaluate -> MLflow."""
from __future__ import annotations

import time
from pathlib import Path

import click

from .state import State, _fmt, _mlflow_options, pass_state


# ------------------------------------------------------------------ demo
@click.command(short_help="Synthetic transactions -> train -> score -> evaluate -> MLflow.")
@click.option("--rows", type=click.IntRange(min=1000), default=100_000, show_default=True,
              help="Rows of synthetic transactions to generate.")
@click.option("--data-dir", type=click.Path(file_okay=False), default="data", show_default=True)
@click.option("--model-dir", type=click.Path(file_okay=False), default="models/demo", show_default=True)
@click.option("--scored-dir", type=click.Path(file_okay=False), default="scored/demo", show_default=True)
@click.option("--register", metavar="NAME", default="demo-transactions", show_default=True,
              help="Registered model name (gets alias champion).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, show_default="automatic",
              help="Maximum epochs.")
@click.option("--seed", type=int, default=0, show_default=True)
@_mlflow_options
@pass_state
def demo(state: State, rows: int, data_dir: str, model_dir: str, scored_dir: str, register: str,
         epochs: int | None, seed: int, no_mlflow: bool, experiment: str) -> None:
    """End-to-end demo on synthetic card transactions with injected fraud.

    Generates DATA_DIR/transactions.parquet, trains on the first 70% (by time, fraud rows
    left out), scores the last 30% to SCORED_DIR, evaluates it, logs everything to MLflow and
    registers the model with alias champion.

    \b
    Example:
      anomaly-vae demo --rows 20000 --epochs 10
    """
    from .. import batch, io
    from ..demo import DEMO_EXCLUDE, make_transactions
    from ..detector import VAEAnomalyDetector
    from ..evaluate import evaluate_scores, labels_from

    t_start = time.perf_counter()
    data = Path(data_dir)
    src = data / "transactions.parquet"
    if src.is_file() and io.count_rows(src) == rows:
        state.echo(f"data:      reusing {src} ({rows:,} rows)")
    else:
        io.write_frame(make_transactions(rows, seed=seed), src)
        state.echo(f"data:      wrote {rows:,} synthetic transactions to {src}")
    df = io.read_table(src).sort_values("timestamp", kind="stable").reset_index(drop=True)
    cut = int(round(0.7 * len(df)))
    train_df, test_df = df.iloc[:cut].reset_index(drop=True), df.iloc[cut:].reset_index(drop=True)
    train_path, test_path = data / "transactions_train.parquet", data / "transactions_holdout.parquet"
    io.write_frame(train_df, train_path)
    io.write_frame(test_df, test_path)
    state.echo(f"split:     {len(train_df):,} training rows (to {train_df['timestamp'].max():%Y-%m-%d %H:%M}), "
               f"{len(test_df):,} held-out rows")

    det = VAEAnomalyDetector(label="label", exclude=DEMO_EXCLUDE, max_epochs=epochs, random_state=seed,
                             n_threads=state.threads, verbose=state.progress, **state.detector_runtime())
    det.fit(train_df)
    det.save(model_dir)
    state.echo(f"trained:   {len(det.history_.loss)} epochs in {det.fit_seconds_:.1f} s, threshold "
               f"{det.threshold_:.3f}; model dir {model_dir}")

    run, info = None, {"uri": str(Path(model_dir).resolve()), "name": None, "version": None, "run_id": None}
    if not no_mlflow:
        with state.muted():
            tracking = state.tracking()
            run = tracking.log_training_run(det, train_df, dataset_name="transactions-train",
                                            dataset_source=str(train_path), eval_df=test_df, label="label",
                                            experiment=experiment, register_as=register)
            tracking.set_alias(register, run.version, "champion")
        info = {"uri": f"models:/{register}/{run.version}", "name": register, "version": run.version,
                "run_id": run.run_id}

    state.set_threads()
    t0 = time.perf_counter()
    result = batch.score_files(det, [test_path], scored_dir, model_info=info, progress=state.progress)
    score_s = time.perf_counter() - t0
    out_file = batch.output_path(test_path, scored_dir)
    scored = io.read_table(out_file, columns=["anomaly_score", "is_anomaly"])
    m = evaluate_scores(labels_from(test_df, "label"), scored["anomaly_score"], scored["is_anomaly"])
    n_rows = result["summary"]["rows"]
    state.echo(f"scored:    {n_rows:,} held-out rows in {score_s:.1f} s ({n_rows / max(score_s, 1e-9):,.0f} "
               f"rows/s) -> {out_file}")
    state.echo("")
    state.echo(f"held-out results ({m['n']:,} rows, {m['n_anomalies']:,} fraud):")
    state.echo(f"  AUROC                 {_fmt(m['auroc'], 3)}")
    state.echo(f"  AUPRC                 {_fmt(m['auprc'], 3)}  (fraud rate {m['n_anomalies'] / m['n']:.3f})")
    state.echo(f"  FPR on normals        {_fmt(m['fpr'], 4)}  (target {det.calibration_['target_fpr']})")
    state.echo(f"  recall at threshold   {_fmt(m['recall'], 3)}")
    state.echo(f"  flagged rows          {m['flagged']:,}")
    state.echo("")
    if run is not None:
        state.echo(f"MLflow: run {run.run_id}; registered {register} version {run.version} as @champion")
        state.echo_store("store:", 8)
        state.echo("next:")
        state.echo(f"  mlflow ui --backend-store-uri {state.resolved_uri}   (or: make ui)")
        state.echo(f"  anomaly-vae score -m models:/{register}@champion {test_path.resolve()} "
                   f"-o {Path(scored_dir).resolve()}")
    else:
        state.echo("next:")
        state.echo(f"  anomaly-vae score -m {Path(model_dir).resolve()} {test_path.resolve()} "
                   f"-o {Path(scored_dir).resolve()}")
    state.echo(f"(demo took {time.perf_counter() - t_start:.0f} s)")
