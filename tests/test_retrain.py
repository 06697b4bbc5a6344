"""Retrain pipeline: gates, windows, lock (unit) and end-to-end runs against a real SQLite MLflow store.

The end-to-end tests share one store and one data directory (module-scoped) and run in file order:
first run promotes -> rerun is a no-op -> poisoned windows are kept out by the gates -> an
incompatible schema is refused -> a concurrent run is locked out (real subprocess) -> --wait.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from anomaly_vae.demo import DEMO_EXCLUDE, make_transactions
from anomaly_vae.errors import ConfigError, DataError
from pipelines.gates import should_promote
from pipelines.holdout import split_holdout
from pipelines.retrain import EXIT_BAD_INPUT, EXIT_LOCKED, retrain_command
from pipelines.window import (LockedError, Partition, list_partitions, partition_date, run_lock,
                              select_window, window_key)

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_DAY = 1000
START = dt.date(2026, 1, 1)


# =============================================================== gates (pure)
def good(**kw):
    m = {"auprc": 0.6, "auroc": 0.95, "fpr": 0.01, "n": 1000, "n_nonfinite": 0, "score_psi": 0.02}
    m.update(kw)
    return m


def test_first_candidate_promoted_when_gates_pass():
    d = should_promote(good(), None)
    assert d.promote
    assert any("no champion" in r for r in d.reasons)


@pytest.mark.parametrize("bad, needle", [
    (dict(n_nonfinite=3), "3 of 1,000 holdout scores are not finite"),
    (dict(fpr=0.05), "FPR 0.0500 on held-out normals outside [0.0000, 0.0200]"),
    (dict(fpr=None), "no normal rows"),
    (dict(score_psi=0.6), "score PSI 0.6000"),
    (dict(n=0), "holdout is empty"),
])
def test_each_absolute_gate_can_refuse(bad, needle):
    d = should_promote(good(**bad), None)
    assert not d.promote
    assert any(needle in r for r in d.reasons), d.reasons


def test_fpr_band_is_two_sided_and_configurable():
    assert not should_promote(good(fpr=0.0), None, target_fpr=0.05, fpr_band=0.02).promote
    assert should_promote(good(fpr=0.04), None, target_fpr=0.05, fpr_band=0.02).promote
    assert should_promote(good(fpr=0.07), None, target_fpr=0.05, fpr_band=0.02).promote
    assert not should_promote(good(fpr=0.071), None, target_fpr=0.05, fpr_band=0.02).promote


def test_not_worse_than_champion_within_tolerance():
    champ = good(auprc=0.60, auroc=0.95)
    assert should_promote(good(auprc=0.585, auroc=0.94), champ, tolerance=0.02).promote
    d = should_promote(good(auprc=0.55, auroc=0.96), champ, tolerance=0.02)
    assert not d.promote and d.reasons == ["candidate AUPRC 0.5500 < champion 0.6000 - tolerance 0.02"]
    assert should_promote(good(auprc=0.55), champ, tolerance=0.06).promote
    d = should_promote(good(auroc=0.90), champ, tolerance=0.02)
    assert not d.promote and "AUROC" in d.reasons[0]


def test_failures_are_all_reported_and_unlabelled_skips_ranking():
    d = should_promote(good(auprc=0.1, fpr=0.3, n_nonfinite=1), good())
    assert not d.promote and len(d.reasons) == 3
    unlabelled = should_promote(good(auprc=None, auroc=None), good(auprc=None, auroc=None))
    assert unlabelled.promote and any("ranking quality not compared" in r for r in unlabelled.reasons)
    assert should_promote(good(score_psi=5.0), None, max_score_psi=None).promote


# ============================================================ windows (pure-ish)
@pytest.mark.parametrize("name, expected", [
    ("data/dt=2026-01-05.parquet", dt.date(2026, 1, 5)),
    ("data/20260105.parquet", dt.date(2026, 1, 5)),
    ("data/dt=2026-01-05/part-0.parquet", dt.date(2026, 1, 5)),
    ("data/part-0.parquet", None),
    ("data/dt=2026-13-45.parquet", None),
    ("data/batch_123456789.parquet", None),
])
def test_partition_date(name, expected):
    assert partition_date(name) == expected


def _parts(n, start=START):
    return [Partition(Path(f"d/dt={start + dt.timedelta(days=i)}.parquet"), start + dt.timedelta(days=i), 10, 1)
            for i in range(n)]


def test_select_window_days_files_end():
    parts = _parts(10)
    assert [p.date.day for p in select_window(parts, days=3)] == [8, 9, 10]
    assert [p.date.day for p in select_window(parts, files=2)] == [9, 10]
    assert [p.date.day for p in select_window(parts, days=3, end=dt.date(2026, 1, 5))] == [3, 4, 5]
    gap = parts[:3] + parts[6:]                                   # missing days count as days
    assert [p.date.day for p in select_window(gap, days=5)] == [7, 8, 9, 10]
    with pytest.raises(ConfigError, match="not both"):
        select_window(parts, days=2, files=2)
    with pytest.raises(DataError, match="no partitions in the window"):
        select_window(parts, days=3, end=dt.date(2025, 1, 1))
    undated = [Partition(Path("d/part-0.parquet"), None, 1, 1)]
    assert select_window(undated, files=1) == undated
    with pytest.raises(DataError, match="part-0.parquet: no date"):
        select_window(undated, days=1)


def test_list_partitions_orders_by_date_and_key_tracks_files(tmp_path):
    for day in ("2026-01-03", "2026-01-01", "2026-01-02"):
        pd.DataFrame({"x": [1.0, 2.0]}).to_parquet(tmp_path / f"dt={day}.parquet")
    parts = list_partitions([str(tmp_path)])
    assert [p.date.day for p in parts] == [1, 2, 3]
    config = {"epochs": 5}
    key = window_key(parts, config)
    assert key == window_key(list_partitions([str(tmp_path / "dt=*.parquet")]), dict(config))
    assert key != window_key(parts, {"epochs": 6})
    assert key != window_key(parts[1:], config)
    os.utime(parts[0].path, ns=(parts[0].mtime_ns + 10**9, parts[0].mtime_ns + 10**9))   # touched
    assert key != window_key(list_partitions([str(tmp_path)]), config)


def test_split_holdout_by_file_or_by_time():
    a = pd.DataFrame({"t": pd.to_datetime(["2026-01-01 10:00", "2026-01-01 09:00"]), "x": [1, 2]})
    b = pd.DataFrame({"t": pd.to_datetime(["2026-01-02 10:00"]), "x": [3]})
    train, hold, how = split_holdout([a, b])
    assert list(train["x"]) == [1, 2] and list(hold["x"]) == [3] and "partition" in how
    c = pd.DataFrame({"t": pd.to_datetime(["2026-01-02 11:00"]), "x": [4]})
    train, hold, _ = split_holdout([a, b, c], groups=["d1", "d2", "d2"])      # two part files of day 2
    assert list(train["x"]) == [1, 2] and list(hold["x"]) == [3, 4]
    one = pd.DataFrame({"t": pd.date_range("2026-01-01", periods=10, freq="h")[::-1], "x": range(10)})
    train, hold, how = split_holdout([one], holdout_fraction=0.2)
    assert list(hold["x"]) == [1, 0] and len(train) == 8 and "'t'" in how     # newest by time
    with pytest.raises(DataError, match="too few"):
        split_holdout([b])


def test_weekday_warning_for_short_windows(fitted):
    from pipelines.holdout import weekday_warning
    assert any(c.kind == "datetime" for c in fitted.schema_.features)
    assert "day-of-week" in weekday_warning(fitted, [p.date for p in _parts(3)])[0]
    assert weekday_warning(fitted, [p.date for p in _parts(7)]) == []


def test_drift_of_a_shift_in_the_newest_partition_is_not_diluted_by_the_window(fitted, frame):
    from pipelines.holdout import window_drift, worst_drift
    days = [frame.sample(500, random_state=i).reset_index(drop=True) for i in range(10)]
    days[-1] = days[-1].assign(amount=days[-1]["amount"] * 3)          # only the newest day shifts
    window = window_drift(fitted, pd.concat(days, ignore_index=True), None)
    newest = window_drift(fitted, days[-1], None)
    table = worst_drift(window, newest, alert=0.2)
    row = table.set_index("feature").loc["amount"]
    assert row["psi_window"] < 0.2 < row["psi_newest"] == row["psi"] and row["alert"]
    assert table.iloc[0]["feature"] in ("amount", "anomaly_score")
    assert (table["psi"] == table[["psi_window", "psi_newest"]].max(axis=1)).all()
    assert set(table["feature"]) == set(window["feature"]) == set(newest["feature"])


def test_partition_label_errors_name_the_file(tmp_path):
    from pipelines.holdout import load_partitions
    good = make_transactions(50, seed=1)
    paths = []
    for i, labels in enumerate([good["label"], good["label"] * 2, good["label"].astype(float).where(good.index > 2)]):
        paths.append(tmp_path / f"dt=2026-01-0{i + 1}.parquet")
        good.assign(label=labels).to_parquet(paths[-1], index=False)
    parts = _parts(3)
    parts = [p._replace(path=path) for path, p in zip(paths, parts)]
    assert len(load_partitions(parts[:1], "label")) == 1
    with pytest.raises(DataError, match=r"dt=2026-01-02\.parquet: label column 'label'.*other values"):
        load_partitions(parts[:2], "label")
    with pytest.raises(DataError, match=r"dt=2026-01-03\.parquet: label column 'label'.*3 of 50 values are missing"):
        load_partitions(parts[::2], "label")
    with pytest.raises(DataError, match=r"dt=2026-01-01\.parquet: label column 'fraud' not found"):
        load_partitions(parts[:1], "fraud")


# ======================================================================= lock
def test_lock_is_exclusive_and_wait_gets_it(tmp_path):
    path = tmp_path / "locks" / "m.lock"
    with run_lock(path):
        assert "pid" in path.read_text()
        with pytest.raises(LockedError, match=r"another retrain holds the lock .*m\.lock.*--wait"):
            with run_lock(path):
                pass
        t0 = time.monotonic()
        with pytest.raises(LockedError, match="gave up after waiting 0.3 s"):
            with run_lock(path, wait=True, timeout=0.3, poll=0.05):
                pass
        assert time.monotonic() - t0 >= 0.3
    with run_lock(path):                                  # released on exit
        pass


# ================================================================ end to end
def write_days(folder: Path, start: dt.date, n_days: int, seed: int, poison=None) -> None:
    """One parquet per day; `poison(df)` is applied to every day but the last (the holdout)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_days):
        day = start + dt.timedelta(days=i)
        df = make_transactions(ROWS_PER_DAY, seed=seed + i, start=str(day), days=1)
        if poison is not None and i < n_days - 1:
            df = poison(df)
        df.to_parquet(folder / f"dt={day}.parquet", index=False)


