import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from safetensors.torch import load_file, save_file

from anomaly_vae import ModelFormatError, ModelNotFoundError, VAEAnomalyDetector, batch
from conftest import FAST


def test_roundtrip_gives_identical_scores(fitted, frame, tmp_path):
    path = fitted.save(tmp_path / "m")
    assert sorted(os.listdir(path)) == sorted(["manifest.json", "config.json", "schema.json", "preprocess.json",
                                               "calibration.json", "metrics.json", "weights.safetensors"])
    loaded = VAEAnomalyDetector.load(path)
    np.testing.assert_array_equal(loaded.anomaly_score(frame), fitted.anomaly_score(frame))
    assert loaded.threshold_ == fitted.threshold_
    assert loaded.explain(frame.head(20)).equals(fitted.explain(frame.head(20)))
    assert loaded.get_params() == fitted.get_params()
    # the same bits in every output, also the contributions (float32 NLL minus the column
    # medians: float64 in both, or a fitted and a loaded model differ in the last bits)
    pd.testing.assert_frame_equal(loaded.contributions(frame), fitted.contributions(frame), check_exact=True)
    flagged = frame[fitted.predict(frame) == -1]
    assert len(flagged) and loaded.explain(flagged).equals(fitted.explain(flagged))
    assert batch.model_digest(loaded) == batch.model_digest(fitted)


def test_no_pickle_in_model_dir(fitted, tmp_path):
    path = fitted.save(tmp_path / "m")
    for name in os.listdir(path):
        head = open(os.path.join(path, name), "rb").read(2)
        assert head != b"\x80\x04" and head != b"\x80\x02", name    # pickle protocol markers


