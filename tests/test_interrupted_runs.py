"""Runs of killed `train` / `retrain` processes do not stay RUNNING: SIGTERM ends them FAILED,
and the next run start marks those of SIGKILLed processes KILLED (real SQLite store, real CLI)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import mixed_frame

ENTRY = Path(sys.executable).with_name("anomaly-vae")
OPEN_A_RUN = textwrap.dedent("""
    import sys, time
    from anomaly_vae import tracking
    tracking.configure(sys.argv[1])
    print(tracking.create_run("anomaly-vae", run_name=sys.argv[2]), flush=True)
    time.sleep(600)
""")


@pytest.fixture
def store(tmp_path, new_mlflow_store):
    uri = new_mlflow_store(tmp_path)
    data = tmp_path / "train.parquet"
    mixed_frame(600).to_parquet(data)
    return uri, data


def _open_run_in_subprocess(uri: str, name: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", OPEN_A_RUN, uri, name], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def _train(uri: str, data: Path, tmp_path: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(ENTRY), "-q", "--threads", "1", "--tracking-uri", uri, "train", str(data),
                             "--epochs", "2", "-o", str(tmp_path / "m")], cwd=tmp_path, **kw)


def test_next_start_marks_runs_of_killed_processes_killed(store, tmp_path):
    uri, data = store
    client = MlflowClient(uri)
    ghost_proc, ghost = _open_run_in_subprocess(uri, "ghost")
    live_proc, live = _open_run_in_subprocess(uri, "live")
    try:
        ghost_proc.send_signal(signal.SIGKILL)
        ghost_proc.wait(timeout=30)
        assert client.get_run(ghost).info.status == "RUNNING"              # what the issue saw
        exp = client.get_experiment_by_name("anomaly-vae").experiment_id
        here = socket.gethostname()
        # the same pid, but another process (pid reuse after a reboot or in a container)
        reused = client.create_run(exp, tags={"anomaly_vae.host": here, "anomaly_vae.pid": str(os.getpid()),
                                              "anomaly_vae.pid_start": "1"}).info.run_id
        # another host's run: its process cannot be checked from here
        remote = client.create_run(exp, tags={"anomaly_vae.host": "elsewhere", "anomaly_vae.pid": "999999"}).info.run_id
        foreign = client.create_run(exp).info.run_id                        # not ours at all

        train = _train(uri, data, tmp_path)
        assert train.wait(timeout=600) == 0

        status = {rid: client.get_run(rid).info.status for rid in (ghost, reused, live, remote, foreign)}
        assert status == {ghost: "KILLED", reused: "KILLED", live: "RUNNING", remote: "RUNNING",
                          foreign: "RUNNING"}, status
        assert "had exited" in client.get_run(ghost).data.tags["anomaly_vae.ended_by"]
        runs = client.search_runs([exp], filter_string="tags.`anomaly_vae.run_type` = 'training'")
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert runs[0].data.tags["anomaly_vae.pid"].isdigit()
    finally:
        for p in (ghost_proc, live_proc):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def test_sigterm_during_train_ends_its_run_failed(store, tmp_path):
    uri, data = store
    client = MlflowClient(uri)
    for _attempt in range(3):   # a run seen RUNNING may end before the signal arrives: try again
        proc = _train(uri, data, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        run = None
        deadline = time.monotonic() + 600
        while run is None and proc.poll() is None and time.monotonic() < deadline:
            exp = client.get_experiment_by_name("anomaly-vae")
            runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'") if exp else []
            run = runs[0].info.run_id if runs else None
            time.sleep(0.05)
        assert run is not None, "train finished before its MLflow run could be seen (timing)"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        if not (code == 0 and client.get_run(run).info.status == "FINISHED"):
            break
    assert code == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    assert client.get_run(run).info.status == "FAILED"


def test_sigterm_turned_into_another_error_on_its_way_out_still_exits_143():
    """The handler's SystemExit raised inside a pybind11 extension's import (matplotlib's, while a
    run draws its plots) reaches the command as "ImportError: initialization failed" (CI saw
    exit 1, "internal error"); the command still exits 128 + SIGTERM. Real handler, in process."""
    import click
    from click.testing import CliRunner

    from anomaly_vae.cli import main

    @click.command("stopped-during-import")
    def stopped() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)       # delivered here, raises the handler's SystemExit
            time.sleep(5)
        except SystemExit:
            raise ImportError("initialization failed") from None     # what pybind11's module init does
        raise AssertionError("the SIGTERM handler did not run")

    main.add_command(stopped)
    before = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(main, ["stopped-during-import"])
    finally:
        main.commands.pop("stopped-during-import")
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert "internal error" not in result.output
    assert signal.getsignal(signal.SIGTERM) is before              # restored when the command ended
    # an ImportError without a stop is still an internal error
    @click.command("broken-import")
    def broken() -> None:
        raise ImportError("initialization failed")

    main.add_command(broken)
    try:
        result = CliRunner().invoke(main, ["broken-import"])
    finally:
        main.commands.pop("broken-import")
    assert result.exit_code == 1 and "internal error: ImportError" in result.output
