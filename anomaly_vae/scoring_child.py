"""The child process of a scoring run: `python -m anomaly_vae.scoring_child`, started by
`scoring_runs.ScoringRun.start`. It runs the `scoring_runs.RunWriter` (MLflow, pandas,
matplotlib; never torch) beside the scoring process, with its own interpreter and GIL.
matplotlib is imported once the run is open, if the results have not come yet (a short run's
scoring process draws the figures itself while this one opens the run).

Protocol (messages of `scoring_runs.send`; stdin from the scoring process, replies on the
original stdout, which is moved away from fd 1 so that nothing else can write into it):

    in:  optionally {"prepare": {tracking_uri, log_levels}} (`scoring_runs.prepare_child`): no reply;
         MLflow is imported and the store opened while the scoring process loads its model
    in:  the run spec (`ScoringRun.spec`)        out: {"ok": run_id, experiment_id, ...} or {"error": exc}
    in:  the results (`ScoringRun.results`)      out: {"ok": {"status": ...}} or {"error": exc}

then it exits. End of file on stdin instead of the results (the scoring process was SIGKILLed
or crashed): the run ends FAILED with tag ``anomaly_vae.error`` = `scoring_runs.ABANDONED`.
It runs at normal priority: since loading stopped importing scikit-learn, the scoring process
is ready in ~2.3 s, before this process has imported MLflow and opened the store (~3-4 s of
CPU); at nice +10 that work then waited for the end of the scoring, and `finish` with it
(1M rows, alternating runs: 8.0 vs 8.5 s demo, 8.8 vs 9.2 s wide).
Its life follows the pipe: SIGINT, SIGTERM and SIGHUP sent to the whole process group (Ctrl-C,
systemd, a closed terminal) are ignored here; the scoring process handles them and either
sends its results or dies (end of file).
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
import warnings
from typing import Any, Mapping

log = logging.getLogger("anomaly_vae.scoring_runs")


def _setup_logging(levels: Mapping[str, int]) -> None:
    """The scoring process's log levels; warnings on stderr (its stderr), nothing with -q."""
    if levels.get("anomaly_vae", logging.WARNING) >= logging.ERROR:      # -q: as `State.muted`
        sys.stderr = sys.stdout = io.StringIO()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    pkg = logging.getLogger("anomaly_vae")
    pkg.addHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    if levels.get("anomaly_vae", logging.WARNING) > logging.DEBUG:      # as the CLI: warnings only with --debug
        warnings.simplefilter("ignore")


def _portable(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply whose exception survives the pipe, with this process's traceback as a note."""
    exc = reply.get("error")
    if exc is None:
        return reply
    from .scoring_runs import picklable_error

    exc.add_note("in the MLflow scoring-run process:\n" + "".join(traceback.format_exception(exc)).rstrip())
    return {"error": picklable_error(exc)}


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                       # stray prints of libraries go to stderr, not into the protocol
    requests = sys.stdin.buffer

    from .scoring_runs import ABANDONED, RunWriter, call, receive, send

    def reply(message: dict[str, Any]) -> None:
        try:
            send(replies, _portable(message))
        except OSError:                 # the scoring process is gone (it timed out or was killed)
            pass

    try:
        spec = receive(requests)
        if "prepare" in spec:
            _setup_logging(spec["prepare"].get("log_levels") or {})
            call(RunWriter.prepare, spec["prepare"].get("tracking_uri"))     # what fails here, `open` reports
            spec = receive(requests)
        else:
            _setup_logging(spec.get("log_levels") or {})
    except (EOFError, pickle.UnpicklingError):
        return 0                        # ended (or killed) before it said what to open: no run
    incoming: queue.Queue[Any] = queue.Queue()

    def read_results() -> None:         # at once, so that the scoring process never waits to send them
        try:
            incoming.put(receive(requests))
        except Exception:  # noqa: BLE001 - end of file or a torn message: the scoring process died
            incoming.put(None)

    threading.Thread(target=read_results, name="results", daemon=True).start()
    writer = RunWriter(spec)
    opened = call(writer.open)
    reply(opened)
    if "ok" not in opened:
        return 1
    if incoming.empty():                # scoring goes on: import what drawing the figures needs
        try:
            from . import drift, plots  # noqa: F401
        except Exception:  # noqa: BLE001 - `end` imports them again and reports the error
            pass
    results = incoming.get()
    if results is None:
        log.warning("scoring run %s: %s; ending it FAILED", writer.run_id, ABANDONED)
        results = {"status": "FAILED", "error": ABANDONED}
    reply(call(writer.end, results))
    return 0


if __name__ == "__main__":
    # The run is ended and its reply sent: skip the interpreter's teardown (with MLflow and
    # SQLAlchemy loaded it takes about a second, which `finish` would wait for).
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
