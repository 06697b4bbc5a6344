"""MLflow runs of `anomaly-vae score`: one run per invocation, beside the model's training run.

A `ScoringRun` is made before scoring (cheap: nothing imported or written yet), started by
`batch.score_files` once the output lock is held (`start`; a run locked out by another `score`
never opens one), fed every scored batch (`on_batch`, a `monitor.ScoringMonitor`) and ended
FINISHED (`finish`) or FAILED (`fail`: bad input, --keep-going failures, SIGTERM, Ctrl-C).

The MLflow side is a `RunWriter`. It runs in a child process (`anomaly_vae.scoring_child`,
started with ``python -m``: no torch, its own GIL), so importing MLflow and opening the store
never slow the scoring down; the scoring process only gathers the statistics. The figures are
drawn once scoring is over: by the child, or, when the child is still opening the run (a
short run), by the scoring process meanwhile (`ScoringRun._end`). `score` starts that child
before it loads the model (`prepare_child`: MLflow is imported and the store opened on the CPU
the loading leaves idle, about 3 s) and `start` sends it the run to open; without a prepared
child, `start` starts one. `finish` / `fail` send the results and wait for the child to have
ended the run (at most END_TIMEOUT seconds). If the scoring process dies (SIGKILL, OOM
killer) the child reads end-of-file instead of the results and ends the run FAILED
(ABANDONED). With ``background=False`` the same `RunWriter` runs in-process (e.g. for tests of
timing).

The run goes to the experiment of the model's training run (from the registered version or
the run of a runs:/ or models:/<model_id> URI), else to the named experiment; tag
``anomaly_vae.run_type=scoring`` tells it apart from ``training`` / ``evaluation`` / ``retrain``
runs. It is linked to the logged model it used (a run input of type model, MLflow 3) and tagged
``model_name`` / ``model_version`` / ``model_uri`` (a local model directory: ``model_path``).

One of the tracking modules, the only ones that import mlflow (here inside functions, and only
in `RunWriter`: the scoring process never imports it for a run).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping, Sequence

from . import __version__

if TYPE_CHECKING:
    import pyarrow as pa

    from .detector import VAEAnomalyDetector
    from .monitor import ScoringMonitor

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "anomaly-vae"      # = store.DEFAULT_EXPERIMENT (not imported: it loads mlflow)
RUN_TYPE_TAG = "anomaly_vae.run_type"
RUN_TYPE = "scoring"
MAX_LISTED_INPUTS = 20          # inputs named in the `inputs` param (the count is `n_inputs`)
MAX_PARAM_CHARS = 500
TOP_ROWS_ARTIFACT = "flagged/top_flagged.csv"
END_TIMEOUT = 120.0             # seconds `finish` / `fail` wait for the child to end the run
CHILD_MODULE = "anomaly_vae.scoring_child"
ABANDONED = "scoring process ended without finishing (killed?)"
_LOGGED_MODEL = re.compile(r"^models:/(m-[0-9a-f]+)/?$")
_METRIC_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


class RunWriter:
    """The MLflow side of one scoring run, everything that imports mlflow: `open` the run,
    `end` it with the results. The same code runs in the child process and in-process.

    spec : what `ScoringRun.spec` sends: tracking_uri, experiment, explicit_experiment, info
        (the model info dict), run_name, params (name -> value, logged as they are)
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.info = dict(spec["info"])
        self.experiment = spec["experiment"]
        self.explicit_experiment = bool(spec["explicit_experiment"])
        self.run_name = spec.get("run_name")
        self.params = dict(spec["params"])
        self.tracking_uri = spec.get("tracking_uri")
        self.client: Any = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None

    # ------------------------------------------------------------------ opening
    @staticmethod
    def prepare(tracking_uri: str | None) -> None:
        """What `open` needs before it knows the run: MLflow imported, the store (and its
        registry) opened; MLflow caches the stores by URI, so `open` reuses them. Run by the
        child while the scoring process loads torch and the model. A store that does not open
        is left for `open`, which raises the same error in its place."""
        from mlflow.tracking import MlflowClient

        from .store import _ensure_configured

        try:
            client = MlflowClient(_ensure_configured(tracking_uri))
            client._get_registry_client()
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.debug("preparing the MLflow store failed (open will say why): %s", exc)

    def _experiment_id(self) -> str:
        """The training run's experiment (unless explicit), else `experiment` (created if missing)."""
        from mlflow.exceptions import MlflowException

        from .store import _experiment_id, mark_experiment_kind

        run_id = self.info.get("run_id")
        if run_id and not self.explicit_experiment:
            try:
                exp_id = self.client.get_run(run_id).info.experiment_id
                mark_experiment_kind(self.client, self.client.get_experiment(exp_id))
                return exp_id
            except MlflowException as exc:
                log.warning("training run %s of %s not readable (%s); logging to experiment %r",
                            run_id, self.info.get("uri"), exc.message, self.experiment)
        return _experiment_id(self.client, self.experiment)

    def _model_id(self) -> str | None:
        """The MLflow 3 logged model behind the model used (None for a local directory)."""
        from mlflow.exceptions import MlflowException

        from .registry import MODEL_ARTIFACT_PATH

        uri, name, version = self.info.get("uri") or "", self.info.get("name"), self.info.get("version")
        try:
            if name and version is not None:      # a version's source is its logged model (MLflow 3)
                mv = self.client.get_model_version(name, str(version))
                m = _LOGGED_MODEL.match(getattr(mv, "model_id", None) and f"models:/{mv.model_id}" or mv.source or "")
                if m:
                    return m[1]
            m = _LOGGED_MODEL.match(uri)
            if m:
                return m[1]
            if self.info.get("run_id"):
                run = self.client.get_run(self.info["run_id"])
                for out in getattr(run.outputs, "model_outputs", None) or []:
                    if self.client.get_logged_model(out.model_id).name == MODEL_ARTIFACT_PATH:
                        return out.model_id
        except MlflowException as exc:
            log.warning("cannot find the logged model of %s (%s); the run is linked by tags only",
                        uri, exc.message)
        return None

    def _tags(self, model_id: str | None) -> dict[str, str]:
        from .store import _owner_tags

        info = self.info
        tags = {RUN_TYPE_TAG: RUN_TYPE, **_owner_tags(), "model_uri": str(info.get("uri"))}
        if info.get("name"):
            tags["model_name"] = str(info["name"])
        if info.get("version") is not None:
            tags["model_version"] = str(info["version"])
        if info.get("run_id"):
            tags["anomaly_vae.training_run_id"] = str(info["run_id"])
        if model_id:
            tags["model_id"] = model_id
        if not (info.get("name") or info.get("run_id") or str(info.get("uri", "")).startswith("models:/")):
            tags["model_path"] = str(info.get("uri"))       # a local model directory: no version
        return tags

    def open(self) -> dict[str, Any]:
        """Import MLflow, open the store, find the experiment, end the runs of killed processes,
        create the run with its tags, params and model link (the part that takes seconds).
        Returns run_id, experiment_id, tracking_uri and the UI links (ui, experiment_ui)."""
        from mlflow.entities import LoggedModelInput, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from .store import _ensure_configured, end_interrupted_runs, ui_url

        self.tracking_uri = _ensure_configured(self.tracking_uri)
        self.client = MlflowClient()
        self.experiment_id = self._experiment_id()
        end_interrupted_runs(self.client, self.experiment_id)
        model_id = self._model_id()
        name = self.run_name or f"score {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
        run = self.client.create_run(self.experiment_id, run_name=name, tags=self._tags(model_id))
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in self.params.items()])
        if model_id:
            try:
                self.client.log_inputs(self.run_id, models=[LoggedModelInput(model_id)])
            except MlflowException as exc:      # e.g. a server older than MLflow 3
                log.warning("cannot link run %s to logged model %s: %s", self.run_id, model_id, exc.message)
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.tracking_uri,
                "ui": ui_url(self.experiment_id, self.run_id, self.tracking_uri),
                "experiment_ui": ui_url(self.experiment_id, None, self.tracking_uri)}

    # ------------------------------------------------------------------ end
    def end(self, results: Mapping[str, Any]) -> dict[str, Any]:
        """Log `results` (`ScoringRun.results`: status, metrics, error, monitor_error, summary,
        artifacts) and end the run with their status. If logging fails the run still ends
        FAILED, and the error is raised."""
        try:
            self._log_results(results)
        except BaseException:
            try:
                self.client.set_terminated(self.run_id, "FAILED")
            finally:
                raise
        self.client.set_terminated(self.run_id, results["status"])
        return {"status": results["status"]}

    def _log_results(self, results: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        tags = [RunTag(k, v[:5000]) for k, v in (("anomaly_vae.error", results.get("error")),
                                                 ("anomaly_vae.monitor_error", results.get("monitor_error"))) if v]
        metrics = [Metric(k, v, now, 0) for k, v in (results.get("metrics") or {}).items()]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        if results.get("artifacts") is not None:
            self._log_artifacts(results["artifacts"], results.get("summary"))
        elif results.get("summary") is not None:
            self.client.log_dict(self.run_id, results["summary"], "summary.json")

    def _log_artifacts(self, data: Mapping[str, Any], summary: Mapping[str, Any] | None) -> None:
        """drift/ (table as CSV and JSON, PSI plot), the top flagged rows, the score histogram
        over the calibration scores and summary.json; `data` is from `ScoringRun.results`,
        with the figures as PNG bytes when the scoring process drew them (`ScoringRun._end`)."""
        table = data["drift"]
        figures = data.get("figures")
        if figures is None:
            figures = draw_figures(data)
        with tempfile.TemporaryDirectory(prefix="anomaly-vae-run-") as tmp:
            root = Path(tmp)
            for sub in ("drift", "flagged", "plots"):
                (root / sub).mkdir()
            table.to_csv(root / "drift" / "drift.csv", index=False)
            (root / "drift" / "drift.json").write_text(table.to_json(orient="records", indent=1))
            data["top_rows"].to_csv(root / TOP_ROWS_ARTIFACT, index=False)
            for name, png in figures.items():
                (root / name).write_bytes(png)
            if summary is not None:
                (root / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            self.client.log_artifacts(self.run_id, str(root))


class ScoringRun:
    """The MLflow run of one `score` invocation (see the module docstring).

    det, model_info : the detector and `registry.load_detector`'s info dict (uri, name, version, run_id)
    experiment : experiment for models without a training run, or for every model with
        `explicit_experiment`
    inputs, params : what the run was asked to do (params: output, batch_size, keep, resume, ...)
    tracking_uri : the store (default: the one `store.configure` chose, else env / default)
    background : the MLflow side in a child process (False: in-process, in `start` and `finish`,
        e.g. for tests of timing)
    """

    def __init__(self, det: "VAEAnomalyDetector", model_info: Mapping[str, Any], *,
                 experiment: str = DEFAULT_EXPERIMENT, explicit_experiment: bool = False,
                 inputs: Sequence[Any] = (), params: Mapping[str, Any] | None = None,
                 tracking_uri: str | None = None, run_name: str | None = None,
                 background: bool = True, child: "_ChildWriter | None" = None) -> None:
        from .monitor import ScoringMonitor

        self.det = det
        self.info = dict(model_info)
        self.experiment = experiment
        self.explicit_experiment = explicit_experiment
        self.inputs = [str(p) for p in inputs]
        self.params = dict(params or {})
        self.run_name = run_name
        self.background = background
        self.tracking_uri = tracking_uri
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.monitor: ScoringMonitor = ScoringMonitor(
            getattr(det, "reference_", None) or {}, getattr(det, "calibration_scores_", []), det.schema_,
            det.threshold_, passthrough=list(det.schema_.ids))
        self.monitor_error: str | None = None
        self._t0 = 0.0
        self._writer: _ChildWriter | _InProcessWriter | None = None
        self._child = child
        self._links: dict[str, str] = {}

    def spec(self) -> dict[str, Any]:
        """What `RunWriter` needs to open the run (sent to the child at `start`)."""
        listed = self.inputs[:MAX_LISTED_INPUTS]
        text = ", ".join(listed) + (f", ... (+{len(self.inputs) - len(listed)} more)"
                                    if len(self.inputs) > len(listed) else "")
        if len(text) > MAX_PARAM_CHARS:
            text = text[:MAX_PARAM_CHARS - 3] + "..."
        params = {"inputs": text, "n_inputs": len(self.inputs), **self.params,
                  "threshold": float(self.det.threshold_), "anomaly_vae_version": __version__}
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                "explicit_experiment": self.explicit_experiment, "info": self.info, "run_name": self.run_name,
                "params": {k: v for k, v in params.items() if v is not None}, "log_levels": log_levels()}

    # ------------------------------------------------------------------ hooks
    def start(self) -> None:
        """Start opening the run (in the child process unless background=False) and the clock."""
        self._t0 = time.perf_counter()
        if not self.background:
            self._writer = _InProcessWriter(self.spec())
            return
        child, self._child = self._child or _ChildWriter(), None
        self._writer = child.open(self.spec())

    def discard(self) -> None:
        """Stop a child process given at construction that no run was started in (the
        command failed or was locked out before scoring): it exits without opening a run."""
        child, self._child = self._child, None
        if child is not None:
            child.close()

    def on_batch(self, source: Any, batch: "pa.RecordBatch", scored: "pa.RecordBatch") -> None:
        """Feed one scored batch to the monitor. A monitor failure (a bug) never fails the
        scoring: it is logged once, monitoring stops and the run gets tag anomaly_vae.monitor_error."""
        self._watch(self.monitor.update, batch, scored, str(source))

    def _watch(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a monitor call, unless monitoring stopped; a failure stops it (see `on_batch`)."""
        if self.monitor_error is not None:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - see on_batch
            self.monitor_error = f"{type(exc).__name__}: {exc}"
            log.warning("scoring-run statistics stopped (scores are not affected): %s", self.monitor_error,
                        exc_info=log.isEnabledFor(logging.DEBUG))

    def on_input(self, source: Any, status: str) -> None:
        """An input is over; a failed one's batches leave the statistics (it has no output)."""
        if status == "failed" and self.monitor_error is None:
            self.monitor.discard(str(source))

    # ------------------------------------------------------------------ end
    def metrics(self, summary: Mapping[str, Any] | None = None, seconds: float | None = None) -> dict[str, float]:
        """Everything logged as a metric; `summary` is `batch.score_files`'s (None when it raised)."""
        if seconds is None:
            seconds = time.perf_counter() - self._t0 if self._t0 else 0.0
        self._watch(self.monitor.flush)          # the batches not counted yet
        out = {} if self.monitor_error else self.monitor.metrics()
        cal = getattr(self.det, "calibration_", None) or {}
        out.update({"threshold": float(self.det.threshold_), "seconds": seconds})
        if cal.get("method") == "contamination":
            out["contamination"] = float(cal["contamination"])
        else:
            out["target_fpr"] = float(self.det.config_.target_fpr)
        if summary is not None:
            out.update({"rows": float(summary["rows"]), "flagged": float(summary["flagged"]),
                        "flag_rate": summary["flagged"] / summary["rows"] if summary["rows"] else 0.0,
                        "files": float(summary["files"]), "files_scored": float(summary["scored"]),
                        "files_skipped": float(summary["skipped"]), "files_failed": float(summary["failed"])})
        if "rows" in out:
            out["rows_per_s"] = out["rows"] / seconds if seconds > 0 else 0.0
        return {_metric_key(k): float(v) for k, v in out.items() if v is not None and v == v}

    def results(self, status: str, summary: Mapping[str, Any] | None, error: str | None,
                seconds: float | None = None) -> dict[str, Any]:
        """What `RunWriter.end` logs: status, metrics, error and monitor_error tags, summary
        (summary.json) and the monitor's data for the artifacts (None when it saw no row)."""
        artifacts = None
        self._watch(self.monitor.flush)
        if self.monitor_error is None and self.monitor.rows:
            mon = self.monitor
            artifacts = {"drift": mon.drift_table(), "top_rows": mon.top_rows(), "score_sample": mon.score_sample(),
                         "calibration_scores": mon.calibration_scores, "threshold": mon.threshold}
        return {"status": status, "metrics": self.metrics(summary, seconds), "error": error,
                "monitor_error": self.monitor_error, "artifacts": artifacts,
                "summary": None if summary is None else _summary_json(summary)}

    def _end(self, results: Mapping[str, Any]) -> bool:
        """Have the writer end the run with `results`; raise what opening or ending it raised
        (a run that did not answer in END_TIMEOUT seconds is a warning). False if never started."""
        writer, self._writer = self._writer, None          # ended once: `fail` after `finish` does nothing
        if writer is None:
            self.discard()
            return False
        artifacts = results.get("artifacts")
        if artifacts is not None and isinstance(writer, _ChildWriter) and writer.opening():
            # the child is still importing MLflow or opening the store (a short run): the figures
            # are drawn here meanwhile, on the other core (a 1,000-row `score`, 3 alternating
            # runs: 3.00-3.45 s against 3.50-4.21 s when the child drew them after opening)
            try:
                results = {**results, "artifacts": {**artifacts, "figures": draw_figures(artifacts)}}
            except Exception as exc:  # noqa: BLE001 - the child draws them (or says why it cannot)
                log.debug("drawing the scoring run's figures failed: %s", exc)
        opened, ended = writer.end(results, END_TIMEOUT)
        if "ok" in opened:
            self._links = opened["ok"]
            self.run_id, self.experiment_id = self._links["run_id"], self._links["experiment_id"]
            self.tracking_uri = self._links["tracking_uri"]
        for reply in (opened, ended or {}):
            if "timeout" in reply:
                log.warning("%s", reply["timeout"])
            elif "error" in reply:
                raise reply["error"]
        return True

    def finish(self, summary: Mapping[str, Any]) -> dict[str, float]:
        """Log metrics and artifacts of a run that went through every input; end it FINISHED,
        or FAILED when some input failed (--keep-going). Returns the metrics."""
        seconds = time.perf_counter() - self._t0 if self._t0 else 0.0     # scoring, not logging
        failed = bool(summary.get("failed"))
        error = f"{summary['failed']} input(s) failed; first: {summary['failures'][0]}" if failed else None
        results = self.results("FAILED" if failed else "FINISHED", summary, error, seconds)
        self._end(results)
        return results["metrics"]

    def fail(self, exc: BaseException) -> None:
        """End the run FAILED after `exc` (what was gathered so far is logged). Never raises:
        the original error is what the caller reports. Nothing to do if the run never started."""
        if self._writer is None:
            self.discard()
            return
        try:
            what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, SystemExit):
                what = f"stopped by a signal (exit {exc.code})"
            self._end(self.results("FAILED", None, " ".join(what.split())))
        except Exception as err:  # noqa: BLE001 - the scoring error matters more
            log.warning("could not end scoring run %s as FAILED: %s", self.run_id, err)

    def ui(self) -> str:
        """The run in the MLflow UI."""
        return self._links["ui"]

    def experiment_ui(self) -> str:
        """The experiment's runs table in the MLflow UI."""
        return self._links["experiment_ui"]


def draw_figures(data: Mapping[str, Any]) -> dict[str, bytes]:
    """A scoring run's figures as PNG bytes by artifact path (`ScoringRun.results`'s
    artifacts): the score histogram over the calibration scores, the PSI per column."""
    import io as _io

    from . import plots
    from .drift import psi_plot

    out = {}
    for name, fig in (("plots/score_histogram.png",
                       plots.scores_vs_calibration(data["score_sample"], data["calibration_scores"], data["threshold"])),
                      ("drift/psi.png", psi_plot(data["drift"]))):
        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        out[name] = buf.getvalue()
    return out


# ------------------------------------------------------------------ where RunWriter runs
def log_levels() -> dict[str, int]:
    """The scoring process's log levels, which the child applies to itself."""
    return {name: logging.getLogger(name).getEffectiveLevel() for name in ("anomaly_vae", "mlflow", "alembic")}


def prepare_child(tracking_uri: str | None = None) -> "_ChildWriter":
    """Start the child process of a scoring run now, before torch and the model are loaded:
    it imports MLflow and opens the store `tracking_uri` (default: the one `store.configure`
    would choose) on the CPU that loading leaves idle, so the run opens at once when scoring
    starts. Pass it to `ScoringRun(child=...)`; if no run is started, `ScoringRun.discard`
    (or the child's `close`) lets it exit without opening one."""
    return _ChildWriter({"tracking_uri": tracking_uri, "log_levels": log_levels()})


def send(stream: IO[bytes], message: Any) -> None:
    """One message between the scoring process and its child (pickled: both ends are this
    package, and nothing read from a file goes through the pipe)."""
    pickle.dump(message, stream, protocol=pickle.HIGHEST_PROTOCOL)
    stream.flush()


def receive(stream: IO[bytes]) -> Any:
    """The next message of `send` (EOFError at the end of the pipe)."""
    return pickle.load(stream)


def call(fn: Any, *args: Any) -> dict[str, Any]:
    """{"ok": fn(*args)}, or {"error": the exception it raised}."""
    try:
        return {"ok": fn(*args)}
    except Exception as exc:  # noqa: BLE001 - raised by `ScoringRun._end`, in the scoring process
        return {"error": exc}


def picklable_error(exc: Exception) -> Exception:
    """`exc` if it survives pickling, else a copy that does (an MlflowException subclass with
    its own __init__ -> MlflowException with the same error code, anything else -> RuntimeError),
    its type name leading the message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - whatever unpickling a custom exception type raises
        pass
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode

    text = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
    if isinstance(exc, MlflowException):
        copy: Exception = MlflowException(text, error_code=ErrorCode.Value(exc.error_code))
    else:
        copy = RuntimeError(text)
    for note in getattr(exc, "__notes__", ()):
        copy.add_note(note)
    return copy


class _InProcessWriter:
    """A `RunWriter` called in this process (background=False): opens the run right away."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.writer = RunWriter(spec)
        self.opened = call(self.writer.open)

    def end(self, results: Mapping[str, Any], timeout: float) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(the reply of `open`, the reply of `end`, None when the run did not open)."""
        if "ok" not in self.opened:
            return self.opened, None
        return self.opened, call(self.writer.end, results)


class _ChildWriter:
    """A `RunWriter` in a child process (`anomaly_vae.scoring_child`, the protocol is there),
    started at once (optionally preparing the store, `prepare_child`); `open` sends it the
    run's spec. Its replies are read on a thread (so that waiting is bounded)."""

    def __init__(self, prepare: Mapping[str, Any] | None = None) -> None:
        package_root = str(Path(__file__).resolve().parents[1])     # the child runs this very code
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        self.replies: queue.Queue[Any] = queue.Queue()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", CHILD_MODULE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": path})
            if prepare is not None:
                send(self.proc.stdin, {"prepare": dict(prepare)})   # small: fits in the pipe, never blocks
        except OSError as exc:                     # raised by `finish`, as an error opening the run
            self.proc = None
            self.replies.put({"error": exc})
            return
        threading.Thread(target=self._read, name="mlflow-scoring-run", daemon=True).start()

    def open(self, spec: Mapping[str, Any]) -> "_ChildWriter":
        """Have the child open the run of `spec` (it replies when it has; see `end`)."""
        if self.proc is not None:
            try:
                send(self.proc.stdin, dict(spec))
            except OSError as exc:
                self.replies.put({"error": exc})
        return self

    def close(self) -> None:
        """End a child that was never sent a spec: at end of file it exits, opening nothing,
        once it has prepared (not waited for here: an error exit is not delayed by MLflow's
        imports; a thread reaps it)."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        threading.Thread(target=self.proc.wait, name="mlflow-scoring-run-exit", daemon=True).start()

    def opening(self) -> bool:
        """Whether the child has not answered yet (it is still preparing or opening the run)."""
        return self.proc is not None and self.replies.empty()

    def _read(self) -> None:
        try:
            while True:
                self.replies.put(receive(self.proc.stdout))
        except Exception:  # noqa: BLE001 - end of file (or a torn message): the child is gone
            self.replies.put(None)

    def _reply(self, deadline: float, timeout: float) -> dict[str, Any]:
        try:
            reply = self.replies.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return {"timeout": f"the MLflow scoring run (process {self.proc.pid}) did not answer in "
                               f"{timeout:.0f} s; it may still end the run"}
        if reply is None:
            self.replies.put(None)
            return {"error": RuntimeError(f"the MLflow scoring-run process {self.proc.pid} exited "
                                          f"(code {self.proc.wait()}) before ending the run")}
        return reply

    def end(self, results: Mapping[str, Any], timeout: float) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Send `results` (the child reads them as soon as they come, even while it opens the
        run), then wait for it to have opened and ended the run and exited (`timeout` seconds
        in all). Returns the two replies (see `_InProcessWriter`). After a timeout the child
        still ends the run with these results on its own."""
        deadline = time.monotonic() + timeout
        try:
            send(self.proc.stdin, dict(results))
            self.proc.stdin.close()
        except (OSError, AttributeError):      # the child died (or never started): its reply says so
            pass
        opened = self._reply(deadline, timeout)
        if "ok" not in opened:
            return opened, None
        ended = self._reply(deadline, timeout)
        if "timeout" not in ended:
            try:
                self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return opened, ended


