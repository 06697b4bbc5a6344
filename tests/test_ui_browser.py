"""The MLflow UI shows nightly scoring runs beside the training run: a real `mlflow server` on
127.0.0.1 over the test's SQLite store, opened in headless Chromium (Debian package `chromium`;
`.ci/run` installs it). `--dump-dom` gives the page after the JavaScript app rendered it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from anomaly_vae import tracking as T
from anomaly_vae.cli import main
from anomaly_vae.demo import make_transactions
from conftest import free_port, log_demo_model, stop_process_group, wait_for_http

NAME = "ui-payments"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SERVER_TIMEOUT_S = 60
PAGE_TIMEOUT_S = 40


def _chromium() -> str:
    found = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if not found:
        pytest.fail(f"headless Chromium not found at {CHROMIUM}: apt-get install -y chromium "
                    "(.ci/run installs it; set CHROMIUM=/path/to/chromium elsewhere)")
    return found


def _page_text(browser: str, url: str, profile: Path, must_contain: list[str]) -> str:
    """The rendered page as text (tags removed) and its raw HTML, once it holds `must_contain`
    (the app fetches runs after its first paint: retried until PAGE_TIMEOUT_S)."""
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while True:
        out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                              "--window-size=1600,1000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)
        html = out.stdout
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
        if all(s in html or s in text for s in must_contain) or time.monotonic() > deadline:
            return text + "\n" + html


@pytest.fixture(scope="module")
def ui(tmp_path_factory, new_mlflow_store):
    """A trained, registered model (@champion) and two nightly scoring runs in its experiment,
    served by `mlflow server` (started first: it boots while the model trains)."""
    root = tmp_path_factory.mktemp("ui")
    uri = new_mlflow_store(root)
    port = free_port()
    bin_dir = Path(sys.executable).parent
    mlflow_cli = [str(bin_dir / "mlflow")] if (bin_dir / "mlflow").exists() else [sys.executable, "-m", "mlflow"]
    log_path = root / "server.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(mlflow_cli + ["server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                                              "--port", str(port), "--workers", "1"],
                                cwd=root, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                                     # no background job workers (5 extra processes): only the UI is needed
                                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        with T.preserve_configuration():
            _, det, _, _, run = log_demo_model(uri, n_rows=1500, n_train=1000, seed=8, name=NAME,
                                               dataset_name="ui-train", experiment="ui-payments")
            T.set_alias(NAME, run.version, "champion")
        for night in range(2):
            src = root / f"night-{night}.parquet"
            df = make_transactions(500, seed=30 + night).drop(columns=["label"])
            if night:
                df["amount"] *= 3.0
            df.to_parquet(src, index=False)
            r = CliRunner().invoke(main, ["-q", "--tracking-uri", uri, "score", "-m", f"models:/{NAME}@champion",
                                          str(src), "-o", str(root / f"scored-{night}")])
            assert r.exit_code == 0, (r.output, r.exception)
        client = MlflowClient(uri, registry_uri=uri)
        exp = client.get_experiment_by_name("ui-payments")
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`anomaly_vae.run_type` = 'scoring'",
                                  order_by=["attributes.start_time ASC"])
        base = f"http://127.0.0.1:{port}"
        wait_for_http(base + "/health", proc, SERVER_TIMEOUT_S, log_path)
        yield {"base": base, "exp_id": exp.experiment_id, "training": run.run_id, "runs": runs, "root": root}
    finally:
        stop_process_group(proc)


@pytest.mark.slow     # 24 s idle, up to 140 s loaded on the shared 2-core machine (server, training, two pages);
                      # .ci/run runs this file on its own after the default suite
def test_runs_view_shows_scoring_runs_beside_training_with_metrics(ui):
    browser = _chromium()
    first, second = ui["runs"]
    ids = [first.info.run_id, second.info.run_id, ui["training"]]
    # the URL `score` prints: the runs table of the model's experiment, not the GenAI overview
    page = _page_text(browser, f"{ui['base']}/#/experiments/{ui['exp_id']}/runs?workflowType=machine_learning",
                      ui["root"] / "profile-runs", ids)
    for run_id in ids:
        assert f"/runs/{run_id}" in page, run_id                      # a row linking to each run
    assert first.info.run_name in page and "3 matching runs" in page
    assert "Model training" in page and "Judges" not in page and "Token Usage" not in page

    flag_rate = second.data.metrics["flag_rate"]
    page = _page_text(browser, f"{ui['base']}/#/experiments/{ui['exp_id']}/runs/{second.info.run_id}"
                               "?workflowType=machine_learning", ui["root"] / "profile-run", ["flag_rate", "psi_max"])
    assert re.search(rf"flag_rate {re.escape(repr(flag_rate))} ", page), flag_rate
    assert "psi_amount" in page and "score_p99" in page and "files_scored 1" in page
    assert "anomaly_vae.run_type : scoring" in page
    assert re.search(rf"Registered models {NAME} v1", page)           # the model-version link
