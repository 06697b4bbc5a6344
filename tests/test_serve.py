"""A real `mlflow models serve` REST server on 127.0.0.1 answers /invocations with the
library's scores for the registered champion."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly_vae import tracking as T
from conftest import log_demo_model

pytestmark = pytest.mark.serve

NAME = "serve-test"
STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as exc:
        pytest.skip(f"cannot bind a TCP port on 127.0.0.1 ({exc}); serving test needs a local port")


def http(url: str, body: str | None = None, timeout: float = 30) -> tuple[int, str]:
    req = urllib.request.Request(url, data=None if body is None else body.encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def split_payload(df: pd.DataFrame) -> str:
    """{"dataframe_split": {...}} with ISO timestamps and NaN as null."""
    return '{"dataframe_split": ' + df.to_json(orient="split", date_format="iso", index=False) + "}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, new_mlflow_store):
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    cwd = os.getcwd()
    os.chdir(root)
    proc = None
    log_path = root / "server.log"
    try:
        uri, det, _, test, run = log_demo_model(new_mlflow_store(root), n_rows=1000, n_train=800, seed=4,
                                                name=NAME, dataset_name="serve-train")
        T.set_alias(NAME, run.version, "champion")

        bin_dir = Path(sys.executable).parent            # the venv's bin/: the server runs uvicorn from PATH
        mlflow_cli = [str(bin_dir / "mlflow")] if (bin_dir / "mlflow").exists() else [sys.executable, "-m", "mlflow"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "OMP_NUM_THREADS": "1"}
        log_file = open(log_path, "w")
        proc = subprocess.Popen(
            mlflow_cli + ["models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
                          "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if http(base + "/ping", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, det, test
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        os.chdir(cwd)


def test_invocations_match_library_scores(server):
    base, det, test = server
    rows = test.head(8).drop(columns=["label"]).copy()
    rows.loc[rows.index[0], "amount"] = np.nan                      # a null travels as JSON null
    rows.loc[rows.index[1], "merchant_category"] = "space_travel"   # unseen category
    status, body = http(base + "/invocations", split_payload(rows))
    assert status == 200, body
    pred = pd.DataFrame(json.loads(body)["predictions"])
    expected = det.explain(rows)
    assert pred["transaction_id"].tolist() == rows["transaction_id"].tolist()
    np.testing.assert_allclose(pred["anomaly_score"].to_numpy(float), expected["anomaly_score"], rtol=1e-5)
    np.testing.assert_allclose(pred["p_value"].to_numpy(float), expected["p_value"], rtol=1e-5)
    assert pred["is_anomaly"].tolist() == expected["is_anomaly"].tolist()
    assert pred["top_features"].tolist() == expected["top_features"].tolist()


def test_invocations_reject_missing_column(server):
    base, _, test = server
    status, body = http(base + "/invocations", split_payload(test.head(3).drop(columns=["label", "amount"])))
    assert status == 400 and "amount" in body
