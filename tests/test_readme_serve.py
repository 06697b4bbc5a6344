"""README "Serve it", run as written: its ```bash blocks are taken from README.md and run with
bash, unchanged. Only the environment is the test's: ANOMALY_VAE_HOME is a tmp store holding a
`payments` model trained and promoted with the real CLI (as in "Train, score, review"), PORT a
free port, PATH starts with this venv's bin/ (the README assumes the venv is active). Needs
`curl` (Debian package; `.ci/run` installs it when missing)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly_vae import tracking as T
from anomaly_vae.demo import make_transactions
from conftest import DEMO_EXCLUDE_ARGS, cli_run, free_port, stop_process_group, wait_for_http

# ~30 s idle (store 3 s, training 6 s, server start 12 s, requests 1 s): in the default suite
# like tests/test_serve.py, not marked slow
pytestmark = pytest.mark.serve

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Serve it"
STARTUP_TIMEOUT_S = 180         # 10-20 s idle; a loaded 2-core machine takes much longer
CURL_TIMEOUT_S = 120
# Earlier in-process CLI tests leave the store they used in these (mlflow.set_tracking_uri and
# set_registry_uri write them for child processes): a shell following the README has neither.
LEAKED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def readme_blocks() -> dict[str, list[str]]:
    """Fenced blocks of the README section HEADING, by language: {"bash": [...], "json": [...], ...}."""
    text = README.read_text()
    start = text.index(f"\n{HEADING}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else None]
    blocks: dict[str, list[str]] = {}
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.M | re.S):
        blocks.setdefault(lang, []).append(body)
    return blocks


BLOCKS = readme_blocks()


def test_section_has_the_serve_curl_and_response_blocks():
    serve, score, bad = BLOCKS["bash"]                                    # exactly three shell snippets
    assert "mlflow models serve -m models:/payments@champion --env-manager local -h 127.0.0.1" in serve
    assert "MLFLOW_TRACKING_URI=sqlite:///$ANOMALY_VAE_HOME/mlruns/mlflow.db" in serve
    assert all(b.startswith("curl ") and "/invocations" in b for b in (score, bad))
    assert len(BLOCKS["json"]) == 1 and len(BLOCKS["text"]) == 1


def _require_curl() -> None:
    if not shutil.which("curl"):
        pytest.fail("curl not found: the README's serving example uses it; apt-get install -y curl "
                    "(.ci/run installs it)")


@pytest.fixture(scope="module")
def served(tmp_path_factory, new_mlflow_store):
    """`payments@champion` in $ANOMALY_VAE_HOME's store, served by the README's first block."""
    _require_curl()
    home = tmp_path_factory.mktemp("readme-serve")
    new_mlflow_store(home)                          # $ANOMALY_VAE_HOME/mlruns/mlflow.db, tables made
    data = home / "transactions_train.parquet"
    make_transactions(2000, seed=0).to_parquet(data, index=False)
    with T.preserve_configuration(), pytest.MonkeyPatch.context() as mp:
        for var in LEAKED_ENV:
            mp.delenv(var, raising=False)
        mp.setenv("ANOMALY_VAE_HOME", str(home))
        r = cli_run("train", data, "--label", "label", *DEMO_EXCLUDE_ARGS, "--epochs", "3",
                    "--output", home / "models" / "payments", "--register", "payments")
        assert f"sqlite:///{home}/mlruns/mlflow.db" in r.output, r.output   # the URI the README builds
        cli_run("models", "promote", "payments", "1", "--alias", "champion")

    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**{k: v for k, v in os.environ.items() if k not in LEAKED_ENV}, "ANOMALY_VAE_HOME": str(home),
           "PORT": str(port), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_path = home / "server.log"
    proc = None
    try:
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(["bash", "-c", BLOCKS["bash"][0]], cwd=home, env=env, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, STARTUP_TIMEOUT_S, log_path)
        yield env, home
    finally:
        stop_process_group(proc)


def run_block(block: str, env: dict, cwd: Path) -> str:
    r = subprocess.run(["bash", "-c", block], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=CURL_TIMEOUT_S)
    assert r.returncode == 0 and r.stdout, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def _kind(v) -> str:
    return {bool: "bool", int: "number", float: "number", str: "str", type(None): "null",
            list: "list", dict: "object"}[type(v)]


def test_curl_example_returns_the_documented_fields(served):
    env, home = served
    got = json.loads(run_block(BLOCKS["bash"][1], env, home))["predictions"]
    documented = json.loads(BLOCKS["json"][0])["predictions"]
    assert len(got) == len(documented) == 2
    for row, doc in zip(got, documented):
        assert list(row) == list(doc)                                          # same columns, same order
        assert {k: _kind(v) for k, v in row.items()} == {k: _kind(v) for k, v in doc.items()}
        assert row["transaction_id"] == doc["transaction_id"]
        assert row["is_anomaly"] == doc["is_anomaly"]
        assert row["anomaly_score"] == pytest.approx(row["recon_nll"] + row["kl"], rel=1e-6)
        assert 0 < row["p_value"] <= 1
        named = [f.split(":")[0] for f in row["top_features"].split(";")]
        assert [e["column"] for e in row["explanation"]] == (named if row["is_anomaly"] else [])
        for entry in row["explanation"]:
            assert list(entry) == list(doc["explanation"][0])
    normal, odd = got
    assert normal["explanation"] == [] and odd["anomaly_score"] > normal["anomaly_score"]
    assert odd["p_value"] < normal["p_value"]
    # the text's reading of the example: the distance from home is the main reason
    assert odd["top_features"].split(":")[0] == documented[1]["top_features"].split(":")[0] == "distance_from_home_km"
    assert odd["explanation"][0]["text"].startswith("distance_from_home_km = 4,262.00 (expected ")


def test_bad_value_example_is_http_400_naming_the_column(served):
    env, home = served
    out = run_block(BLOCKS["bash"][2], env, home)
    body, status = out.rstrip("\n").rsplit("\n", 1)
    documented = BLOCKS["text"][0].rstrip("\n").splitlines()
    assert status == documented[-1] == "HTTP 400"
    message = json.loads(body)["message"]
    library_line = re.search(r"SchemaMismatchError: .*?retrain", documented[0]).group(0)
    assert "column 'card_present'" in library_line and message.endswith(library_line), message
