"""What every `anomaly-vae` command shares: the State of the group's options, logging,
the mapping of errors to exit codes, reusable options and small helpers.

Heavy imports (torch via the detector, MLflow via tracking) happen inside functions so that
`--help` stays fast. Errors are mapped to exit codes in one place (`_Group.invoke`):
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
from typing import Any, Callable, Iterator

import click
from click.core import ParameterSource

from ..errors import AnomalyVAEError, DataError, LockedError, ModelNotFoundError

log = logging.getLogger(__name__)
USER_ERROR, INTERNAL_ERROR, LOCKED = 2, 1, 3
_stopped_by = 0          # the signal `_exit_on_sigterm`'s handler has raised SystemExit for (0: none)
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
    """The one place that decides exit codes: locked out by another run -> 3, bad input -> 2,
    anything else -> 1."""
    if isinstance(exc, LockedError):
        return CLIError(str(exc), LOCKED)
    if isinstance(exc, AnomalyVAEError):
        return CLIError(str(exc), USER_ERROR)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return CLIError(f"{where}{exc.strerror or exc}", USER_ERROR)
    if type(exc).__name__ == "MlflowException" and getattr(exc, "error_code", "") in _MLFLOW_USER_CODES:
        return CLIError(f"MLflow: {getattr(exc, 'message', exc)}", USER_ERROR)
    return CLIError(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                    INTERNAL_ERROR)


# Commands imported only when invoked (pipelines/ pulls in pandas, sklearn and torch):
# name -> (module, attribute, short help shown by `anomaly-vae --help` without importing it).
LAZY_COMMANDS = {"retrain": ("pipelines.retrain", "retrain_command",
                             "Retrain on recent dated partitions; promote if better.")}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS and name not in self.commands:
            import importlib

            module, attr, _ = LAZY_COMMANDS[name]
            self.add_command(shared_options(getattr(importlib.import_module(module), attr)), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of --help, without importing the lazy commands."""
        names = [n for n in self.list_commands(ctx)]
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            if name in LAZY_COMMANDS and name not in self.commands:
                rows.append((name, LAZY_COMMANDS[name][2]))
                continue
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            if isinstance(ctx.obj, State):
                ctx.obj.echo_store()          # every command that used the store names it
            return result
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to an exit code right here
            if _stopped_by:       # the stop's SystemExit, turned into another error on its way out
                raise SystemExit(128 + _stopped_by) from exc
            debug = ctx.obj.debug if isinstance(ctx.obj, State) else False
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


def _exit_on_sigterm(ctx: click.Context) -> None:
    """SIGTERM (systemd stop, Airflow/cron timeouts, `kill`) raises SystemExit(143) in the main
    thread, so open MLflow runs end as FAILED instead of staying RUNNING (SIGKILL cannot be caught:
    the next run start marks those KILLED). The previous handler is restored when the command ends.

    The SystemExit is raised wherever the main thread is, and code in between may turn it into
    another error: a pybind11 extension being imported (matplotlib's, for a run's plots) reports
    "ImportError: initialization failed". `_stopped_by` remembers the signal, so the command
    still exits 128 + signal instead of "internal error"."""
    import signal
    import threading

    global _stopped_by
    if threading.current_thread() is not threading.main_thread():
        return
    _stopped_by = 0

    def stop(signum: int, frame: Any) -> None:
        global _stopped_by
        _stopped_by = signum
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


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
    device: str | None = None
    precision: str | None = None
    resolved_uri: str | None = None
    _tracking: Any = field(default=None, repr=False)
    _store_echoed: bool = field(default=False, repr=False)

    @property
    def progress(self) -> bool:
        """Progress bars only on an interactive terminal, never with --quiet."""
        return not self.quiet and sys.stderr.isatty()

    def echo(self, message: str = "") -> None:
        if not self.quiet:
            click.echo(message)

    def echo_store(self, label: str = "store:", width: int = 9) -> None:
        """``store:   <URI>`` once per command, if the command used the MLflow store (the group
        prints it after the command's summary unless the command did so itself)."""
        if self.resolved_uri is not None and not self._store_echoed:
            self._store_echoed = True
            self.echo(f"{label:<{width}}{self.resolved_uri}")

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
                from .. import tracking
                self.resolved_uri = tracking.configure(self.tracking_uri)
                logging.getLogger("mlflow").setLevel(logging.ERROR if self.quiet else logging.WARNING)
                logging.getLogger("alembic").setLevel(logging.ERROR if self.quiet else logging.WARNING)
            self._tracking = tracking
        return self._tracking

    def registry(self) -> Any:
        """anomaly_vae.registry on the configured store: the registry commands need neither the
        run-logging code of `tracking` (pandas, plots, sklearn) nor torch."""
        if self.resolved_uri is None:
            with self.muted():
                from .. import store
                self.resolved_uri = store.configure(self.tracking_uri)
                logging.getLogger("mlflow").setLevel(logging.ERROR if self.quiet else logging.WARNING)
                logging.getLogger("alembic").setLevel(logging.ERROR if self.quiet else logging.WARNING)
        from .. import registry
        return registry

    def set_threads(self) -> None:
        """Torch threads for scoring: --threads, else 1. The scoring MLP is small; on the shared
        2-core machine one thread scored 100k rows in 0.5 s vs 2-3 s with two (OpenMP contention)."""
        import torch
        torch.set_num_threads(self.threads or SCORING_THREADS)

    def load_model(self, model: str) -> tuple[Any, dict[str, Any]]:
        """A local model directory (no MLflow needed) or a models:/ or runs:/ URI, loaded as a
        `FittedDetector` (scoring only, so no sklearn import)."""
        from ..fitted import FittedDetector
        from ..persist import model_exists

        self.set_threads()
        path = Path(model)
        if path.is_dir() or model_exists(path):
            det = FittedDetector.load(path)
            # absolute, but not resolved: a model path is a link to its current version directory
            return self.runtime(det), {"uri": os.path.abspath(path), "name": None, "version": None,
                                       "run_id": None}
        if ":/" not in model:
            raise ModelNotFoundError(f"{model}: no such model directory (and not a models:/NAME@alias, "
                                     "models:/NAME/VERSION or runs:/ID/model URI)")
        with self.muted():
            det, info = self.tracking().load_detector(model, FittedDetector)
        return self.runtime(det), info

    def runtime(self, det: Any) -> Any:
        """Apply --device / --precision to a loaded detector (validated: ConfigError)."""
        from ..config import Config

        params = {k: v for k, v in (("device", self.device), ("precision", self.precision)) if v is not None}
        if params:
            Config(**params)                 # same checks and messages as at fit
            det.set_params(**params)
        return det

    def detector_runtime(self) -> dict[str, str]:
        """--device / --precision as detector keyword arguments (for train)."""
        return {k: v for k, v in (("device", self.device), ("precision", self.precision)) if v is not None}


