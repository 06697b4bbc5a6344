"""Fault injection with the real CLI on real files: SIGKILL of `score` and `train` at chosen
moments, two `score` runs into one output directory, `--resume` after the model changed, and
inputs that used to escape as internal errors. Every process here is an `anomaly-vae`
subprocess; a fault is injected by signalling it when the files on disk show the moment
(a temp file, k finished entries in the manifest), never by mocking."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anomaly_vae.demo import DEMO_EXCLUDE, make_transactions

ENTRY_POINT = Path(sys.executable).with_name("anomaly-vae")
EXCLUDE = [a for c in DEMO_EXCLUDE for a in ("--exclude", c)]
N_PARTS, PART_ROWS = 8, 1500


def cli(*args, check: bool | None = True, **kw) -> subprocess.CompletedProcess:
    """Run the installed console script to completion; check=True asserts exit 0."""
    r = subprocess.run([str(ENTRY_POINT), "--threads", "1", *map(str, args)], capture_output=True,
                       text=True, timeout=300, **kw)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([str(ENTRY_POINT), "--threads", "1", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(pred, proc: subprocess.Popen | None = None, timeout: float = 120.0, what: str = "") -> None:
    """Poll `pred()` every 10 ms; fail if `proc` ends first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def manifest(out: Path) -> dict:
    try:
        return json.loads((out / "_manifest.json").read_text())
    except (OSError, ValueError):          # not written yet (or being replaced: os.replace is atomic)
        return {"files": {}}


def n_done(out: Path) -> int:
    return sum(e.get("status") == "done" for e in manifest(out)["files"].values())


def temps(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if ".tmp-" in p.name) if d.exists() else []


def scores(out: Path) -> dict[str, pd.DataFrame]:
    return {p.name: pd.read_parquet(p) for p in sorted(out.glob("*.scored.parquet"))}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """8 incoming parts of 2,500 demo rows, a model trained through the CLI, and a clean run's
    outputs to compare with."""
    root = tmp_path_factory.mktemp("faults")
    df = make_transactions(2000 + N_PARTS * PART_ROWS, seed=11)
    df.iloc[:2000].to_parquet(root / "train.parquet", index=False)
    incoming = root / "incoming"
    incoming.mkdir()
    for i in range(N_PARTS):
        df.iloc[2000 + i * PART_ROWS:2000 + (i + 1) * PART_ROWS].to_parquet(
            incoming / f"part-{i}.parquet", index=False)
    model = root / "model"
    cli("-q", "train", root / "train.parquet", "--label", "label", *EXCLUDE, "--epochs", "3",
        "--no-mlflow", "-o", model)
    clean = root / "clean"
    cli("-q", "score", "--no-mlflow", "-m", model, incoming, "-o", clean)
    return {"root": root, "incoming": incoming, "model": model, "clean": scores(clean), "frame": df}


def assert_equals_clean(out: Path, clean: dict[str, pd.DataFrame]) -> None:
    got = scores(out)
    assert sorted(got) == sorted(clean)
    for name, ref in clean.items():
        pd.testing.assert_frame_equal(got[name], ref)
    m = manifest(out)
    assert len(m["files"]) == len(clean) and {e["status"] for e in m["files"].values()} == {"done"}
    assert sum(e["rows_out"] for e in m["files"].values()) == sum(len(f) for f in clean.values())
    assert temps(out) == []


# ------------------------------------------------------------------ SIGKILL score, then --resume
@pytest.mark.parametrize("moment", ["mid-file-5", pytest.param("first-temp", marks=pytest.mark.slow),
                                    pytest.param("2-done", marks=pytest.mark.slow),
                                    pytest.param("mid-file-1", marks=pytest.mark.slow),
                                    pytest.param("7-done", marks=pytest.mark.slow)])
def test_sigkill_score_then_resume_scores_every_input_once_equal_to_a_clean_run(env, tmp_path, moment):
    out = tmp_path / "out"
    proc = start("-q", "score", "--no-mlflow", "-m", env["model"], env["incoming"], "-o", out, "--batch-size", "100")
    if moment == "first-temp":
        wait_for(lambda: temps(out), proc, what="the first temp file")
    elif moment.startswith("mid-file"):
        k = int(moment.rsplit("-", 1)[1])
        wait_for(lambda: n_done(out) >= k and temps(out), proc, what=f"a temp after {k} files")
    else:
        k = int(moment.split("-")[0])
        wait_for(lambda: n_done(out) >= k, proc, what=f"{k} finished files")
    kill(proc)
    done_before = {n: (out / n).stat().st_mtime_ns for n in env["clean"] if (out / n).exists()}
    assert len(done_before) < N_PARTS                     # the kill really interrupted the run
    r = cli("score", "--no-mlflow", "-m", env["model"], env["incoming"], "-o", out, "--resume")
    assert f"{len(done_before)} skipped (done)" in r.stdout or not done_before
    assert_equals_clean(out, env["clean"])
    # what was finished before the kill was kept, not rescored
    assert {n: (out / n).stat().st_mtime_ns for n in done_before} == done_before