@pytest.fixture(scope="module", autouse=True)
def _restore_mlflow_state():
    """run_retrain points MLflow (and anomaly_vae.tracking's configured store) at this module's
    store; put both back so later test modules see the URI they expect."""
    from anomaly_vae import tracking
    with tracking.preserve_configuration():
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    data = root / "data"
    write_days(data, START, 8, seed=100)                              # 2026-01-01 .. 01-08, clean
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    common = ["--label", "label", "--exclude", ",".join(DEMO_EXCLUDE), "--epochs", "5",
              "--threads", "1", "--tracking-uri", uri]
    return {"root": root, "data": data, "uri": uri, "common": common,
            "lock": root / "mlruns" / "locks" / "payments.lock"}


def invoke(env, *args):
    t0 = time.perf_counter()
    result = CliRunner().invoke(retrain_command, ["payments", str(env["data"]), *args, *env["common"]])
    seconds = time.perf_counter() - t0
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    print(f"\n$ retrain payments data/ {' '.join(args)}   [{seconds:.1f} s, exit {result.exit_code}]\n"
          f"{result.stdout}{result.stderr}")
    return result


def client_for(env):
    import mlflow
    from mlflow.tracking import MlflowClient
    mlflow.set_tracking_uri(env["uri"])
    mlflow.set_registry_uri(env["uri"])
    return MlflowClient(env["uri"], env["uri"])


