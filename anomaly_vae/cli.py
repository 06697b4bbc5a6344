"""The `anomaly-vae` command line: train, score, evaluate, sample, encode, models, demo.

Heavy imports (torch via the detector, MLflow via tracking) happen inside the commands so
that `--help` stays fast. Errors are mapped to exit codes in one place (`_Group.invoke`):
0 ok, 2 usage or bad input (one line on stderr), 1 internal error (traceback with --debug).
"""
from __future__ import annotations

import contextlib
import io as _stdio
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import click

from .errors import AnomalyVAEError, DataError, ModelNotFoundError, SchemaMismatchError

log = logging.getLogger(__name__)
USER_ERROR, INTERNAL_ERROR = 2, 1
SCORING_THREADS = 1
# MLflow error codes that mean "you asked for something that does not exist / is invalid"
_MLFLOW_USER_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS",
                      "NOT_FOUND", "BAD_REQUEST"}


# ------------------------------------------------------------------ plumbing
class CLIError(click.ClickException):
    """A one-line error for the user with its exit code."""

    def __init__(self, message: str, exit_code: int = USER_ERROR) -> None:
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code


def _to_cli_error(exc: BaseException) -> CLIError:
    """The one place that decides exit codes: bad input -> 2, anything else -> 1."""
    if isinstance(exc, AnomalyVAEError):
        return CLIError(str(exc), USER_ERROR)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return CLIError(f"{where}{exc.strerror or exc}", USER_ERROR)
    if type(exc).__name__ == "MlflowException" and getattr(exc, "error_code", "") in _MLFLOW_USER_CODES:
        return CLIError(f"MLflow: {getattr(exc, 'message', exc)}", USER_ERROR)
    return CLIError(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                    INTERNAL_ERROR)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to an exit code right here
            debug = bool(ctx.find_root().params.get("debug", False))
            err = _to_cli_error(exc)
            if debug:
                if err.exit_code == INTERNAL_ERROR:
                    raise          # the full traceback, exit code 1
                traceback.print_exc(file=sys.stderr)
            raise err from exc


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever sys.stderr is at the time (works under click's CliRunner)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if debug else logging.INFO
    pkg = logging.getLogger("anomaly_vae")
    if not any(isinstance(h, _StderrHandler) for h in pkg.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        pkg.addHandler(handler)
        warn = logging.getLogger("py.warnings")
        warn.addHandler(handler)
        warn.propagate = False
    pkg.setLevel(level)
    logging.getLogger("py.warnings").setLevel(logging.ERROR if quiet or not debug else logging.WARNING)
    logging.captureWarnings(True)


@dataclass
class State:
    """Options of the `anomaly-vae` group, shared by every command."""

    quiet: bool = False
    debug: bool = False
    tracking_uri: str | None = None
    threads: int | None = None
    resolved_uri: str | None = None
    _tracking: Any = field(default=None, repr=False)

    @property
    def progress(self) -> bool:
        """Progress bars only on an interactive terminal, never with --quiet."""
        return not self.quiet and sys.stderr.isatty()

    def echo(self, message: str = "") -> None:
        if not self.quiet:
            click.echo(message)

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Silence MLflow's own stderr chatter in --quiet mode (errors still raise)."""
        if not self.quiet:
            yield
            return
        with contextlib.redirect_stderr(_stdio.StringIO()):
            yield

    def tracking(self) -> Any:
        """anomaly_vae.tracking, configured once with --tracking-uri (or the env / default)."""
        if self._tracking is None:
            if not self.progress:      # MLflow's artifact download bars are noise in logs
                os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            with self.muted():
                from . import tracking
                self.resolved_uri = tracking.configure(self.tracking_uri)
                logging.getLogger("mlflow").setLevel(logging.ERROR if self.quiet else logging.WARNING)
                logging.getLogger("alembic").setLevel(logging.ERROR if self.quiet else logging.WARNING)
            self._tracking = tracking
        return self._tracking

    def set_threads(self) -> None:
        """Torch threads for scoring: --threads, else 1. The scoring MLP is small; on the shared
        2-core machine one thread scored 100k rows in 0.5 s vs 2-3 s with two (OpenMP contention)."""
        import torch
        torch.set_num_threads(self.threads or SCORING_THREADS)

    def load_model(self, model: str) -> tuple[Any, dict[str, Any]]:
        """A local model directory (no MLflow needed) or a models:/ or runs:/ URI."""
        from .detector import VAEAnomalyDetector

        self.set_threads()
        path = Path(model)
        if path.is_dir():
            det = VAEAnomalyDetector.load(path)
            return det, {"uri": str(path.resolve()), "name": None, "version": None, "run_id": None}
        if ":/" not in model:
            raise ModelNotFoundError(f"{model}: no such model directory (and not a models:/NAME@alias, "
                                     "models:/NAME/VERSION or runs:/ID/model URI)")
        with self.muted():
            return self.tracking().load_detector(model)


pass_state = click.make_pass_decorator(State)


def _model_option(f):
    return click.option("--model", "-m", "model", required=True, metavar="MODEL",
                        help="Model directory, models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model.")(f)


def _mlflow_options(f):
    f = click.option("--experiment", default="anomaly-vae", show_default=True,
                     help="MLflow experiment name.")(f)
    return click.option("--no-mlflow", is_flag=True, help="Do not log to MLflow.")(f)


def _split_names(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """Option callback: `--exclude a,b --exclude c` -> ('a', 'b', 'c') (repeated and/or comma lists)."""
    return tuple(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))


def _column_list_option(name: str, help: str):
    return click.option(name, multiple=True, metavar="COL[,COL...]", callback=_split_names,
                        help=f"{help} (repeat the option or give a comma-separated list).")


def _where(paths: list[Path], most: int = 3) -> str:
    """The input file(s) for an error message: 'a.parquet, b.parquet, c.parquet (+2 more)'."""
    more = f" (+{len(paths) - most} more)" if len(paths) > most else ""
    return ", ".join(str(p) for p in paths[:most]) + more


def _check_labels(df: Any, label: str, paths: list[Path]) -> int:
    """Number of anomalies in the label column; DataError naming the input file(s) when the
    column is absent or holds values other than 1/0 (checked before any model work)."""
    from .evaluate import labels_from

    if label not in df.columns:
        raise DataError(f"{_where(paths)}: label column '{label}' not found; columns are {list(df.columns)}")
    try:
        return int(labels_from(df, label).sum())
    except DataError as exc:
        raise DataError(f"{_where(paths)}: {exc}") from exc


def _fmt(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


# ------------------------------------------------------------------ group
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="anomaly-vae")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summaries; only errors (for cron).")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", metavar="URI",
              show_default="$MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db", help="MLflow tracking URI.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              show_default="1 for scoring, the detector's rule for training", help="Torch threads.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, debug: bool, tracking_uri: str | None, threads: int | None) -> None:
    """Variational-autoencoder anomaly detection for tables and transactions.

    \b
    Quick start:
      anomaly-vae demo                                  # data -> train -> score -> evaluate
      anomaly-vae train data/*.parquet --label label --register payments
      anomaly-vae models promote payments 1 --alias champion
      anomaly-vae score -m models:/payments@champion incoming/ -o scored/

    Exit codes: 0 ok, 2 usage error or bad input, 1 internal error; retrain also 3 (another
    retrain holds the lock).
    """
    _setup_logging(quiet, debug)
    ctx.obj = State(quiet=quiet, debug=debug, tracking_uri=tracking_uri, threads=threads)


# ------------------------------------------------------------------ train
@main.command(short_help="Fit a detector on parquet/CSV data and save / log / register it.")
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
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              show_default="models/<register name or first input's name>", help="Model directory to write.")
@click.option("--register", metavar="NAME", help="Register the model in the MLflow registry under NAME.")
@_mlflow_options
@pass_state
def train(state: State, data: tuple[str, ...], label: str | None, categorical: tuple[str, ...],
          exclude: tuple[str, ...], id_col: tuple[str, ...], target_fpr: float, contamination: float | None,
          epochs: int | None, latent_dim: int | None, seed: int, output: str | None, register: str | None,
          no_mlflow: bool, experiment: str) -> None:
    """Fit a detector on DATA (parquet/CSV files, directories searched recursively, or globs).

    Saves a model directory and, unless --no-mlflow, logs an MLflow run (params, per-epoch
    metrics, plots, the model) and optionally registers it.

    \b
    Examples:
      anomaly-vae train data/transactions.parquet --label label --exclude customer_id
      anomaly-vae train 'data/2026-*.parquet' --id-col txn_id --register payments
      anomaly-vae train data/ --epochs 20 --no-mlflow -o models/quick
    """
    from . import io
    from .detector import VAEAnomalyDetector

    if register and no_mlflow:
        raise click.BadParameter("--register needs MLflow; drop --no-mlflow", param_hint="--register")
    paths = io.expand_inputs(data)
    df = io.read_tables(paths)
    if len(df) < 2:
        raise DataError(f"{_where(paths)}: {len(df)} row(s); training needs at least 2")
    n_anom = 0
    if label:                       # check the label column before spending time on training
        n_anom = _check_labels(df, label, paths)
    det = VAEAnomalyDetector(label=label, categorical=categorical or None, exclude=exclude or None,
                             id_cols=id_col or None, target_fpr=target_fpr, contamination=contamination,
                             max_epochs=epochs, latent_dim=latent_dim, random_state=seed,
                             n_threads=state.threads, verbose=state.progress)
    try:
        det.fit(df)
    except (DataError, SchemaMismatchError) as exc:   # fit names columns and rows; add the file(s)
        raise type(exc)(f"{_where(paths)}: {exc}") from exc
    out_dir = Path(output or Path("models") / (register or paths[0].stem))
    det.save(out_dir)
    run = None
    if not no_mlflow:
        with state.muted():
            run = state.tracking().log_training_run(
                det, df, dataset_name=paths[0].stem, dataset_source=",".join(str(p) for p in paths),
                label=label, experiment=experiment, register_as=register)
    _train_summary(state, det, len(df), n_anom, label, out_dir, run, register)


def _train_summary(state: State, det: Any, n_rows: int, n_anom: int, label: str | None, out_dir: Path,
                   run: Any, register: str | None) -> None:
    kinds: dict[str, list[str]] = {}
    for c in det.schema_.columns:
        kinds.setdefault(c.kind, []).append(c.name)
    h, cal = det.history_, det.calibration_
    feat = ", ".join(f"{len(kinds[k])} {k}" for k in ("numeric", "categorical", "boolean", "datetime") if k in kinds)
    state.echo(f"rows:       {n_rows:,} read, {n_rows - n_anom:,} used for training"
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
        if register:
            state.echo(f"registered: {register} version {run.version} "
                       f"(promote: anomaly-vae models promote {register} {run.version} --alias champion)")


# ------------------------------------------------------------------ score
@main.command(short_help="Score files in streamed batches to <name>.scored.parquet.")
@_model_option
@click.argument("inputs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Output directory: one <name>.scored.parquet per input, plus _manifest.json.")
@click.option("--keep", type=click.Choice(["ids", "all"]), default="ids", show_default=True,
              help="Pass through the model's id columns, or every input column.")
@click.option("--batch-size", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Rows per record batch (memory grows with it).")
@click.option("--resume", is_flag=True, help="Skip inputs the manifest marks done (after an interrupted run).")
@click.option("--keep-going", "-k", is_flag=True,
              help="On an input with bad data, record it as failed and score the others; exit 2 at the end.")
@pass_state
def score(state: State, model: str, inputs: tuple[str, ...], output: str, keep: str, batch_size: int,
          resume: bool, keep_going: bool) -> None:
    """Score INPUTS (parquet/CSV files, directories searched recursively, or globs) in
    streamed batches.

    Output columns: the id columns (or all with --keep all) + anomaly_score, recon_nll, kl,
    p_value, is_anomaly, top_features. Each output appears only when complete. A file named
    directly goes to OUTPUT/<name>.scored.parquet; files found under a directory or glob keep
    their sub-folders below it (incoming/dt=2026-01-01/part-0.parquet ->
    OUTPUT/dt=2026-01-01/part-0.scored.parquet), the same path on every run. With --resume,
    an output that the manifest gives to another input is never overwritten.

    A bad input stops the run (finished outputs are kept); with --keep-going the other inputs
    are scored first, and the exit code is still 2. Nightly jobs: --resume --keep-going.

    An id column of the model missing from an input, or an input with no rows, is a warning
    (on stderr unless -q, and in the file's _manifest.json entry), not an error: the file is still scored,
    without that key column / into an empty output with the usual columns.

    \b
    Examples:
      anomaly-vae score -m models:/payments@champion incoming/ -o scored/
      anomaly-vae score -m models/demo data/transactions_holdout.parquet -o scored/demo --keep all
      anomaly-vae -q score -m models:/payments/3 'landing/*.parquet' -o scored/ --resume
    """
    from . import batch, io

    pairs = io.expand_inputs_with_roots(inputs)
    det, info = state.load_model(model)
    t0 = time.perf_counter()
    result = batch.score_files(det, [f for f, _ in pairs], output, model_info=info, keep=keep,
                               batch_size=batch_size, resume=resume, progress=state.progress,
                               keep_going=keep_going, roots=[r for _, r in pairs])
    wall = time.perf_counter() - t0
    s = result["summary"]
    rate = s["rows"] / wall if wall > 0 else 0.0
    label = info["uri"] if info.get("version") is None else f"{info['name']} v{info['version']} ({info['uri']})"
    state.echo(f"model:   {label}")
    state.echo(f"files:   {s['scored']} scored" + (f", {s['skipped']} skipped (done)" if s["skipped"] else "")
               + (f", {s['failed']} failed" if s["failed"] else ""))
    state.echo(f"rows:    {s['rows']:,} scored, {s['flagged']:,} flagged "
               f"({100 * s['flagged'] / max(s['rows'], 1):.2f}%), {rate:,.0f} rows/s")
    state.echo(f"output:  {output} (manifest {Path(output) / batch.MANIFEST})")
    if s["failed"]:
        raise DataError(f"{s['failed']} of {s['files']} input(s) failed (the others were scored; see "
                        f"{Path(output) / batch.MANIFEST}); first: {s['failures'][0]}")


# ------------------------------------------------------------------ evaluate
@main.command(short_help="AUROC / AUPRC / FPR / recall of a model on labelled data.")
@_model_option
@click.argument("data", nargs=-1, required=True)
@click.option("--label", default="label", show_default=True, metavar="COL",
              help="Label column: 1 / true / yes = anomaly, 0 / false / no = normal.")
@_mlflow_options
@pass_state
def evaluate(state: State, model: str, data: tuple[str, ...], label: str, no_mlflow: bool, experiment: str) -> None:
    """Measure a model on labelled DATA: AUROC, AUPRC, FPR on normals, recall at the threshold.

    \b
    Examples:
      anomaly-vae evaluate -m models:/payments@champion data/holdout.parquet --label label
      anomaly-vae evaluate -m models/demo data/transactions_holdout.parquet --no-mlflow
    """
    from . import io

    paths = io.expand_inputs(data)
    df = io.read_tables(paths)
    if len(df) == 0:
        raise DataError(f"{_where(paths)}: no rows to evaluate")
    _check_labels(df, label, paths)
    det, info = state.load_model(model)
    if no_mlflow:
        from .evaluate import evaluate as run_eval
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


# ------------------------------------------------------------------ sample / encode
@main.command(short_help="Draw synthetic rows from a model.")
@_model_option
@click.option("-n", "--rows", "n", type=click.IntRange(min=1), default=100, show_default=True,
              help="Number of synthetic rows.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Output .parquet (or .csv) file.")
@pass_state
def sample(state: State, model: str, n: int, seed: int, output: str) -> None:
    """Draw synthetic rows from the model (in the training schema; datetimes as hour of day).

    \b
    Example:
      anomaly-vae sample -m models/demo -n 1000 -o synthetic.parquet
    """
    from . import io

    det, _ = state.load_model(model)
    rows = io.write_frame(det.sample(n, seed=seed), output)
    state.echo(f"wrote {rows:,} synthetic rows to {output}")


@main.command(short_help="Latent means (z0..zK) of every row, with id columns.")
@_model_option
@click.argument("data", nargs=-1, required=True)
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Output .parquet file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=65536, show_default=True)
@pass_state
def encode(state: State, model: str, data: tuple[str, ...], output: str, batch_size: int) -> None:
    """Write latent means z0..zK (plus id columns) for every row of DATA.

    \b
    Example:
      anomaly-vae encode -m models:/payments@champion data/transactions.parquet -o latents.parquet
    """
    from tqdm.auto import tqdm

    from . import batch, io

    paths = io.expand_inputs(data)
    det, _ = state.load_model(model)
    total = sum(io.count_rows(p) or 0 for p in paths) or None
    with tqdm(total=total, unit="row", unit_scale=True, desc="encode", disable=not state.progress, leave=False) as bar:
        rows = batch.encode_files(det, paths, output, batch_size=batch_size, progress=bar.update)
    state.echo(f"wrote {rows:,} rows x {det.config_.latent_dim} latent dims to {output}")


# ------------------------------------------------------------------ models
@main.group(short_help="List registered model versions; move aliases (champion).")
def models() -> None:
    """List registered model versions and move aliases (champion / challenger)."""


@models.command("list", short_help="All registered models, or the versions of model NAME.")
@click.argument("name", required=False)
@pass_state
def models_list(state: State, name: str | None) -> None:
    """List the versions of registered model NAME with aliases and metrics; without NAME,
    list every registered model with its latest version and aliases.

    \b
    Examples:
      anomaly-vae models list
      anomaly-vae models list demo-transactions
    """
    if name is None:
        _list_registered_models(state)
        return
    with state.muted():
        versions = state.tracking().list_versions(name)
    if not versions:
        raise ModelNotFoundError(f"registered model '{name}' has no versions")
    for v in versions:
        aliases = ",".join(f"@{a}" for a in v.get("aliases") or []) or "-"
        metrics = " ".join(f"{k}={_fmt(m, 3)}" for k, m in sorted((v.get("metrics") or {}).items())
                           if k in ("auroc", "auprc", "fpr_at_threshold", "recall", "threshold"))
        created = str(v.get("created") or "")[:19].replace("T", " ")
        # the listing is this command's output, so it is printed even with --quiet
        click.echo(f"{name} v{v['version']:<4} {aliases:<24} run {v.get('run_id') or '-'}  {created}  "
                   f"{metrics}".rstrip())


@models.command("promote", short_help="Point alias ALIAS of model NAME at VERSION.")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@click.option("--alias", default="champion", show_default=True, help="Alias to point at VERSION.")
@pass_state
def models_promote(state: State, name: str, version: int, alias: str) -> None:
    """Point alias ALIAS of registered model NAME at VERSION.

    \b
    Examples:
      anomaly-vae models promote payments 3                 # -> @champion
      anomaly-vae models promote payments 4 --alias challenger
    """
    with state.muted():
        tracking = state.tracking()
        known = {int(v["version"]) for v in tracking.list_versions(name)}
        if version not in known:
            raise ModelNotFoundError(f"registered model '{name}' has no version {version}; "
                                     f"versions: {sorted(known) or 'none'}")
        before = tracking.get_alias_version(name, alias)
        tracking.set_alias(name, version, alias)
    was = f" (was version {before})" if before is not None and before != version else ""
    state.echo(f"{name}@{alias} -> version {version}{was}")


def _list_registered_models(state: State) -> None:
    """One line per registered model: name, latest version, aliases (printed even with --quiet)."""
    with state.muted():
        tracking = state.tracking()                        # configures the store first
        found = tracking.list_models()
    if not found:
        state.echo(f"no registered models in {state.resolved_uri}")
        return
    for m in found:
        latest = f"v{m['latest']}" if m["latest"] is not None else "-"
        aliases = " ".join(f"@{a}=v{v}" for a, v in sorted(m["aliases"].items())) or "-"
        click.echo(f"{m['name']:<24} latest {latest:<5} {aliases}")


# ------------------------------------------------------------------ demo
@main.command(short_help="Synthetic transactions -> train -> score -> evaluate -> MLflow.")
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
    from . import batch, io
    from .demo import DEMO_EXCLUDE, make_transactions
    from .detector import VAEAnomalyDetector
    from .evaluate import evaluate_scores, labels_from

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
                             n_threads=state.threads, verbose=state.progress)
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
        state.echo("next:")
        state.echo(f"  mlflow ui --backend-store-uri {_ui_uri(state.resolved_uri)}   (or: make ui)")
        state.echo(f"  anomaly-vae score -m models:/{register}@champion {test_path} -o scored/demo")
    else:
        state.echo("next:")
        state.echo(f"  anomaly-vae score -m {model_dir} {test_path} -o scored/demo")
    state.echo(f"(demo took {time.perf_counter() - t_start:.0f} s)")


def _ui_uri(uri: str | None) -> str:
    """The store URI as `mlflow ui` run from the current directory needs it (relative when default)."""
    default = "sqlite:///" + str((Path.cwd() / "mlruns" / "mlflow.db").resolve())
    return "sqlite:///mlruns/mlflow.db" if uri == default else str(uri)


def _add_retrain() -> None:
    from pipelines.retrain import retrain_command   # scheduled retraining lives in pipelines/
    main.add_command(retrain_command, name="retrain")


_add_retrain()

if __name__ == "__main__":  # pragma: no cover
    main()