pass_state = click.make_pass_decorator(State)


# ------------------------------------------------------------------ shared options
# The one definition of the options every command accepts, before or after its name
# (`anomaly-vae -q score ...` = `anomaly-vae score ... -q`); a value given after wins.
SHARED_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--quiet", "-q"), dict(is_flag=True, help="No progress bars or summaries; only errors (for cron).")),
    (("--debug",), dict(is_flag=True, help="Show tracebacks and debug logs.")),
    (("--tracking-uri",), dict(metavar="URI", help="MLflow tracking/registry store [default: "
                                                   "$MLFLOW_TRACKING_URI, else sqlite:///$ANOMALY_VAE_HOME/mlruns/"
                                                   "mlflow.db, else sqlite:///~/.local/share/anomaly-vae/mlruns/"
                                                   "mlflow.db]")),
    (("--threads",), dict(type=click.IntRange(min=1), default=None,
                          help="Threads: score workers (each batch on one thread); torch threads for other "
                               "commands [default: every CPU for score, the detector's rule for training].")),
    (("--device",), dict(default=None, metavar="DEVICE",
                         help="Where the network runs for train and score: auto (CUDA when available), cpu, "
                              "cuda, cuda:N [default: auto].")),
    (("--precision",), dict(type=click.Choice(["auto", "float32", "bfloat16"]), default=None,
                            help="Scoring MLP precision: auto = bfloat16 where it is faster than float32 (AMX, or "
                                 "AVX512-BF16 on AMD), else float32 (see README: Speed) [default: the model's setting: "
                                 "auto for new models; older model files say float32].")),
)
SHARED_NAMES = frozenset(decls[0].lstrip("-").replace("-", "_") for decls, _ in SHARED_OPTIONS)


def _take_shared(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Callback of a shared option: a value given on the command line goes into the State
    (created here when the command runs on its own, e.g. `python -m pipelines.retrain`)."""
    if ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
        return
    state = ctx.ensure_object(State)
    setattr(state, param.name, value)
    if param.name in ("quiet", "debug") and isinstance(ctx.find_root().command, _Group):
        _setup_logging(state.quiet, state.debug)


def shared_options(f: Callable | click.Command) -> Any:
    """Add the SHARED_OPTIONS to a command or group (as a decorator, or on a built command);
    their values are read from the State (`pass_state`), not passed as arguments."""
    def options() -> list[click.Option]:
        return [click.Option(list(decls), expose_value=False, callback=_take_shared, **kw)
                for decls, kw in SHARED_OPTIONS]

    if isinstance(f, click.Command):
        if not SHARED_NAMES & {p.name for p in f.params}:
            f.params.extend(options())
        if isinstance(f, click.Group):
            for sub in f.commands.values():
                shared_options(sub)
        return f
    for opt in reversed(options()):
        click.decorators._param_memo(f, opt)
    return f


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
    from ..evaluate import labels_from

    if label not in df.columns:
        raise DataError(f"{_where(paths)}: label column '{label}' not found; columns are {list(df.columns)}")
    try:
        return int(labels_from(df, label).sum())
    except DataError as exc:
        raise DataError(f"{_where(paths)}: {exc}") from exc


def _fmt(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)