def decision_runs(env):
    c = client_for(env)
    exp = c.get_experiment_by_name("anomaly-vae-retrain")
    return [] if exp is None else c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def aliases(env):
    model = client_for(env).get_registered_model("payments")
    return {alias: int(v) for alias, v in model.aliases.items()}


FIRST_WINDOW = ("--days", "8", "--end-date", "2026-01-08")


@pytest.fixture(scope="module")
def first(env):
    return invoke(env, *FIRST_WINDOW)


def test_e2e_first_run_promotes(env, first):
    assert first.exit_code == 0
    assert first.stdout.startswith("decision=promoted model=payments candidate=v1 champion=v1 exit=0")
    assert first.stdout.splitlines()[-1] == f"  store: {env['uri']}"
    assert aliases(env) == {"champion": 1, "challenger": 1}
    (run,) = decision_runs(env)
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["decision"] == "promoted" and tags["champion_before"] == "none"
    assert tags["window_start"] == "2026-01-01" and tags["window_end"] == "2026-01-08"
    assert "no champion yet" in tags["reasons"]
    c = client_for(env)
    files = {a.path for a in c.list_artifacts(run.info.run_id)} | \
        {a.path for a in c.list_artifacts(run.info.run_id, "drift")}
    assert {"comparison.csv", "comparison.json", "window.json", "drift/drift.csv", "drift/psi.png"} <= files
    path = c.download_artifacts(run.info.run_id, "comparison.csv", str(env["root"] / "dl1"))
    table = pd.read_csv(path).set_index("metric")
    assert table.loc["fpr", "candidate"] <= 0.02 and np.isnan(table.loc["fpr", "champion"])
    assert run.data.metrics["candidate_auroc"] > 0.8
    mv = c.get_model_version("payments", "1")
    assert mv.tags["window_key"] == tags["window_key"] and mv.tags["decision"] == "promoted"
    train_run = c.get_run(tags["candidate_run_id"])
    assert train_run.data.tags["retrain_run_id"] == run.info.run_id