def test_refuses_to_overwrite_foreign_directory(fitted, tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("keep me")
    with pytest.raises(ModelFormatError, match="refusing"):
        fitted.save(tmp_path / "stuff")
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "keep me"


def _rewrite_json(model_dir: str, name: str, **changes) -> None:
    path = os.path.join(model_dir, name)
    data = json.loads(open(path).read())
    data.update(changes)
    open(path, "w").write(json.dumps(data))


def test_load_refuses_tampered_and_unknown_formats(fitted, tmp_path):
    path = fitted.save(tmp_path / "m")
    _rewrite_json(path, "calibration.json", threshold=1e9)
    with pytest.raises(ModelFormatError, match="calibration.json.*sha256"):
        VAEAnomalyDetector.load(path)
    path2 = fitted.save(tmp_path / "m2")
    _rewrite_json(path2, "manifest.json", format_version=99)
    with pytest.raises(ModelFormatError, match="version 99"):
        VAEAnomalyDetector.load(path2)
    with pytest.raises(ModelNotFoundError):
        VAEAnomalyDetector.load(tmp_path / "nope")


# ------------------------------------------------------------- crash-safe overwrite
def _versions(parent, name="m"):
    return sorted(p for p in os.listdir(parent) if p.startswith(f".{name}.v-"))


def test_overwrite_keeps_current_and_previous_version_and_removes_leftovers(fitted, tmp_path):
    m = tmp_path / "m"
    fitted.save(m)
    first = os.readlink(m)
    (tmp_path / ".m.tmp-dead").mkdir()                     # leftovers of killed saves
    (tmp_path / ".m.old-dead").mkdir()
    (tmp_path / ".m.v-20000101T000000-deadbeef").mkdir()   # incomplete version: no manifest
    (tmp_path / ".m.lnk-dead").symlink_to(".m.v-nowhere")
    (tmp_path / ".other.tmp-keep").mkdir()                 # another model's: not ours to remove
    fitted.save(m)
    second = os.readlink(m)
    assert m.is_symlink() and first != second
    assert _versions(tmp_path) == sorted([first, second])
    assert sorted(os.listdir(tmp_path)) == sorted([".m.lock", "m", first, second, ".other.tmp-keep"])
    fitted.save(m)
    assert _versions(tmp_path) == sorted([second, os.readlink(m)])
    VAEAnomalyDetector.load(m)


def test_files_follow_the_umask(fitted, tmp_path):
    old = os.umask(0o022)
    try:
        path = fitted.save(tmp_path / "m")
    finally:
        os.umask(old)
    modes = {name: oct(os.stat(os.path.join(path, name)).st_mode & 0o777) for name in os.listdir(path)}
    assert set(modes.values()) == {"0o644"}, modes


def test_overwrites_a_plain_directory_from_older_saves(fitted, frame, tmp_path):
    legacy = tmp_path / "m"
    shutil.copytree(fitted.save(tmp_path / "src"), legacy)        # a real directory, as older code wrote
    assert not legacy.is_symlink()
    fitted.save(legacy)
    assert legacy.is_symlink() and len(_versions(tmp_path)) == 2   # new + the moved-aside old one
    # older code paths read plain files below the path: still there through the link
    assert json.loads((legacy / "manifest.json").read_text())["format"] == "anomaly-vae-model"
    np.testing.assert_array_equal(VAEAnomalyDetector.load(legacy).anomaly_score(frame.head(50)),
                                  fitted.anomaly_score(frame.head(50)))


def test_saving_through_a_user_symlink_writes_where_it_points(fitted, tmp_path):
    real = tmp_path / "disk" / "payments"
    fitted.save(real)
    (tmp_path / "link").symlink_to(real)
    fitted.save(tmp_path / "link")
    assert os.readlink(tmp_path / "link") == str(real)          # the user's link is left alone
    assert len(_versions(tmp_path / "disk", "payments")) == 2


def test_load_recovers_the_state_an_interrupted_older_save_left(fitted, other_fitted, frame, tmp_path):
    """The issue's case: a crash between the two renames of the old code left only
    .m.old-* (old model) and .m.tmp-* (complete new model); no m."""
    shutil.copytree(fitted.save(tmp_path / "a"), tmp_path / ".m.old-1a2b3c4d")
    time.sleep(0.01)
    shutil.copytree(other_fitted.save(tmp_path / "b"), tmp_path / ".m.tmp-5e6f7a8b")
    loaded = VAEAnomalyDetector.load(tmp_path / "m")              # the newest complete one: new
    assert loaded.threshold_ == other_fitted.threshold_
    assert (tmp_path / "m").is_symlink()                          # and the path is repaired
    other_fitted.save(tmp_path / "m")       # keeps the version it replaced (.m.tmp-*), drops .m.old-*
    assert [p for p in os.listdir(tmp_path) if ".m.old-" in p or ".m.tmp-" in p] == [".m.tmp-5e6f7a8b"]
    other_fitted.save(tmp_path / "m")
    assert not [p for p in os.listdir(tmp_path) if ".m.old-" in p or ".m.tmp-" in p]


# ---------------------------------------------------------------- SIGKILL during save
_STEPS = ("_write", "_fsync_dir", "rename", "replace", "symlink", "rmtree")


def _save_and_pause_at(det, dst, step: int, marker) -> None:
    """In a forked child: save `det` to `dst`, but stop at the `step`-th file-system step (a
    file write is cut in half), write `marker` and sleep until killed."""
    import anomaly_vae.persist as P
    count = [0]

    def pause(what: str, half_write=None) -> None:
        count[0] += 1
        if count[0] == step:
            if half_write is not None:
                path, data = half_write
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
            open(marker, "w").write(what)
            time.sleep(600)

    def wrap(owner, name):
        orig = getattr(owner, name, None)
        if orig is None:
            return
        if name == "_write":
            def f(path, data):
                pause(f"write {path.name}", (path, data))
                return orig(path, data)
        else:
            def f(*a, **kw):
                pause(f"{name} {a[0] if a else ''}")
                return orig(*a, **kw)
        setattr(owner, name, f)

    for owner, name in ((P, "_write"), (P, "_fsync_dir"), (os, "rename"), (os, "replace"),
                        (os, "symlink"), (shutil, "rmtree")):
        wrap(owner, name)
    det.save(dst)


def _kill_during_save(det, dst, step: int, tmp_path) -> str | None:
    """Fork a child that saves `det` to `dst` and SIGKILL it at `step`; None when the save
    finished before reaching that step."""
    marker = tmp_path / f"marker-{step}"
    pid = os.fork()
    if pid == 0:                                   # child: never returns into pytest
        code = 1
        try:
            _save_and_pause_at(det, dst, step, marker)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while not marker.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, "the save failed on its own"
            return None
        assert time.monotonic() < deadline, "child neither paused nor finished"
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return marker.read_text()


@pytest.fixture(scope="module")
def other_fitted(frame):
    return VAEAnomalyDetector(**{**FAST, "random_state": 1}).fit(frame)


@pytest.mark.parametrize("layout", ["symlink", "plain directory"])
def test_sigkill_at_every_step_of_an_overwrite_leaves_old_or_new_model(layout, fitted, other_fitted,
                                                                        frame, tmp_path):
    assert fitted.threshold_ != other_fitted.threshold_
    outcomes = []
    for step in range(1, 40):
        root = tmp_path / f"s{step}"
        root.mkdir()
        dst = root / "m"
        if layout == "symlink":
            fitted.save(dst)
        else:
            shutil.copytree(fitted.save(root / "src"), dst)
            for p in root.iterdir():
                if p.name != "m":
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        where = _kill_during_save(other_fitted, dst, step, tmp_path)
        if where is None:
            break
        loaded = VAEAnomalyDetector.load(dst)
        got = {fitted.threshold_: "old", other_fitted.threshold_: "new"}.get(loaded.threshold_)
        assert got is not None, (step, where, os.listdir(root))
        np.testing.assert_array_equal(loaded.anomaly_score(frame.head(20)),
                                      (fitted if got == "old" else other_fitted).anomaly_score(frame.head(20)))
        outcomes.append((where, got))
        fitted.save(dst)                                   # the next save cleans up after the killed one
        left = sorted(os.listdir(root))
        assert [p for p in left if p.startswith(".m.v-")] == _versions(root) and len(_versions(root)) <= 2, left
        assert not [p for p in left if ".tmp-" in p or ".old-" in p or ".lnk-" in p], left
    else:
        pytest.fail("the save never finished within 40 steps")
    assert len(outcomes) >= 9, outcomes
    kinds = [got for _, got in outcomes]
    assert kinds[0] == "old" and kinds[-1] == "new", outcomes    # killed early: old; after the swap: new


# ------------------------------------------- broken files whose hashes match (ModelFormatError)
def _rehash(model_dir) -> None:
    """What someone with write access can do: refresh the manifest after editing a file."""
    manifest = json.loads(open(os.path.join(model_dir, "manifest.json")).read())
    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256(open(os.path.join(model_dir, name), "rb").read()).hexdigest()
    open(os.path.join(model_dir, "manifest.json"), "w").write(json.dumps(manifest))


def _edit_json(name, fn):
    def edit(model_dir):
        path = os.path.join(model_dir, name)
        data = json.loads(open(path).read())
        fn(data)
        open(path, "w").write(json.dumps(data))
    return edit


def _pickled_weights(model_dir):
    state = dict(VAEAnomalyDetector.load(model_dir).vae_.state_dict())
    open(os.path.join(model_dir, "weights.safetensors"), "wb").write(pickle.dumps(state))


def _weights_missing_a_key(model_dir):
    path = os.path.join(model_dir, "weights.safetensors")
    state = load_file(path)
    state.pop(sorted(state)[0])
    save_file(state, path)


def _nested(model_dir):
    open(os.path.join(model_dir, "metrics.json"), "w").write("[" * 100_000 + "]" * 100_000)


BROKEN = {
    "pickle in place of the weights": (_pickled_weights, "weights.safetensors"),
    "missing state-dict key": (_weights_missing_a_key, "weights.safetensors"),
    "unknown key in config.json config": (_edit_json("config.json", lambda d: d["config"].update(colour=1)),
                                          "config.json"),
    "unknown estimator parameter": (_edit_json("config.json", lambda d: d["params"].update(colour=1)),
                                    "config.json"),
    "config.json without params": (_edit_json("config.json", lambda d: d.pop("params")), "config.json"),
    "unknown column kind": (_edit_json("schema.json", lambda d: d["columns"][1].update(kind="vector")),
                            "schema.json"),
    "preprocess.json without spans": (_edit_json("preprocess.json", lambda d: d.pop("spans")),
                                      "preprocess.json"),
    "threshold is text": (_edit_json("calibration.json", lambda d: d.update(threshold="high")),
                          "calibration.json"),
    "threshold is NaN": (_edit_json("calibration.json", lambda d: d.update(threshold=float("nan"))),
                         "calibration.json"),
    "column medians of another model": (
        _edit_json("calibration.json", lambda d: d.update(column_median=d["column_median"][:-1])),
        "do not fit together"),
    "history with an unknown field": (_edit_json("metrics.json", lambda d: d["history"].update(lr=[1])),
                                      "metrics.json"),
    "deeply nested JSON": (_nested, "metrics.json"),
    "manifest is a list": (lambda d: open(os.path.join(d, "manifest.json"), "w").write("[1]"),
                           "manifest.json"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_files_with_matching_hashes_are_model_format_errors(case, fitted, tmp_path):
    break_it, named = BROKEN[case]
    path = fitted.save(tmp_path / "m")
    break_it(path)
    if case != "manifest is a list":
        _rehash(path)
    where = tmp_path / "m" / named if named.endswith("json") or named.endswith("safetensors") else tmp_path / "m"
    with pytest.raises(ModelFormatError, match=re.escape(f"{where}:")) as info:
        VAEAnomalyDetector.load(tmp_path / "m")
    assert named in str(info.value)


def test_cli_exit_2_names_the_broken_file(fitted, frame, tmp_path):
    path = fitted.save(tmp_path / "m")
    _pickled_weights(path)
    _rehash(path)
    data = tmp_path / "in.parquet"
    frame.head(20).to_parquet(data)
    entry = os.path.join(os.path.dirname(sys.executable), "anomaly-vae")
    r = subprocess.run([entry, "score", "--no-mlflow", "-m", str(tmp_path / "m"), str(data), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "weights.safetensors" in lines[0] and "ModelFormatError" not in lines[0], lines
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.parquet"))


# ------------------------------------------------------------------------ signing
KEY = "k3y-0f-the-t3st-" + "5" * 16


def _all_text(model_dir) -> bytes:
    return b"".join(open(os.path.join(model_dir, n), "rb").read() for n in os.listdir(model_dir))


def test_signed_model_loads_and_a_rehashed_edit_is_refused(fitted, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ANOMALY_VAE_SIGNING_KEY", KEY)
    path = fitted.save(tmp_path / "m")
    assert json.loads(open(os.path.join(path, "signature.json")).read())["algorithm"] == "hmac-sha256"
    assert VAEAnomalyDetector.load(path).threshold_ == fitted.threshold_
    # the attack: a threshold that never flags, rehashed so the manifest matches
    _edit_json("calibration.json", lambda d: d.update(threshold=float("inf")))(path)
    _rehash(path)
    with pytest.raises(ModelFormatError, match="signature.json: the signature does not match"):
        VAEAnomalyDetector.load(path)
    monkeypatch.delenv("ANOMALY_VAE_SIGNING_KEY")
    assert VAEAnomalyDetector.load(path).threshold_ == float("inf")   # without a key: hashes only
    assert KEY.encode() not in _all_text(path) and KEY not in caplog.text


def test_key_configured_refuses_unsigned_and_other_key_models(fitted, tmp_path, monkeypatch):
    unsigned = fitted.save(tmp_path / "unsigned")
    key_file = tmp_path / "key"
    key_file.write_text("another-key-" + "7" * 20 + "\n")
    monkeypatch.setenv("ANOMALY_VAE_SIGNING_KEY_FILE", str(key_file))
    other = fitted.save(tmp_path / "other")
    VAEAnomalyDetector.load(other)
    with pytest.raises(ModelFormatError, match="not signed and a signing key is configured"):
        VAEAnomalyDetector.load(unsigned)
    monkeypatch.delenv("ANOMALY_VAE_SIGNING_KEY_FILE")
    monkeypatch.setenv("ANOMALY_VAE_SIGNING_KEY", KEY)
    with pytest.raises(ModelFormatError, match="signed with another key") as info:
        VAEAnomalyDetector.load(other)
    assert KEY not in str(info.value) and "another-key" not in str(info.value)


def test_bad_key_configuration_is_a_config_error_without_the_key(fitted, tmp_path, monkeypatch):
    from anomaly_vae.errors import ConfigError
    monkeypatch.setenv("ANOMALY_VAE_SIGNING_KEY", "short-secret")
    with pytest.raises(ConfigError, match="at least 16") as info:
        fitted.save(tmp_path / "m")
    assert "short-secret" not in str(info.value) and not (tmp_path / "m").exists()
    monkeypatch.setenv("ANOMALY_VAE_SIGNING_KEY", KEY)
    monkeypatch.setenv("ANOMALY_VAE_SIGNING_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="set only one"):
        fitted.save(tmp_path / "m")
    monkeypatch.delenv("ANOMALY_VAE_SIGNING_KEY")
    with pytest.raises(ConfigError, match="cannot read"):
        fitted.save(tmp_path / "m")


def test_cli_refuses_an_unsigned_model_when_a_key_is_set(fitted, frame, tmp_path):
    path = fitted.save(tmp_path / "m")
    data = tmp_path / "in.parquet"
    frame.head(20).to_parquet(data)
    entry = os.path.join(os.path.dirname(sys.executable), "anomaly-vae")
    r = subprocess.run([entry, "score", "--no-mlflow", "-m", path, str(data), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "ANOMALY_VAE_SIGNING_KEY": KEY})
    assert r.returncode == 2 and "not signed" in r.stderr and KEY not in r.stderr + r.stdout, r.stderr


def test_cli_scores_with_a_model_an_interrupted_save_left_without_its_path(fitted, other_fitted, frame, tmp_path):
    shutil.copytree(fitted.save(tmp_path / "a"), tmp_path / "models" / ".m.old-1a2b3c4d")
    data = tmp_path / "in.parquet"
    frame.head(30).to_parquet(data)
    entry = os.path.join(os.path.dirname(sys.executable), "anomaly-vae")
    r = subprocess.run([entry, "score", "--no-mlflow", "-m", str(tmp_path / "models" / "m"), str(data),
                        "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "interrupted save" in r.stderr
    scored = pd.read_parquet(tmp_path / "out" / "in.scored.parquet")
    np.testing.assert_allclose(scored["anomaly_score"], fitted.anomaly_score(frame.head(30)), rtol=1e-6)


@pytest.mark.slow
def test_sigkill_of_train_at_random_moments_leaves_old_or_new_model(frame, tmp_path):
    """The real CLI: `train -o models/m` over an existing model, SIGKILLed after a random delay
    (bounded loop, fixed seed); the path always loads, as the old or the new model."""
    data = tmp_path / "train.parquet"
    frame.to_parquet(data)
    entry = os.path.join(os.path.dirname(sys.executable), "anomaly-vae")
    m = tmp_path / "models" / "m"
    base = [entry, "-q", "--threads", "1", "train", str(data), "--no-mlflow", "--epochs", "3", "-o", str(m)]
    subprocess.run(base + ["--seed", "0"], check=True, capture_output=True, timeout=600)
    old = VAEAnomalyDetector.load(m).threshold_
    t0 = time.monotonic()
    subprocess.run(base + ["--seed", "1"], check=True, capture_output=True, timeout=600)
    full = time.monotonic() - t0
    new = VAEAnomalyDetector.load(m).threshold_
    assert old != new
    rng = np.random.default_rng(0)
    for i in range(6):
        seed = i % 2                                       # alternate, so both models are "new" in turn
        before = VAEAnomalyDetector.load(m).threshold_
        proc = subprocess.Popen(base + ["--seed", str(seed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5 * full, 1.05 * full))  # most kills land near the end: in the save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        after = VAEAnomalyDetector.load(m).threshold_
        assert after in (before, (old, new)[seed]), (i, before, after)
    left = os.listdir(m.parent)
    assert len([p for p in left if p.startswith(".m.v-")]) <= 3, left


def test_a_fitted_detector_loaded_for_scoring_saves_the_same_model(fitted, frame, tmp_path):
    """FittedDetector (what `score`, serving and Spark load) keeps the estimator parameters, so
    saving it again (Spark ships models to its workers that way) gives the same model."""
    from anomaly_vae import VAEAnomalyDetector
    from anomaly_vae.fitted import FittedDetector

    loaded = FittedDetector.load(fitted.save(tmp_path / "a"))
    assert loaded.get_params() == fitted.get_params()
    again = VAEAnomalyDetector.load(loaded.save(tmp_path / "b"))
    assert again.get_params() == fitted.get_params()
    np.testing.assert_array_equal(again.anomaly_score(frame.head(200)), fitted.anomaly_score(frame.head(200)))
