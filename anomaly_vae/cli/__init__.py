"""The `anomaly-vae` command line: train, score, evaluate, sample, encode, models, demo, retrain.

`state` holds what the commands share (options, logging, error -> exit code mapping); each
family of commands lives in its own module (`train`, `score`, `models`, `demo`) and is
attached to the `main` group here. Entry point: ``anomaly_vae.cli:main``.
"""
from __future__ import annotations

import click

from . import demo as _demo, models as _models, score as _score, train as _train
from .state import (INTERNAL_ERROR, SCORING_THREADS, USER_ERROR, CLIError, State, _exit_on_sigterm,  # noqa: F401
                    _Group, _setup_logging, _to_cli_error, pass_state)

@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="anomaly-vae")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summaries; only errors (for cron).")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--tracking-uri", metavar="URI",
              show_default="$MLFLOW_TRACKING_URI, else sqlite:///$ANOMALY_VAE_HOME/mlruns/mlflow.db, else "
                           "sqlite:///~/.local/share/anomaly-vae/mlruns/mlflow.db",
              help="MLflow tracking/registry store.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              show_default="every CPU for score, the detector's rule for training",
              help="Threads: score workers (each batch on one thread); torch threads for other commands.")
@click.option("--device", default=None, metavar="DEVICE", show_default="auto",
              help="Where the network runs for train and score: auto (CUDA when available), cpu, cuda, cuda:N.")
@click.option("--precision", type=click.Choice(["float32", "bfloat16"]), default=None,
              show_default="the model's (float32)",
              help="Scoring MLP precision; bfloat16 is faster on CPUs with BF16 (see README: Speed).")
@click.pass_context
def main(ctx: click.Context, quiet: bool, debug: bool, tracking_uri: str | None, threads: int | None,
         device: str | None, precision: str | None) -> None:
    """Variational-autoencoder anomaly detection for tables and transactions.

    \b
    Quick start:
      anomaly-vae demo                                  # data -> train -> score -> evaluate
      anomaly-vae train data/*.parquet --label label --register payments
      anomaly-vae models promote payments 1 --alias champion
      anomaly-vae score -m models:/payments@champion incoming/ -o scored/

    Exit codes: 0 ok, 2 usage error or bad input, 1 internal error, 3 locked out by another
    run (a score into the same output directory, a retrain of the same model).
    """
    _setup_logging(quiet, debug)
    _exit_on_sigterm(ctx)
    ctx.obj = State(quiet=quiet, debug=debug, tracking_uri=tracking_uri, threads=threads, device=device,
                    precision=precision)


for _command in (_train.train, _train.evaluate, _score.score, _score.sample, _score.encode,
                 _models.models, _demo.demo):
    main.add_command(_command)


def _add_retrain() -> None:
    from pipelines.retrain import retrain_command   # scheduled retraining lives in pipelines/
    main.add_command(retrain_command, name="retrain")


_add_retrain()