def test_e2e_rerun_same_window_is_a_noop(env, first):
    before = len(decision_runs(env))
    again = invoke(env, *FIRST_WINDOW)
    assert again.exit_code == 0
    assert again.stdout.startswith("decision=noop model=payments candidate=none champion=v1 exit=0")
    assert "already processed" in again.stdout
    assert len(decision_runs(env)) == before                         # nothing logged, nothing trained
    assert len(client_for(env).search_model_versions("name = 'payments'")) == 1


def test_e2e_flipped_labels_are_kept_out_by_the_gates(env, first):
    write_days(env["data"], dt.date(2026, 1, 9), 8, seed=200,
               poison=lambda df: df.assign(label=1 - df["label"]))     # trains on the frauds only
    champion = aliases(env)["champion"]
    r = invoke(env, "--days", "8")
    assert r.exit_code == 0
    assert r.stdout.startswith("decision=kept model=payments candidate=v")
    assert f"champion=v{champion} " in r.stdout.splitlines()[0]
    assert "outside [0.0000, 0.0200]" in r.stdout and "AUPRC" in r.stdout
    after = aliases(env)
    assert after["champion"] == champion and after["challenger"] != champion
    run = decision_runs(env)[-1]
    assert run.data.tags["decision"] == "kept" and run.data.tags["window_end"] == "2026-01-16"
    assert run.data.metrics["candidate_fpr"] > 0.02


def test_e2e_shifted_amounts_are_kept_out_and_raise_a_drift_alert(env, first):
    write_days(env["data"], dt.date(2026, 1, 17), 8, seed=300,
               poison=lambda df: df.assign(amount=df["amount"] * 10))
    champion = aliases(env)["champion"]
    r = invoke(env, "--days", "8")
    assert r.exit_code == 0 and r.stdout.startswith("decision=kept")
    assert aliases(env)["champion"] == champion
    run = decision_runs(env)[-1]
    assert run.data.tags["drift_alert"] == "true"
    assert "amount" in run.data.tags["drift_alerts"]
    assert run.data.metrics["psi.amount"] > 1.0 > run.data.metrics["psi.merchant_category"]


def test_e2e_incompatible_schema_is_refused(env, first):
    bad = env["root"] / "bad"
    write_days(bad, dt.date(2026, 2, 1), 2, seed=400)
    df = pd.read_parquet(bad / "dt=2026-02-02.parquet")
    df["amount"] = "n/a"                                              # champion's numeric column
    df.to_parquet(bad / "dt=2026-02-02.parquet", index=False)
    champion = aliases(env)["champion"]
    r = CliRunner().invoke(retrain_command, ["payments", str(bad), "--files", "2", *env["common"]])
    print(f"\n$ retrain payments bad/ --files 2   [exit {r.exit_code}]\n{r.stdout}{r.stderr}")
    assert r.exit_code == EXIT_BAD_INPUT
    assert r.stderr.startswith(f"decision=refused model=payments candidate=none champion=v{champion}")
    assert "dt=2026-02-02.parquet" in r.stderr and "column 'amount'" in r.stderr
    assert aliases(env)["champion"] == champion
    assert decision_runs(env)[-1].data.tags["decision"] == "refused"
    empty = CliRunner().invoke(retrain_command, ["payments", str(bad), "--days", "1", "--end-date",
                                                 "2025-01-01", *env["common"]])
    assert empty.exit_code == EXIT_BAD_INPUT and "no partitions in the window" in empty.stderr


def test_e2e_rollback_with_models_promote(env, first):
    """The runbook's rollback: point @champion at an older version with the real CLI."""
    cli = pytest.importorskip("anomaly_vae.cli")
    versions = sorted(int(v.version) for v in client_for(env).search_model_versions("name = 'payments'"))
    champion = aliases(env)["champion"]
    other = max(v for v in versions if v != champion)
    for target in (other, champion):                          # promote a challenger, then roll back
        r = CliRunner().invoke(cli.main, ["--tracking-uri", env["uri"], "models", "promote", "payments",
                                          str(target), "--alias", "champion"])
        assert r.exit_code == 0, r.output
        assert aliases(env)["champion"] == target
    again = invoke(env, *FIRST_WINDOW, "--quiet")             # a rollback keeps processed windows no-ops
    assert again.exit_code == 0 and again.stdout.startswith(f"decision=noop model=payments candidate=none "
                                                            f"champion=v{champion}")


