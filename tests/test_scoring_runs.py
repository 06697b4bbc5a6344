"""`anomaly-vae score` runs in MLflow (anomaly_vae.scoring_runs): a real SQLite store, a model
logged and registered by the library, the real CLI (CliRunner in-process; a subprocess for SIGTERM)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from anomaly_vae import batch
from anomaly_vae import tracking as T
from anomaly_vae.cli import main
from anomaly_vae.demo import make_transactions
from anomaly_vae.drift import drift_table
from anomaly_vae.scoring_runs import scoring_runs
from conftest import log_demo_model

NAME = "runs-payments"
EXPERIMENT = "payments-training"
ENTRY = Path(sys.executable).with_name("anomaly-vae")
SCORING = "tags.`anomaly_vae.run_type` = 'scoring'"


def cli(*args, ok: bool = True):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if ok:
        assert r.exit_code == 0, (r.output, r.exception)
    return r


@pytest.fixture(scope="module")
def env(tmp_path_factory, new_mlflow_store):
    """A registered model (@champion) trained in experiment EXPERIMENT, a local copy of it, and
    two nights of new transactions (the second with drift: amounts x3, card never present)."""
    root = tmp_path_factory.mktemp("scoring-runs")
    with T.preserve_configuration():
        uri, det, train, test, run = log_demo_model(new_mlflow_store(root), n_rows=3000, n_train=2000, seed=5,
                                                    name=NAME, dataset_name="runs-train", experiment=EXPERIMENT)
        T.set_alias(NAME, run.version, "champion")
    det.save(root / "local-model")
    nights = {}
    for i, night in enumerate(("2026-11-30", "2026-12-01")):
        d = root / "landing" / night
        d.mkdir(parents=True)
        df = make_transactions(1200, fraud_rate=0.03, seed=20 + i).drop(columns=["label"])
        if i == 1:
            df["amount"] *= 3.0
            df["card_present"] = False
        df.iloc[:600].to_parquet(d / "part-0.parquet", index=False)
        df.iloc[600:].to_parquet(d / "part-1.parquet", index=False)
        nights[night] = (d, df)
    client = MlflowClient(uri, registry_uri=uri)
    return SimpleNamespace(uri=uri, root=root, det=det, run=run, nights=nights, client=client,
                           exp_id=client.get_experiment_by_name(EXPERIMENT).experiment_id)


def _scoring_runs(env, exp_id=None):
    return env.client.search_runs([exp_id or env.exp_id], filter_string=SCORING,
                                  order_by=["attributes.start_time ASC"])


def _artifacts(client, run_id, path=None):
    return sorted(a.path for a in client.list_artifacts(run_id, path))


def test_nightly_runs_beside_the_training_run_with_metrics_drift_and_model_link(env, tmp_path):
    before = {r.info.run_id for r in _scoring_runs(env)}
    outs = {}
    for night, (d, _) in env.nights.items():
        outs[night] = tmp_path / night
        r = cli("--tracking-uri", env.uri, "score", "-m", f"models:/{NAME}@champion", d, "-o", outs[night])
        assert f"ui:      http://127.0.0.1:5000/#/experiments/{env.exp_id}/runs?workflowType=machine_learning" \
            in r.stdout
    runs = [r for r in _scoring_runs(env) if r.info.run_id not in before]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)

    training = env.client.get_run(env.run.run_id)
    assert all(r.info.experiment_id == training.info.experiment_id for r in runs)  # not in "anomaly-vae"
    assert training.data.tags["anomaly_vae.run_type"] == "training"
    exp = env.client.get_experiment(env.exp_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    mv = env.client.get_model_version(NAME, str(env.run.version))
    for run, (night, (d, df)) in zip(runs, env.nights.items()):
        tags, m, p = run.data.tags, run.data.metrics, run.data.params
        assert (tags["model_name"], tags["model_version"], tags["model_uri"]) == (NAME, "1", f"models:/{NAME}@champion")
        assert mv.source == f"models:/{tags['model_id']}" and "model_path" not in tags
        linked = env.client.get_run(run.info.run_id).inputs.model_inputs          # MLflow 3 model link
        assert [i.model_id for i in linked] == [tags["model_id"]]
        assert p["n_inputs"] == "2" and "part-0.parquet" in p["inputs"] and p["batch_size"] == "32768"
        assert p["output"] == str(outs[night]) and p["resume"] == "False"

        summary = json.loads((outs[night] / "_manifest.json").read_text())["files"]
        scored = pd.concat([pd.read_parquet(outs[night] / f"part-{i}.scored.parquet") for i in range(2)])
        assert m["rows"] == 1200 and m["flagged"] == scored["is_anomaly"].sum() == sum(
            e["flagged"] for e in summary.values())
        assert m["flag_rate"] == pytest.approx(scored["is_anomaly"].mean())
        assert m["target_fpr"] == 0.01 and m["threshold"] == pytest.approx(env.det.threshold_)
        assert (m["files"], m["files_scored"], m["files_skipped"], m["files_failed"]) == (2, 2, 0, 0)
        assert m["score_p50"] == pytest.approx(np.quantile(scored["anomaly_score"], 0.5))
        assert m["score_p99"] == pytest.approx(np.quantile(scored["anomaly_score"], 0.99))
        assert m["score_max"] == pytest.approx(scored["anomaly_score"].max())
        assert m["rows_per_s"] > 0 and m["seconds"] > 0
        want = drift_table(env.det.reference_, env.det.schema_.validate(df), new_scores=scored["anomaly_score"],
                           reference_scores=env.det.calibration_scores_).set_index("feature")["psi"]
        for feature in env.det.reference_:
            assert m[f"psi_{feature}"] == pytest.approx(want[feature], rel=1e-9, abs=1e-12), feature
        assert m["psi_score"] == pytest.approx(want["anomaly_score"])
        assert m["psi_max"] == pytest.approx(want.drop("anomaly_score").max())

        assert _artifacts(env.client, run.info.run_id) == ["drift", "flagged", "plots", "summary.json"]
        assert _artifacts(env.client, run.info.run_id, "plots") == ["plots/score_histogram.png"]
        assert _artifacts(env.client, run.info.run_id, "drift") == ["drift/drift.csv", "drift/drift.json", "drift/psi.png"]
        local = env.client.download_artifacts(run.info.run_id, "flagged/top_flagged.csv", str(tmp_path / run.info.run_id))
        top = pd.read_csv(local)
        flagged = scored[scored["is_anomaly"]].sort_values("anomaly_score", ascending=False)
        assert len(top) == min(100, len(flagged)) > 0
        assert list(top["transaction_id"][:10]) == list(flagged["transaction_id"][:10])
        assert json.loads(top["explanation"].iloc[0])[0]["column"]

    quiet, drifted = runs
    with T.preserve_configuration():                 # the notebook view of the same runs, oldest first
        nights = scoring_runs(EXPERIMENT, tracking_uri=env.uri, model_name=NAME)
    assert [n["run_id"] for n in nights][-2:] == [quiet.info.run_id, drifted.info.run_id]
    assert nights[-1]["flag_rate"] == drifted.data.metrics["flag_rate"] and nights[-1]["model_version"] == "1"
    assert drifted.data.metrics["psi_amount"] > 0.25 > quiet.data.metrics["psi_amount"]
    assert drifted.data.metrics["psi_card_present"] > 0.25 > quiet.data.metrics["psi_card_present"]
    assert drifted.data.metrics["flag_rate"] > quiet.data.metrics["flag_rate"]


def test_local_model_dir_no_mlflow_and_explicit_experiment(env, tmp_path):
    d, _ = env.nights["2026-11-30"]
    before = len(_scoring_runs(env))
    r = cli("--tracking-uri", env.uri, "score", "-m", env.root / "local-model", d, "-o", tmp_path / "a")
    assert "mlflow:  run" in r.stdout
    local_exp = env.client.get_experiment_by_name("anomaly-vae")          # no training run known: --experiment
    (run,) = _scoring_runs(env, local_exp.experiment_id)
    assert run.data.tags["model_path"] == str(env.root / "local-model") and "model_version" not in run.data.tags
    assert env.client.get_run(run.info.run_id).inputs.model_inputs == [] and run.data.metrics["rows"] == 1200
    assert local_exp.tags["mlflow.experimentKind"] == "custom_model_development"

    r = cli("--tracking-uri", env.uri, "score", "--no-mlflow", "-m", f"models:/{NAME}@champion", d, "-o", tmp_path / "b")
    assert "mlflow:" not in r.stdout and len(_scoring_runs(env)) == before

    cli("--tracking-uri", env.uri, "score", "-m", f"models:/{NAME}@champion", d, "-o", tmp_path / "c",
        "--experiment", "elsewhere")                                    # given explicitly: it wins
    (other,) = _scoring_runs(env, env.client.get_experiment_by_name("elsewhere").experiment_id)
    assert other.data.tags["model_version"] == "1" and len(_scoring_runs(env)) == before


def test_keep_going_failure_ends_failed_counting_only_the_scored_files(env, tmp_path):
    d, df = env.nights["2026-11-30"]
    land = tmp_path / "land"
    land.mkdir()
    for i in range(2):
        (land / f"ok-{i}.parquet").write_bytes((d / f"part-{i}.parquet").read_bytes())
    bad = df.iloc[:500].copy()
    bad["amount"] = (bad["amount"] * 100).astype(str)     # strange rows (high scores), as text numbers
    bad.loc[bad.index[450], "amount"] = "n/a"            # fails in its last batch, after 4 batches were seen
    bad.to_parquet(land / "bad.parquet", index=False)
    # one worker: the bad file's first 4 batches reach the run's statistics before its error does
    r = cli("--tracking-uri", env.uri, "--threads", "1", "score", "-m", f"models:/{NAME}@champion", land,
            "-o", tmp_path / "out", "--keep-going", "--batch-size", "100", ok=False)
    assert r.exit_code == 2 and "1 of 3 input(s) failed" in r.stderr
    run = _scoring_runs(env)[-1]
    m = run.data.metrics
    assert run.info.status == "FAILED" and "bad.parquet" in run.data.tags["anomaly_vae.error"]
    assert (m["files_scored"], m["files_failed"], m["rows"]) == (2, 1, 1200)
    scored = pd.concat([pd.read_parquet(p) for p in (tmp_path / "out").glob("*.scored.parquet")])
    assert len(scored) == 1200 and m["flagged"] == scored["is_anomaly"].sum()
    assert m["score_max"] == pytest.approx(scored["anomaly_score"].max())     # the failed file's rows left out


def test_resume_is_one_run_with_the_skipped_files(env, tmp_path):
    d, _ = env.nights["2026-11-30"]
    out = tmp_path / "out"
    cli("-q", "--tracking-uri", env.uri, "score", "--no-mlflow", "-m", f"models:/{NAME}@champion",
        d / "part-0.parquet", "-o", out)
    before = len(_scoring_runs(env))
    cli("-q", "--tracking-uri", env.uri, "score", "-m", f"models:/{NAME}@champion", d, "-o", out, "--resume")
    runs = _scoring_runs(env)
    assert len(runs) == before + 1
    m, p = runs[-1].data.metrics, runs[-1].data.params
    assert (m["files_scored"], m["files_skipped"], m["rows"]) == (1, 1, 600) and p["resume"] == "True"


def test_a_run_locked_out_by_another_score_logs_nothing(env, tmp_path):
    d, _ = env.nights["2026-11-30"]
    out = tmp_path / "out"
    out.mkdir()
    all_runs = lambda: env.client.search_runs([env.exp_id])          # noqa: E731
    before = len(all_runs())
    with batch.output_lock(out):
        r = cli("--tracking-uri", env.uri, "score", "-m", f"models:/{NAME}@champion", d, "-o", out, ok=False)
    assert r.exit_code == 3 and "another `score` run" in r.stderr
    assert len(all_runs()) == before
    _wait_for_no_child_runs()       # the child started to prepare MLflow exits, opening no run
    assert len(all_runs()) == before


def test_a_model_that_does_not_load_logs_nothing_and_its_child_exits(env, tmp_path):
    d, _ = env.nights["2026-11-30"]
    before = len(env.client.search_runs([env.exp_id]))
    r = cli("--tracking-uri", env.uri, "score", "-m", f"models:/{NAME}@no-such-alias", d, "-o", tmp_path / "out",
            ok=False)
    assert r.exit_code == 2 and "no-such-alias" in r.stderr, r.stderr
    _wait_for_no_child_runs()
    assert len(env.client.search_runs([env.exp_id])) == before
    assert not (tmp_path / "out").exists()


def _wait_for_no_child_runs(timeout: float = 60.0) -> None:
    """Wait until this process has no `anomaly_vae.scoring_child` child process left (fail if one stays)."""
    from anomaly_vae.scoring_runs import CHILD_MODULE

    def children():
        out = []
        for pid in _children(os.getpid()):
            try:
                if CHILD_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes().decode() and _alive(pid):
                    out.append(pid)
            except OSError:
                pass
        return out

    deadline = time.monotonic() + timeout
    while children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not children(), f"scoring-run child process(es) {children()} left behind"


def _start_big_score(env, tmp_path):
    """`anomaly-vae score` of 240k rows in 500-row batches in a subprocess, once scoring is
    under way (a row group is in the hidden temporary output; the run may or may not be open
    yet: its child process opens it). Returns (process, output dir, scoring runs before)."""
    src = tmp_path / "big.parquet"
    pd.concat([env.nights["2026-11-30"][1]] * 200, ignore_index=True).to_parquet(src, index=False)  # 240k rows
    out = tmp_path / "out"
    before = {r.info.run_id for r in _scoring_runs(env)}
    proc = subprocess.Popen([str(ENTRY), "-q", "--threads", "1", "--tracking-uri", env.uri, "score", "-m",
                             f"models:/{NAME}@champion", str(src), "-o", str(out), "--batch-size", "500"],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not any(
            p.stat().st_size > 4096 for p in out.rglob("*") if ".tmp-" in p.name and p.is_file()):
        time.sleep(0.05)
    return proc, out, before


def test_sigterm_ends_the_scoring_run_failed(env, tmp_path):
    proc, out, before = _start_big_score(env, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=150) == 143, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    new = [r for r in _scoring_runs(env) if r.info.run_id not in before]
    assert len(new) == 1, new
    run = env.client.get_run(new[0].info.run_id)
    assert run.info.status == "FAILED" and "signal" in run.data.tags["anomaly_vae.error"]
    assert 0 < run.data.metrics["rows"] < 240_000                  # what was scored until the signal
    assert not (out / "big.scored.parquet").exists()


def test_readme_flag_rate_per_night_snippet_runs(env):
    """README "Nightly runs in the MLflow UI": the Python snippet, as written (experiment and
    model names swapped for this store's), gives one row per scoring run with flag_rate."""
    import re as _re

    import matplotlib
    matplotlib.use("Agg")
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Nightly runs in the MLflow UI", 1)[1].split("\n## ", 1)[0]
    code = _re.search(r"```python\n(.*?)```", section, _re.S).group(1)
    assert 'scoring_runs("anomaly-vae", model_name="payments")' in code
    code = code.replace('"anomaly-vae"', repr(EXPERIMENT)).replace('"payments"', repr(NAME))
    ns: dict = {}
    with T.preserve_configuration():
        T.configure(env.uri)
        exec(compile(code, "README.md", "exec"), ns)
    nights = ns["nights"]
    assert len(nights) == len(_scoring_runs(env)) > 0
    assert {"start_time", "flag_rate", "target_fpr", "psi_max"} <= set(nights.columns)
    assert list(nights["start_time"]) == sorted(nights["start_time"])


def test_train_summary_prints_the_runs_view(env, tmp_path):
    d, _ = env.nights["2026-11-30"]
    r = cli("--tracking-uri", env.uri, "--threads", "1", "train", d / "part-0.parquet", "--exclude",
            "customer_id,fraud_type", "--epochs", "1", "--experiment", EXPERIMENT, "-o", tmp_path / "m")
    assert f"ui:         http://127.0.0.1:5000/#/experiments/{env.exp_id}/runs?workflowType=machine_learning" \
        in r.stdout


def _alive(pid: int) -> bool:
    """Process `pid` exists and is not a zombie (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _children(pid: int) -> list[int]:
    """Child processes of `pid` (Linux /proc; a thread that ends while they are read is skipped)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return out


def test_sigkill_of_score_ends_its_run_failed_and_the_child_exits(env, tmp_path):
    """The MLflow side runs in a child process: when `score` is SIGKILLed mid-run (no handler
    runs) the child reads end-of-file instead of the results, ends the run FAILED and exits."""
    proc, out, before = _start_big_score(env, tmp_path)
    child = None
    try:
        (child,) = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, "score finished before it could be killed (timing)"
        deadline = time.monotonic() + 60
        new = []
        while time.monotonic() < deadline and not (new and new[0].info.status != "RUNNING"):
            time.sleep(0.2)
            new = [r for r in _scoring_runs(env) if r.info.run_id not in before]
        assert len(new) == 1 and new[0].info.status == "FAILED", new
        assert new[0].data.tags["anomaly_vae.error"] == "scoring process ended without finishing (killed?)"
        assert new[0].data.tags["anomaly_vae.pid"] == str(child)          # the child owned the run
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), f"child process {child} left behind"
    finally:
        for pid in (proc.pid, child):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "big.scored.parquet").exists()