def _metric_key(name: str) -> str:
    return _METRIC_KEY.sub("_", name)


def _summary_json(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("files", "scored", "skipped", "failed", "failures", "rows", "flagged")
            if k in summary}


def scoring_runs(experiment: str = DEFAULT_EXPERIMENT, *, tracking_uri: str | None = None,
                 model_name: str | None = None, max_results: int = 100) -> list[dict[str, Any]]:
    """Scoring runs of `experiment`, oldest first: {"run_id", "status", "start_time" (UTC ISO),
    "model_name", "model_version", **metrics} (e.g. to chart flag_rate per night in a notebook)."""
    from mlflow.tracking import MlflowClient

    from .store import _ensure_configured

    _ensure_configured(tracking_uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    where = f"tags.`{RUN_TYPE_TAG}` = '{RUN_TYPE}'"
    if model_name:
        where += f" and tags.model_name = '{model_name}'"
    runs = client.search_runs([exp.experiment_id], filter_string=where,
                              order_by=["attributes.start_time DESC"], max_results=max_results)
    return [{"run_id": r.info.run_id, "status": r.info.status,
             "start_time": datetime.fromtimestamp(r.info.start_time / 1000, timezone.utc).isoformat(),
             "model_name": r.data.tags.get("model_name"), "model_version": r.data.tags.get("model_version"),
             **r.data.metrics} for r in reversed(runs)]