def test_e2e_internal_error_marks_the_run_failed(env, first, monkeypatch):
    def broken_fit(self, X, y=None):
        raise RuntimeError("injected failure")
    monkeypatch.setattr("anomaly_vae.detector.VAEAnomalyDetector.fit", broken_fit)
    champion = aliases(env)["champion"]
    r = CliRunner().invoke(retrain_command, ["payments", str(env["data"]), *FIRST_WINDOW, "--force",
                                             *env["common"]])
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)       # a bug keeps its traceback
    run = decision_runs(env)[-1]
    assert run.info.status == "FAILED" and "injected failure" in run.data.tags["error"]
    assert "decision" not in run.data.tags and aliases(env)["champion"] == champion


def test_e2e_without_labels(env, first):
    """No --label: FPR is the flag rate on the whole holdout, no AUPRC/AUROC, gates still apply."""
    args = ["payments-unlabelled", str(env["data"]), *FIRST_WINDOW, "--exclude",
            "label,customer_id,fraud_type", "--epochs", "5", "--threads", "1", "--tracking-uri", env["uri"]]
    r = CliRunner().invoke(retrain_command, args)
    print(f"\n$ retrain payments-unlabelled data/ (no --label)   [exit {r.exit_code}]\n{r.stdout}")
    assert r.exit_code == 0 and r.stdout.startswith("decision=promoted model=payments-unlabelled")
    assert "holdout rows (no labels)" in r.stdout
    run = decision_runs(env)[-1]
    assert run.data.tags["model_name"] == "payments-unlabelled"
    assert "candidate_fpr" in run.data.metrics and "candidate_auprc" not in run.data.metrics


@pytest.fixture
def held_lock(env):
    env["lock"].parent.mkdir(parents=True, exist_ok=True)
    with open(env["lock"], "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield f
        fcntl.flock(f, fcntl.LOCK_UN)


def test_e2e_concurrent_run_is_locked_out(env, first, held_lock):
    before = len(decision_runs(env))
    cmd = [sys.executable, "-m", "pipelines.retrain", "payments", str(env["data"]), *FIRST_WINDOW,
           *env["common"]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    print(f"\n$ python -m pipelines.retrain payments data/ ... (lock held)   "
          f"[{time.perf_counter() - t0:.1f} s, exit {proc.returncode}]\n{proc.stdout}{proc.stderr[-600:]}")
    assert proc.returncode == EXIT_LOCKED
    assert "Error: retrain 'payments' locked out: another retrain holds the lock" in proc.stderr
    assert str(env["lock"]) in proc.stderr and "--wait" in proc.stderr
    assert len(decision_runs(env)) == before


def test_e2e_wait_takes_the_lock_when_released(env, first, held_lock):
    timer = threading.Timer(1.0, lambda: fcntl.flock(held_lock, fcntl.LOCK_UN))
    timer.start()
    t0 = time.perf_counter()
    try:
        r = invoke(env, *FIRST_WINDOW, "--wait", "--wait-timeout", "60")
    finally:
        timer.join()
    assert r.exit_code == 0 and r.stdout.startswith("decision=noop")
    assert time.perf_counter() - t0 >= 1.0


def test_e2e_label_defaults_to_the_champions(env, first):
    """No --label on a model whose champion was trained with one: the champion's label column is
    used (as `evaluate` does), so the label is neither a feature nor are the AUPRC gates lost."""
    args = ["payments", str(env["data"]), *FIRST_WINDOW, "--force", "--exclude", ",".join(DEMO_EXCLUDE),
            "--epochs", "5", "--threads", "1", "--tracking-uri", env["uri"]]
    r = CliRunner().invoke(retrain_command, args)
    print(f"\n$ retrain payments data/ (no --label, champion has one)   [exit {r.exit_code}]\n{r.stdout}{r.stderr}")
    assert r.exit_code == 0, r.output
    run = decision_runs(env)[-1]
    assert "candidate_auprc" in run.data.metrics and "champion_auprc" in run.data.metrics
    version = run.data.tags["candidate_version"]
    cand = client_for(env).get_run(client_for(env).get_model_version("payments", version).run_id)
    assert cand.data.params["label"] == "label"