@pytest.mark.parametrize("prepare", [True, False], ids=["prepared", "spec-first"])
def test_the_child_process_logs_the_run_without_importing_torch(env, tmp_path, prepare):
    """The protocol of anomaly_vae.scoring_child driven by hand, under -X importtime: the run
    is opened and ended FINISHED with its artifacts, and torch is never imported there; with
    or without the `prepare` message first (what `score` sends before it loads the model)."""
    from anomaly_vae import scoring_runs as R

    d, _ = env.nights["2026-11-30"]
    run = R.ScoringRun(env.det, {"uri": str(env.root / "local-model"), "name": None, "version": None,
                                 "run_id": None}, inputs=[d], tracking_uri=env.uri, experiment="child-protocol")
    for i in range(2):
        rb = pa.RecordBatch.from_pandas(pd.read_parquet(d / f"part-{i}.parquet"), preserve_index=False)
        run.on_batch(d, rb, batch.score_batch(env.det, rb, list(env.det.schema_.ids)))
    summary = {"files": 1, "scored": 1, "skipped": 0, "failed": 0, "failures": [], "rows": 1200,
               "flagged": run.monitor.flagged}
    err = tmp_path / "child.stderr"                    # a file: the import times fill a pipe
    with err.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", R.CHILD_MODULE], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        if prepare:
            R.send(proc.stdin, {"prepare": {"tracking_uri": env.uri, "log_levels": R.log_levels()}})
        R.send(proc.stdin, run.spec())
        opened = R.receive(proc.stdout)
        assert "ok" in opened, opened
        opened = opened["ok"]
        R.send(proc.stdin, run.results("FINISHED", summary, None, 1.0))
        proc.stdin.close()
        assert R.receive(proc.stdout) == {"ok": {"status": "FINISHED"}}
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    stderr = err.read_text()
    imported = {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    assert "mlflow" in imported and "matplotlib" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "sklearn")}      # nor the training code
    logged = env.client.get_run(opened["run_id"])
    assert logged.info.status == "FINISHED" and logged.data.metrics["rows"] == 1200
    assert logged.data.tags["anomaly_vae.pid"] == str(proc.pid)
    assert opened["experiment_ui"].endswith(f"/#/experiments/{opened['experiment_id']}/runs?workflowType=machine_learning")
    assert _artifacts(env.client, opened["run_id"], "plots") == ["plots/score_histogram.png"]