# ------------------------------------------------------------------ two runs, one output directory
def test_second_score_into_the_same_directory_exits_3_or_waits_and_nothing_is_lost(env, tmp_path):
    out = tmp_path / "out"
    other_in = tmp_path / "other"
    other_in.mkdir()
    env["frame"].iloc[:300].to_parquet(other_in / "extra.parquet", index=False)
    first = start("-q", "score", "--no-mlflow", "-m", env["model"], env["incoming"], "-o", out, "--batch-size", "100")
    wait_for(lambda: n_done(out) >= 1 and temps(out), first, what="the first run mid-file")
    first.send_signal(signal.SIGSTOP)                     # hold it mid-write, lock taken
    try:
        live = temps(out)
        assert live
        # refused at once, exit 3, and the live run's temp file is left alone
        r = cli("score", "--no-mlflow", "-m", env["model"], other_in, "-o", out, check=False)
        assert r.returncode == 3, r.stderr
        assert "another `score` run is writing into this output directory" in r.stderr
        assert "--wait" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        # same with --resume and identical inputs
        r = cli("score", "--no-mlflow", "-m", env["model"], env["incoming"], "-o", out, "--resume", check=False)
        assert r.returncode == 3, r.stderr
        # a run into the parent directory (another lock) cleans stale temps, never live ones
        stale = out / f".part-9.scored.parquet.tmp-{_dead_pid()}-0badc0de"
        stale.write_bytes(b"left by a killed run")
        cli("-q", "score", "--no-mlflow", "-m", env["model"], other_in, "-o", tmp_path)
        assert all(p.exists() for p in live) and not stale.exists()
        # --wait queues behind the first run
        second = start("-q", "score", "--no-mlflow", "-m", env["model"], other_in, "-o", out, "--wait")
        time.sleep(1.0)
        assert second.poll() is None                      # still waiting for the lock
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.wait(timeout=300) == 0, second.stderr.read()
    for p in (first, second):
        p.stdout.close()
        p.stderr.close()
    m = manifest(out)
    assert len(m["files"]) == N_PARTS + 1 and {e["status"] for e in m["files"].values()} == {"done"}
    got = scores(out)
    for name, ref in env["clean"].items():
        pd.testing.assert_frame_equal(got[name], ref)
    assert len(got["extra.scored.parquet"]) == 300 and temps(out) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------ resume after a model change
