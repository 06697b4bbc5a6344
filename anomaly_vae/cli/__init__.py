"""The `anomaly-vae` command line: train, score, evaluate, sample, encode, models, demo, retrain.

`state` holds what the commands share (options, logging, error -> exit code mapping); each
family of commands lives in its own module (`train`, `score`, `models`, `demo`) and is
attached to the `main` group here. Entry point: ``anomaly_vae.cli:run`` (`main`, then a quick exit).
"""
from __future__ import annotations

import atexit
import os
import sys
import threading

import click

from . import demo as _demo, models as _models, score as _score, train as _train
from .state import (INTERNAL_ERROR, SCORING_THREADS, USER_ERROR, CLIError, State, _exit_on_sigterm,  # noqa: F401
                    _Group, _setup_logging, _to_cli_error, pass_state, shared_options)

@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="anomaly-vae")
@shared_options
@click.pass_context
def main(ctx: click.Context) -> None:
    """Variational-autoencoder anomaly detection for tables and transactions.

    \b
    Quick start:
      anomaly-vae demo                                  # data -> train -> score -> evaluate
      anomaly-vae train data/*.parquet --label label --register payments
      anomaly-vae models promote payments 1 --alias champion
      anomaly-vae score -m models:/payments@champion incoming/ -o scored/

    The options below are accepted after the subcommand too (`anomaly-vae score ... -q`).

    Exit codes: 0 ok, 2 usage error or bad input, 1 internal error, 3 locked out by another
    run (a score into the same output directory, a retrain of the same model).
    """
    state = ctx.ensure_object(State)        # filled by the shared options' callbacks
    _setup_logging(state.quiet, state.debug)
    _exit_on_sigterm(ctx)


for _command in (_train.train, _train.evaluate, _score.score, _score.sample, _score.encode,
                 _models.models, _demo.demo):
    main.add_command(shared_options(_command))

# `retrain` (pipelines/retrain.py) is attached on first use: see state.LAZY_COMMANDS.

# Arrow's allocator for the whole process, C++ included: pyarrow reads ARROW_DEFAULT_MEMORY_POOL
# once, on import (a value the user set is kept). `io.use_system_memory_pool` switches only
# pyarrow's own default afterwards; the parquet reader and compute kernels still took
# mimalloc's pages, which on Linux with transparent huge pages ("madvise") were zeroed 2 MB at
# a time through much of a fresh process's first million rows (perf: clear_page_erms 23% of
# the samples). 1M wide rows, `score --no-mlflow`, 3 alternating runs: 4.99 / 4.79 / 4.59 s
# (kernel time 0.6-0.8 s) against 5.82 / 4.85 / 5.58 s (1.0-1.5 s); peak RSS 558 against
# 627 MB, and at 10M rows 616 against 681 MB. "system" is in every pyarrow build.
ARROW_MEMORY_POOL = "system"


def _choose_arrow_allocator() -> None:
    """Set ARROW_DEFAULT_MEMORY_POOL (unless set) before pyarrow is imported; the MLflow child
    process inherits it. Once pyarrow is loaded (`main` called in process) it is too late: no-op."""
    if "pyarrow" not in sys.modules:
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", ARROW_MEMORY_POOL)


def run() -> None:
    """The console entry point: `main`, then the end of an interpreter's shutdown without
    its last, slow part. Python's own shutdown first waits for threads, then runs the atexit
    handlers (logging, MLflow, temporary-directory finalizers), then frees every module,
    which with torch, pyarrow and pandas loaded takes ~0.5 s (measured: `import torch,
    pyarrow.parquet, pandas` 2.4 s with the normal exit, 1.9 s without its last step). Here
    the first two steps run as usual, then the streams are flushed and the process exits.
    Arrow's allocator is chosen first (`_choose_arrow_allocator`)."""
    _choose_arrow_allocator()
    try:
        main.main(prog_name="anomaly-vae")
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):     # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    shutdown = getattr(threading, "_shutdown", None)    # joins the non-daemon threads
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe (`anomaly-vae ... | head`)
            pass
    os._exit(code)