def test_background_false_runs_the_same_writer_in_process(env, tmp_path):
    from anomaly_vae.scoring_runs import ScoringRun

    d, _ = env.nights["2026-11-30"]
    info = {"uri": f"models:/{NAME}@champion", "name": NAME, "version": env.run.version, "run_id": env.run.run_id}
    files = [d / "part-0.parquet", d / "part-1.parquet"]
    run = ScoringRun(env.det, info, inputs=files, tracking_uri=env.uri, background=False)
    result = batch.score_files(env.det, files, tmp_path / "out", model_info=info, on_start=run.start,
                               on_batch=run.on_batch, on_input=run.on_input)
    metrics = run.finish(result["summary"])
    logged = env.client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.info.experiment_id == env.exp_id
    assert logged.data.tags["anomaly_vae.pid"] == str(os.getpid())        # no child process
    assert logged.data.metrics["rows"] == metrics["rows"] == 1200
    assert _artifacts(env.client, run.run_id, "drift") == ["drift/drift.csv", "drift/drift.json", "drift/psi.png"]
    assert run.ui().endswith(f"/#/experiments/{env.exp_id}/runs/{run.run_id}?workflowType=machine_learning")
    # the writer drew the figures itself; a short run's scoring process draws the same bytes
    from anomaly_vae.scoring_runs import draw_figures

    drawn = draw_figures(run.results("FINISHED", result["summary"], None)["artifacts"])
    for name, png in drawn.items():
        local = env.client.download_artifacts(run.run_id, name, str(tmp_path / "dl"))
        assert png.startswith(b"\x89PNG") and Path(local).read_bytes() == png, name