def test_resume_refuses_when_the_model_directory_was_retrained(env, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(env["model"], model)
    out = tmp_path / "out"
    proc = start("-q", "score", "--no-mlflow", "-m", model, env["incoming"], "-o", out, "--batch-size", "100")
    wait_for(lambda: n_done(out) >= 3, proc, what="3 finished files")
    kill(proc)
    kept = {p.name: p.read_bytes() for p in out.glob("*.scored.parquet")}
    old_threshold = manifest(out)["threshold"]
    cli("-q", "train", env["root"] / "train.parquet", "--label", "label", *EXCLUDE, "--epochs", "3",
        "--seed", "1", "--no-mlflow", "-o", model)
    r = cli("score", "--no-mlflow", "-m", model, env["incoming"], "-o", out, "--resume", check=False)
    assert r.returncode == 2, r.stderr
    assert "written by another model" in r.stderr and "the model changed since that run" in r.stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.scored.parquet")} == kept      # nothing mixed
    assert manifest(out)["threshold"] == old_threshold
    # without --resume every input is rescored with the new model, and the manifest says so
    cli("-q", "score", "--no-mlflow", "-m", model, env["incoming"], "-o", out)
    m = manifest(out)
    assert {e["model_sha256"] for e in m["files"].values()} == {m["model"]["sha256"]}
    assert len(m["files"]) == N_PARTS and m["threshold"] != old_threshold


def test_resume_recognises_outputs_however_the_paths_are_typed(env, tmp_path):
    out = tmp_path / "out"
    rel = {k: os.path.relpath(env[k], tmp_path) for k in ("model", "incoming")}
    cli("-q", "score", "--no-mlflow", "-m", rel["model"], rel["incoming"], "-o", "out", cwd=tmp_path)     # relative
    r = cli("score", "--no-mlflow", "-m", os.path.relpath(env["model"], out), os.path.relpath(env["incoming"], out),
            "-o", ".", "--resume", cwd=out)                                              # from inside
    assert f"0 scored, {N_PARTS} skipped" in r.stdout
    r = cli("score", "--no-mlflow", "-m", env["model"], env["incoming"], "-o", out.resolve(), "--resume")  # absolute
    assert f"0 scored, {N_PARTS} skipped" in r.stdout


# ------------------------------------------------------------------ bad inputs: per-file failures
def test_keep_going_survives_every_failure_inside_one_input_and_mixed_offsets_become_utc(env, tmp_path):
    rows = env["frame"].iloc[2000:2300].reset_index(drop=True)
    land = tmp_path / "land"
    land.mkdir()
    offsets = np.where(np.arange(len(rows)) % 2, "+01:00", "-05:00")
    local = rows["timestamp"] + pd.to_timedelta(np.where(offsets == "+01:00", 1, -5), unit="h")
    mixed = rows.assign(timestamp=local.dt.strftime("%Y-%m-%dT%H:%M:%S") + offsets)   # same instants
    mixed.to_parquet(land / "a-mixed-offsets.parquet", index=False)
    rows.assign(amount=rows["amount"] > 50).to_parquet(land / "b-bool-amount.parquet", index=False)
    rows.assign(amount=pd.to_timedelta(rows["amount"], unit="s")).to_parquet(land / "c-duration.parquet", index=False)
    rows.to_parquet(land / "d-good.parquet", index=False)
    out = tmp_path / "out"
    r = cli("score", "--no-mlflow", "-m", env["model"], land, "-o", out, "--keep-going", check=False)
    assert r.returncode == 2, r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert "files:   2 scored, 2 failed" in r.stdout
    m = manifest(out)["files"]
    status = {Path(e["input"]).name: (e["status"], e.get("error", "")) for e in m.values()}
    assert status["b-bool-amount.parquet"][0] == "failed"
    assert "b-bool-amount.parquet" in status["b-bool-amount.parquet"][1]
    assert "column 'amount': expected a number, found booleans" in status["b-bool-amount.parquet"][1]
    assert "column 'amount': expected a number, found durations" in status["c-duration.parquet"][1]
    # text timestamps with offsets are instants: converted to UTC, they score as the UTC rows do
    got = pd.read_parquet(out / "a-mixed-offsets.scored.parquet")
    ref = pd.read_parquet(out / "d-good.scored.parquet")
    pd.testing.assert_frame_equal(got, ref)
    # --resume retries only the failed ones
    r = cli("score", "--no-mlflow", "-m", env["model"], land, "-o", out, "--keep-going", "--resume", check=False)
    assert "0 scored, 2 skipped (done), 2 failed" in r.stdout


def test_train_with_one_absurd_value_warns_and_keeps_the_column(env, tmp_path):
    train = pd.read_parquet(env["root"] / "train.parquet")
    train.loc[train.index[train["label"] == 0][:5], "amount"] = 1e308     # some land in the fit split
    train.to_parquet(tmp_path / "train.parquet", index=False)
    model = tmp_path / "model"
    r = cli("train", tmp_path / "train.parquet", "--label", "label", *EXCLUDE, "--epochs", "3",
            "--no-mlflow", "-o", model)
    assert "column 'amount': " in r.stderr and "training value(s) lie more than 1e+06 robust scales" in r.stderr
    params = json.loads((model / "preprocess.json").read_text())["params"]["amount"]
    assert all(np.isfinite(params[k]) for k in ("mean", "std", "median", "scale"))
    # the column still matters: amounts x1000 are flagged
    rows = env["frame"].iloc[2000:2500]
    rows.to_parquet(tmp_path / "normal.parquet", index=False)
    rows.assign(amount=rows["amount"] * 1000).to_parquet(tmp_path / "huge.parquet", index=False)
    cli("-q", "score", "--no-mlflow", "-m", model, tmp_path / "normal.parquet", tmp_path / "huge.parquet", "-o", tmp_path / "s")
    normal = pd.read_parquet(tmp_path / "s" / "normal.scored.parquet")["is_anomaly"].mean()
    huge = pd.read_parquet(tmp_path / "s" / "huge.scored.parquet")["is_anomaly"].mean()
    assert normal < 0.1 and huge > 0.9


# ------------------------------------------------------------------ SIGKILL train (also inside save)
# Runs the real CLI in a fresh interpreter that SIGKILLs itself at one chosen point: on entering
# the training loop, on entering save, or just before the k-th filesystem step of save (mkdir,
# fsync of each written file, rename, symlink, replace). KILL_AT=count only counts the steps.
_KILLER = r"""
import atexit, os, signal, sys
import anomaly_vae.detector as D
import anomaly_vae.persist as P
point = os.environ["KILL_AT"]
steps = [0]
active = [False]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def hook(name):
    orig = getattr(os, name)
    def step(*a, **k):
        if active[0]:
            steps[0] += 1
            if point == f"step-{steps[0]}":
                die()
        return orig(*a, **k)
    setattr(os, name, step)

for name in ("mkdir", "fsync", "rename", "symlink", "replace"):
    hook(name)
fit, save = D.fit_vae, P.save_model

def fit_vae(*a, **k):
    if point == "fit":
        die()
    return fit(*a, **k)

def save_model(*a, **k):
    if point == "save":
        die()
    active[0] = True
    try:
        return save(*a, **k)
    finally:
        active[0] = False

D.fit_vae, P.save_model = fit_vae, save_model
if point == "count":
    atexit.register(lambda: open(os.environ["KILL_COUNT"], "w").write(str(steps[0])))
from anomaly_vae.cli import main
main(args=sys.argv[1:], prog_name="anomaly-vae")
"""


def _train_killed_at(point: str, train: Path, model: Path, seed: int, tmp_path: Path) -> int:
    env = {**os.environ, "KILL_AT": point, "KILL_COUNT": str(tmp_path / "steps")}
    r = subprocess.run([sys.executable, "-c", _KILLER, "-q", "--threads", "1", "train", str(train),
                        "--label", "label", *EXCLUDE, "--epochs", "3", "--seed", str(seed),
                        "--no-mlflow", "-o", str(model)], env=env, capture_output=True, text=True, timeout=300)
    return r.returncode


@pytest.fixture(scope="module")
def two_models(env, tmp_path_factory):
    """The content digests of the seed-0 model (env) and of the same training with seed 1,
    and the number of filesystem steps one save takes."""
    from anomaly_vae import VAEAnomalyDetector
    from anomaly_vae.batch import model_digest

    root = tmp_path_factory.mktemp("save")
    new = root / "new"
    shutil.copytree(env["model"], new)                  # an overwrite, as in the test
    assert _train_killed_at("count", env["root"] / "train.parquet", new, 1, root) == 0
    return {"old": model_digest(VAEAnomalyDetector.load(env["model"])),
            "new": model_digest(VAEAnomalyDetector.load(new)), "steps": int((root / "steps").read_text())}


def _save_points() -> list:
    slow = pytest.mark.slow
    points = ["save", "step-3", "step-last"]
    points += [pytest.param(p, marks=slow) for p in ("fit", "step-1", "step-last-1")]
    points += [pytest.param(f"step-{k}", marks=slow) for k in (2, 4, 5, 6, 7, 8, 9, 10, 11, 12)]
    return points


@pytest.mark.parametrize("point", _save_points())
def test_sigkill_train_over_an_existing_model_leaves_the_old_or_the_new_model(env, two_models, tmp_path, point):
    model = tmp_path / "model"
    shutil.copytree(env["model"], model)
    n = two_models["steps"]
    if point.startswith("step-last"):
        point = f"step-{n - (1 if point == 'step-last-1' else 0)}"
    if point.startswith("step-") and int(point[5:]) > n:
        pytest.skip(f"a save takes {n} filesystem steps")
    assert _train_killed_at(point, env["root"] / "train.parquet", model, 1, tmp_path) == -signal.SIGKILL
    out = tmp_path / "out"
    cli("-q", "score", "--no-mlflow", "-m", model, env["incoming"] / "part-0.parquet", "-o", out)
    got = manifest(out)["model"]["sha256"]
    assert got in (two_models["old"], two_models["new"])
    if point in ("fit", "save", "step-1"):
        assert got == two_models["old"]                 # nothing of the new model was in place yet
    # the next save succeeds and cleans up what the killed one left
    cli("-q", "train", env["root"] / "train.parquet", "--label", "label", *EXCLUDE, "--epochs", "3",
        "--seed", "1", "--no-mlflow", "-o", model)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model") and not p.name.endswith(".lock"))
    assert len(left) <= 2 and not any(".lnk-" in p or ".tmp-" in p for p in left), left
    shutil.rmtree(out)
    cli("-q", "score", "--no-mlflow", "-m", model, env["incoming"] / "part-0.parquet", "-o", out)
    assert manifest(out)["model"]["sha256"] == two_models["new"]
