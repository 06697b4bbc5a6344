"""Shared fixtures: tiny seeded mixed-type frames and a fast detector configuration."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# One torch/BLAS thread per test process: the suite runs on small shared CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
FAST = dict(max_epochs=8, random_state=0, n_threads=1)


def mixed_frame(n: int = 1500, seed: int = 0) -> pd.DataFrame:
    """Numeric (with NaN), categorical, boolean, datetime and id columns with some structure."""
    rng = np.random.default_rng(seed)
    cat = rng.choice(["a", "b", "c", "d"], n, p=[0.4, 0.3, 0.2, 0.1])
    base = {"a": 10.0, "b": 20.0, "c": 40.0, "d": 80.0}
    amount = np.array([base[c] for c in cat]) * np.exp(rng.normal(0, 0.3, n))
    x = rng.normal(size=n)
    x[rng.random(n) < 0.05] = np.nan
    return pd.DataFrame({
        "row_id": [f"r{seed}-{i}" for i in range(n)],
        "amount": amount,
        "x": x,
        "y": 2.0 * np.nan_to_num(x) + rng.normal(0, 0.1, n),
        "cat": cat,
        "flag": amount > 30,
        "ts": pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 86400 * 14, n), unit="s"),
    })


@pytest.fixture(scope="session", autouse=True)
def isolated_store_home(tmp_path_factory):
    """The default MLflow store (and anything under XDG_DATA_HOME) lives in a session tmp dir:
    tests never write to ~ or the repository, also in CLI subprocesses (they inherit the env).
    MLFLOW_TRACKING_URI is unset so a developer's own store is never used."""
    home = tmp_path_factory.mktemp("anomaly-vae-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMALY_VAE_HOME", str(home / "project"))
        mp.setenv("XDG_DATA_HOME", str(home / "xdg"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield home


@pytest.fixture(autouse=True)
def package_log_level():
    """In-process CLI runs (also in module fixtures) set the package logger's level (-q: ERROR)
    for the rest of the process: each test starts at the library's default (NOTSET), so that
    its caplog sees the library's warnings whatever ran before."""
    import logging

    logging.getLogger("anomaly_vae").setLevel(logging.NOTSET)
    yield


@pytest.fixture(scope="session")
def frame() -> pd.DataFrame:
    return mixed_frame()


@pytest.fixture(scope="session")
def fitted(frame):
    from anomaly_vae import VAEAnomalyDetector
    return VAEAnomalyDetector(**FAST).fit(frame)


@pytest.fixture(scope="session")
def adbench_dir() -> Path:
    path = SHARED_DATASETS / "adbench"
    if not path.is_dir():
        pytest.skip(f"ADBench datasets not found at {path} (they live in ../shared/datasets, "
                    "which a fresh clone does not have)")
    return path


@pytest.fixture(scope="session")
def new_mlflow_store(tmp_path_factory):
    """Factory: a real, empty MLflow SQLite store at <root>/mlruns/mlflow.db; returns its URI.

    Creating the tables runs ~8 s of migrations, so the first store of the session is kept as a
    template and copied for later ones (each test module still gets its own store).
    """
    from mlflow.tracking import MlflowClient

    template = tmp_path_factory.getbasetemp() / "mlflow-empty-store.db"

    def make(root: Path) -> str:
        if not template.exists():
            build = tmp_path_factory.mktemp("mlflow-template")
            MlflowClient(f"sqlite:///{build}/mlflow.db").search_experiments()
            shutil.copy(build / "mlflow.db", template)
        (root / "mlruns").mkdir(parents=True, exist_ok=True)
        shutil.copy(template, root / "mlruns" / "mlflow.db")
        return f"sqlite:///{root}/mlruns/mlflow.db"

    return make


def log_demo_model(store_uri: str, *, n_rows: int, n_train: int, seed: int, name: str, dataset_name: str,
                   evaluate: bool = False, **log_kwargs):
    """Point anomaly_vae.tracking at `store_uri`, fit a 3-epoch detector on the first `n_train` of
    `n_rows` demo transactions, log it (with the rest as evaluation data when `evaluate`) and
    register it as `name`; returns (uri, det, train, test, run). Shared by the MLflow test
    modules; each keeps its own store, data seed and extra logging."""
    from anomaly_vae import VAEAnomalyDetector
    from anomaly_vae import tracking as T
    from anomaly_vae.demo import DEMO_EXCLUDE, make_transactions

    uri = T.configure(store_uri)
    df = make_transactions(n_rows, fraud_rate=0.03, seed=seed)
    train, test = df.iloc[:n_train].reset_index(drop=True), df.iloc[n_train:].reset_index(drop=True)
    det = VAEAnomalyDetector(max_epochs=3, random_state=0, n_threads=1, label="label",
                             exclude=DEMO_EXCLUDE).fit(train)
    run = T.log_training_run(det, train, dataset_name=dataset_name, register_as=name,
                             eval_df=test if evaluate else None, **log_kwargs)
    return uri, det, train, test, run


from anomaly_vae.demo import DEMO_EXCLUDE  # noqa: E402

DEMO_EXCLUDE_ARGS = [a for c in DEMO_EXCLUDE for a in ("--exclude", c)]   # train/demo CLI arguments


def cli_run(*args, ok: bool = True):
    """`anomaly-vae ARGS` through click's CliRunner; asserts exit 0 unless ok=False."""
    from click.testing import CliRunner

    from anomaly_vae.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, (r.output, r.exception)
    return r


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (skips the test when no local port can be bound)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as exc:
        pytest.skip(f"cannot bind a TCP port on 127.0.0.1 ({exc}); this test needs a local server")


def wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    """Poll GET `url` every 0.5 s until it answers 200; fails the test (with the end of the
    server's log) if `proc` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before {url} answered:\n"
                        f"{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:                           # refused, reset, timed out, HTTP error
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} not answering after {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen | None, grace_s: float = 15) -> None:
    """Stop the process group of `proc` (started with start_new_session=True: the server and its
    workers): SIGTERM, then SIGKILL whatever is left after `grace_s`."""
    if proc is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace_s
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                proc.poll()                       # reap the leader, or it stays in the group as a zombie
                os.killpg(proc.pid, 0)            # ProcessLookupError once every member is gone
                time.sleep(0.2)
        except ProcessLookupError:
            return
