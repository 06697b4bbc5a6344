import json
import os

import numpy as np
import pytest

from anomaly_vae import ModelFormatError, ModelNotFoundError, VAEAnomalyDetector


def test_roundtrip_gives_identical_scores(fitted, frame, tmp_path):
    path = fitted.save(tmp_path / "m")
    assert sorted(os.listdir(path)) == sorted(["manifest.json", "config.json", "schema.json", "preprocess.json",
                                               "calibration.json", "metrics.json", "weights.safetensors"])
    loaded = VAEAnomalyDetector.load(path)
    np.testing.assert_array_equal(loaded.anomaly_score(frame), fitted.anomaly_score(frame))
    assert loaded.threshold_ == fitted.threshold_
    assert loaded.explain(frame.head(20)).equals(fitted.explain(frame.head(20)))
    assert loaded.get_params() == fitted.get_params()


def test_no_pickle_in_model_dir(fitted, tmp_path):
    path = fitted.save(tmp_path / "m")
    for name in os.listdir(path):
        head = open(os.path.join(path, name), "rb").read(2)
        assert head != b"\x80\x04" and head != b"\x80\x02", name    # pickle protocol markers


def test_overwrite_is_atomic_and_leaves_no_temp(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    fitted.save(tmp_path / "m")
    assert os.listdir(tmp_path) == ["m"]


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
