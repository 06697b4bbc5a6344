"""Pickle-free model directories: JSON files + safetensors weights, hashed, written atomically.

Layout: config.json, schema.json, preprocess.json, calibration.json, metrics.json,
weights.safetensors and manifest.json (format name/version + sha256 of every other file).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import Config
from .errors import ModelFormatError, ModelNotFoundError
from .preprocess import Preprocessor
from .schema import Schema

FORMAT = "anomaly-vae-model"
FORMAT_VERSION = 1
FILES = ("config.json", "schema.json", "preprocess.json", "calibration.json", "metrics.json",
         "weights.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import pandas, sklearn  # noqa: E401
    from . import __version__
    return {"anomaly_vae": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "pandas": pandas.__version__, "scikit-learn": sklearn.__version__}


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, allow_nan=True))


def save_model(det: Any, path: str | os.PathLike) -> str:
    """Write fitted detector `det` to a temp dir beside `path`, then rename into place (old model
    swapped out last)."""
    from sklearn.utils.validation import check_is_fitted
    check_is_fitted(det, "vae_")
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "manifest.json").exists())):
        raise ModelFormatError(f"{path}: exists and is not an anomaly-vae model directory; "
                               "refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        params = det.get_params()
        for k in ("hidden", "categorical", "exclude", "id_cols"):
            if params[k] is not None:
                params[k] = list(params[k])
        _dump(tmp / "config.json", {"params": params, "config": det.config_.to_dict(),
                                    "versions": _versions(), "from_array": bool(det._from_array)})
        (tmp / "schema.json").write_text(det.schema_.to_json())
        _dump(tmp / "preprocess.json", det.preprocessor_.to_dict())
        _dump(tmp / "calibration.json", {**det.calibration_, "column_median": det.column_median_.tolist(),
                                         "scores": det.calibration_scores_.tolist(),
                                         "typical_x": det.typical_x_.tolist(),
                                         "reference": det.reference_})
        _dump(tmp / "metrics.json", {"history": det.history_.to_dict(), "fit_seconds": det.fit_seconds_})
        state = {k: v.contiguous() for k, v in det.vae_.state_dict().items()}
        save_file(state, str(tmp / "weights.safetensors"), metadata={"format": FORMAT})
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "files": {name: _sha256(tmp / name) for name in FILES}}
        _dump(tmp / "manifest.json", manifest)
        backup = None
        if path.exists():
            backup = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, backup)
        os.rename(tmp, path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(path)


def load_model(path: str | os.PathLike, cls: type) -> Any:
    """A fitted `cls` (VAEAnomalyDetector, passed in so that persist stays below detector) from
    a model directory, after checking format version and file hashes."""
    from .model import VAE
    from .train import History

    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise ModelNotFoundError(f"{path}: not an anomaly-vae model directory (no manifest.json)")
    manifest = _read_json(path / "manifest.json")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{path}: unknown model format {manifest.get('format')!r} version "
                               f"{manifest.get('format_version')!r}; expected {FORMAT!r} v{FORMAT_VERSION}")
    files = manifest.get("files", {})
    if sorted(files) != sorted(FILES):
        raise ModelFormatError(f"{path}: manifest lists {sorted(files)}, expected {sorted(FILES)}")
    for name, digest in files.items():
        if not (path / name).is_file():
            raise ModelFormatError(f"{path}: missing file {name}")
        if _sha256(path / name) != digest:
            raise ModelFormatError(f"{path}/{name}: sha256 does not match the manifest; the model "
                                   "was modified or corrupted; refusing to load it")
    cfg = _read_json(path / "config.json")
    cal = _read_json(path / "calibration.json")
    metrics = _read_json(path / "metrics.json")
    params = cfg["params"]
    for k in ("hidden", "categorical", "exclude", "id_cols"):
        if params.get(k) is not None:
            params[k] = tuple(params[k])
    det = cls(**params)
    det.config_ = Config.from_dict({**cfg["config"], "hidden": tuple(cfg["config"]["hidden"])})
    det._from_array = bool(cfg.get("from_array", False))
    det.schema_ = Schema.from_dict(_read_json(path / "schema.json"))
    det.preprocessor_ = Preprocessor.from_dict(_read_json(path / "preprocess.json"))
    det.feature_names_in_ = np.asarray([c.name for c in det.schema_.features], dtype=object)
    det.n_features_in_ = len(det.feature_names_in_)
    vae = VAE.from_config(det.preprocessor_, det.config_)
    vae.load_state_dict(load_file(str(path / "weights.safetensors")), strict=True)
    det.vae_ = vae.eval()
    det.threshold_ = float(cal["threshold"])
    det.offset_ = -det.threshold_
    det.column_median_ = np.asarray(cal["column_median"], dtype=np.float64)
    det.calibration_scores_ = np.asarray(cal["scores"], dtype=np.float64)
    typical = cal.get("typical_x")             # absent in models saved before KL attribution
    det.typical_x_ = None if typical is None else np.asarray(typical, dtype=np.float32)
    det.reference_ = cal.get("reference", {})
    det.calibration_ = {k: v for k, v in cal.items()
                        if k not in ("column_median", "scores", "reference", "typical_x")}
    det.history_ = History(**metrics["history"])
    det.fit_seconds_ = float(metrics.get("fit_seconds", 0.0))
    return det


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: unreadable JSON ({exc})") from exc
