"""A real `mlflow models serve` REST server on 127.0.0.1 answers /invocations with the
library's scores for the registered champion."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly_vae import tracking as T
from conftest import free_port, log_demo_model, stop_process_group, wait_for_http

pytestmark = pytest.mark.serve

NAME = "serve-test"
STARTUP_TIMEOUT_S = 90


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
        wait_for_http(base + "/ping", proc, STARTUP_TIMEOUT_S, log_path)
        yield base, det, test, uri, root
    finally:
        stop_process_group(proc)
        os.chdir(cwd)


def test_invocations_match_library_scores(server):
    base, det, test = server[:3]
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
    base, _, test = server[:3]
    status, body = http(base + "/invocations", split_payload(test.head(3).drop(columns=["label", "amount"])))
    assert status == 400 and "amount" in body


def _parity_rows(test: pd.DataFrame) -> pd.DataFrame:
    """The issue's rows: booleans as text, fractional and null values in an integer column."""
    rows = test.head(9).drop(columns=["label"]).reset_index(drop=True)
    assert rows["txn_count_1h"].dtype == "int64" and rows["card_present"].dtype == bool
    rows["card_present"] = pd.Series(["no", "false", "0", "yes", "true", "1", "No", " FALSE ", None],
                                     dtype=object)
    rows["txn_count_1h"] = [1.5, 2.7, 9.9, np.nan, 3.0, 0.0, 12.25, 1.0, np.nan]
    return rows


def test_served_scores_equal_library_and_cli_for_text_booleans_and_fractional_ints(server, tmp_path):
    base, det, test, uri, root = server
    rows = _parity_rows(test)
    status, body = http(base + "/invocations", split_payload(rows))
    assert status == 200, body
    served = pd.DataFrame(json.loads(body)["predictions"])
    library = det.explain(rows)
    # the CLI, on a parquet file holding the same values, with the same registered model
    src = tmp_path / "rows.parquet"
    rows.to_parquet(src, index=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    entry = Path(sys.executable).with_name("anomaly-vae")
    r = subprocess.run([str(entry), "-q", "score", "-m", f"models:/{NAME}@champion", str(src), "-o",
                        str(tmp_path / "out")], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cli = pd.read_parquet(tmp_path / "out" / "rows.scored.parquet")
    np.testing.assert_allclose(served["anomaly_score"].to_numpy(float), library["anomaly_score"], rtol=1e-6)
    np.testing.assert_allclose(cli["anomaly_score"].to_numpy(float), library["anomaly_score"], rtol=1e-6)
    assert served["top_features"].tolist() == library["top_features"].tolist() == cli["top_features"].tolist()
    # and the values were not read the way MLflow's own casts read them: "no" is not True,
    # 1.5 is not 1, null is missing (not refused)
    mlflow_cast = rows.assign(card_present=rows["card_present"].astype(bool),
                              txn_count_1h=rows["txn_count_1h"].fillna(0).astype(np.int64))
    assert not np.allclose(det.anomaly_score(mlflow_cast), library["anomaly_score"])


def test_served_json_booleans_mixed_with_text_match_the_library(server):
    base, det, test = server[:3]
    rows = test.head(4).drop(columns=["label"]).reset_index(drop=True)
    rows["card_present"] = pd.Series([True, "no", False, "1"], dtype=object)
    status, body = http(base + "/invocations", split_payload(rows))
    assert status == 200, body
    np.testing.assert_allclose(pd.DataFrame(json.loads(body)["predictions"])["anomaly_score"].to_numpy(float),
                               det.anomaly_score(rows), rtol=1e-6)


def test_uncastable_value_is_the_library_error_as_http_400(server):
    from anomaly_vae.errors import SchemaMismatchError
    base, det, test = server[:3]
    rows = test.head(3).drop(columns=["label"]).reset_index(drop=True)
    rows["card_present"] = pd.Series(["maybe", "yes", "no"], dtype=object)
    with pytest.raises(SchemaMismatchError) as info:
        det.explain(rows)
    status, body = http(base + "/invocations", split_payload(rows))
    assert status == 400, body
    message = json.loads(body)["message"]
    assert "SchemaMismatchError" in message and str(info.value) in message


def test_deeply_nested_json_fails_without_harming_the_server(server):
    """Documented limit: JSON nested deeper than Python's parser allows (~1,000 levels) is
    refused by MLflow's server before the model sees it; the server keeps answering."""
    base, det, test = server[:3]
    status, _ = http(base + "/invocations", '{"dataframe_split": ' + "[" * 50_000 + "]" * 50_000 + "}")
    assert status == 500              # MLflow's JSON parser (RecursionError), before the model
    rows = test.head(2).drop(columns=["label"])
    nested = rows.astype({"amount": object})
    nested.loc[nested.index[0], "amount"] = [[[1.0]]]          # nested, but parseable: our validation
    status, body = http(base + "/invocations", split_payload(nested))
    assert status == 400 and "amount" in body, body
    status, body = http(base + "/invocations", split_payload(rows))
    assert status == 200, body
