"""Where the MLflow store is: the same store from every working directory, named in summaries
and in every "not found" error. Real CLI (CliRunner and the console script), real SQLite store."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly_vae.demo import make_transactions

ENTRY_POINT = Path(sys.executable).with_name("anomaly-vae")
from conftest import DEMO_EXCLUDE_ARGS as EXCLUDE, cli_run as run


@pytest.fixture
def xdg_store(tmp_path, monkeypatch, new_mlflow_store):
    """No MLFLOW_TRACKING_URI, no ANOMALY_VAE_HOME: the default store under XDG_DATA_HOME
    (pre-created from the session's empty template to skip the migrations)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ANOMALY_VAE_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    uri = new_mlflow_store(tmp_path / "xdg" / "anomaly-vae")
    assert uri == f"sqlite:///{tmp_path}/xdg/anomaly-vae/mlruns/mlflow.db"
    return uri


def test_train_in_one_directory_score_from_another(tmp_path, monkeypatch, xdg_store):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    make_transactions(1200, seed=5).to_parquet(a / "train.parquet", index=False)

    monkeypatch.chdir(a)
    r = run("--threads", "1", "train", "train.parquet", "--label", "label", *EXCLUDE, "--epochs", "2",
            "--register", "payments", "-o", "m")
    assert f"store:      {xdg_store}" in r.stdout
    monkeypatch.chdir(b)
    r = run("models", "promote", "payments", "1")
    assert r.stdout.splitlines() == ["payments@champion -> version 1", f"store:   {xdg_store}"]

    # a real process, started in directory b with the same environment
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([str(ENTRY_POINT), "score", "-m", "models:/payments@champion", str(a / "train.parquet"),
                           "-o", "scored"], cwd=b, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "payments v1" in done.stdout and f"store:   {xdg_store}" in done.stdout
    assert (b / "scored" / "train.scored.parquet").is_file()
    assert not (a / "mlruns").exists() and not (b / "mlruns").exists()   # no store in the working dirs

    # not found: the message names the store that was searched and what it holds
    r = run("score", "-m", "models:/nope@champion", a / "train.parquet", "-o", "x", ok=False)
    assert r.exit_code == 2
    assert (f"registered model 'nope' not found in store {xdg_store}; registered models: payments"
            in r.stderr), r.stderr
    r = run("models", "list", "nope", ok=False)
    assert r.exit_code == 2 and f"not found in store {xdg_store}" in r.stderr
    r = run("models", "promote", "payments", "7", ok=False)
    assert r.exit_code == 2 and f"has no version 7 in store {xdg_store}; versions: 1" in r.stderr
    r = run("score", "-m", "models:/payments/9", a / "train.parquet", "-o", "x", ok=False)
    assert r.exit_code == 2 and f"has no version 9 in store {xdg_store}" in r.stderr
    r = run("score", "-m", "runs:/0123456789abcdef0123456789abcdef/model", a / "train.parquet", "-o", "x", ok=False)
    assert r.exit_code == 2 and f"not found in store {xdg_store}" in r.stderr


def test_anomaly_vae_home_and_explicit_uri_win(tmp_path, monkeypatch, xdg_store, new_mlflow_store):
    home = tmp_path / "project"
    home_uri = new_mlflow_store(home)
    monkeypatch.setenv("ANOMALY_VAE_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert run("models", "list").stdout.splitlines() == [f"no registered models in store {home_uri}"]
    other = new_mlflow_store(tmp_path / "other")
    r = run("--tracking-uri", other, "models", "list", "x", ok=False)
    assert f"registered model 'x' not found in store {other}; registered models: none" in r.stderr
    env_uri = new_mlflow_store(tmp_path / "env")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    r = run("--debug", "models", "list")
    assert f"DEBUG: store: {env_uri} (from MLFLOW_TRACKING_URI)" in r.stderr       # --debug log
