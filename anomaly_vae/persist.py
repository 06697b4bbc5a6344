"""Pickle-free model directories: JSON files + safetensors weights, hashed, written atomically.

Layout: config.json, schema.json, preprocess.json, calibration.json, metrics.json,
weights.safetensors and manifest.json (format name/version + sha256 of every other file), plus
signature.json when a signing key is configured (see `signing`).

Crash safety: a save writes a complete version directory ``.NAME.v-<id>`` beside the path
(files fsynced, manifest last), then atomically replaces ``NAME`` by a relative symlink to it,
so ``NAME`` always holds the old or the new complete model. The previous version is kept (a
reader that resolved it a moment ago can finish); older versions and leftovers of interrupted
saves are removed by the next save. A real directory at ``NAME`` (older saves) is moved aside
first; a crash in that one window leaves no ``NAME``, and `load_model` then loads the newest
complete version beside it (and restores the link when it can).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save as save_tensors

from . import signing
from .config import Config
from .errors import AnomalyVAEError, ModelFormatError, ModelNotFoundError
from .preprocess import Preprocessor
from .schema import Schema

log = logging.getLogger(__name__)

FORMAT = "anomaly-vae-model"
FORMAT_VERSION = 1
FILES = ("config.json", "schema.json", "preprocess.json", "calibration.json", "metrics.json",
         "weights.safetensors")
SIGNATURE = "signature.json"
LOCK_TIMEOUT_S = 300
# sibling names this module owns: versions, and temp/backup dirs of older saves
_SIBLING_KINDS = (".v-", ".tmp-", ".old-", ".lnk-")
# what a broken (but hash-consistent) model file raises while it is parsed
_FORMAT_PROBLEMS = (AnomalyVAEError, KeyError, TypeError, ValueError, AttributeError, IndexError,
                    RuntimeError, OverflowError, SafetensorError)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _versions() -> dict[str, str]:
    import sklearn
    from . import __version__
    return {"anomaly_vae": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "pandas": pd.__version__, "scikit-learn": sklearn.__version__}


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, allow_nan=True).encode()


def _write(path: Path, data: bytes) -> None:
    """Write and fsync one file (created with the process umask, like every model file)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:          # some filesystems refuse fsync on directories; rename order still holds
        pass
    finally:
        os.close(fd)


def _siblings(path: Path) -> list[Path]:
    """Version directories and leftovers of interrupted saves that belong to `path`."""
    prefix = f".{path.name}"
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    return [Path(e.path) for e in entries
            if any(e.name.startswith(prefix + kind) for kind in _SIBLING_KINDS)]


def _is_ours(path: Path) -> bool:
    """`path` is a symlink written by this module (relative, to a directory beside it)."""
    if not path.is_symlink():
        return False
    target = os.readlink(path)
    return os.sep not in target and any(target.startswith(f".{path.name}{kind}") for kind in _SIBLING_KINDS)


def _own_path(path: Path) -> Path:
    """Follow symlinks a user made (models/x -> /disk/models/x) up to the path whose link this
    module manages, so a save lands where the user's link points and leaves that link alone."""
    for _ in range(40):
        if not path.is_symlink() or _is_ours(path):
            return path
        path = Path(os.path.abspath(os.path.join(path.parent, os.readlink(path))))
    raise ModelFormatError(f"{path}: too many levels of symbolic links")


def _lock(path: Path) -> FileLock:
    return FileLock(str(path.parent / f".{path.name}.lock"))


def _model_files(det: Any) -> dict[str, bytes]:
    params = det.get_params()
    for k in ("hidden", "categorical", "exclude", "id_cols"):
        if params[k] is not None:
            params[k] = list(params[k])
    state = {k: v.contiguous() for k, v in det.vae_.state_dict().items()}
    return {
        "config.json": _json_bytes({"params": params, "config": det.config_.to_dict(),
                                    "versions": _versions(), "from_array": bool(det._from_array)}),
        "schema.json": det.schema_.to_json().encode(),
        "preprocess.json": _json_bytes(det.preprocessor_.to_dict()),
        "calibration.json": _json_bytes({**det.calibration_, "column_median": det.column_median_.tolist(),
                                         "scores": det.calibration_scores_.tolist(),
                                         "typical_x": det.typical_x_.tolist(),
                                         "reference": det.reference_,
                                         "marginals": getattr(det, "marginals_", {})}),
        "metrics.json": _json_bytes({"history": det.history_.to_dict(), "fit_seconds": det.fit_seconds_}),
        "weights.safetensors": save_tensors(state, metadata={"format": FORMAT}),
    }


def save_model(det: Any, path: str | os.PathLike) -> str:
    """Write fitted detector `det` to a complete version directory beside `path`, then point
    `path` at it atomically.

    Signs the manifest when a signing key is configured. Returns `path`.
    """
    det._check_fitted()
    path = _own_path(Path(path))
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "manifest.json").exists())):
        raise ModelFormatError(f"{path}: exists and is not an anomaly-vae model directory; "
                               "refusing to overwrite it")
    key = signing.signing_key()
    files = _model_files(det)
    manifest = _json_bytes({"format": FORMAT, "format_version": FORMAT_VERSION,
                            "files": {name: _sha256(data) for name, data in files.items()}})
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _lock(path).acquire(timeout=LOCK_TIMEOUT_S):
            version = path.parent / f".{path.name}.v-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
            version.mkdir()
            try:
                for name, data in files.items():
                    _write(version / name, data)
                if key is not None:
                    _write(version / SIGNATURE, _json_bytes(signing.sign(manifest, key)))
                _write(version / "manifest.json", manifest)      # last: its presence = complete
                _fsync_dir(version)
                previous = Path(os.path.realpath(path)) if path.exists() else None
                if path.exists() and not path.is_symlink():
                    # a real directory from an older save: move it aside (the one window
                    # without `path`; load_model recovers from it)
                    previous = path.parent / f".{path.name}.v-00000000T000000-{uuid.uuid4().hex[:8]}"
                    os.rename(path, previous)
                link = path.parent / f".{path.name}.lnk-{uuid.uuid4().hex[:8]}"
                os.symlink(version.name, link)
                os.replace(link, path)
                _fsync_dir(path.parent)
            except BaseException:
                if not (path.is_symlink() and os.readlink(path) == version.name):
                    shutil.rmtree(version, ignore_errors=True)
                raise
            keep = {version.resolve(), previous.resolve() if previous is not None else None}
            for stale in _siblings(path):
                if stale.is_symlink() or not stale.is_dir():
                    stale.unlink(missing_ok=True)       # a link of an interrupted save
                elif stale.resolve() not in keep:
                    shutil.rmtree(stale, ignore_errors=True)
    except Timeout:
        raise ModelFormatError(f"{path}: another process has been saving this model for "
                               f"{LOCK_TIMEOUT_S} s (lock {_lock(path).lock_file}); retry later") from None
    return str(path)


def _recoverable(path: Path) -> list[Path]:
    """Complete model directories beside a missing `path`, newest first (interrupted saves)."""
    found = [p for p in _siblings(path) if p.is_dir() and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: ((p / "manifest.json").stat().st_mtime_ns, p.name), reverse=True)


def model_exists(path: str | os.PathLike) -> bool:
    """A model directory is at `path`, or can be recovered beside it (see `model_root`)."""
    path = Path(path)
    return (path / "manifest.json").is_file() or (not path.exists() and bool(_recoverable(path)))


def _repair(path: Path, version: Path) -> None:
    """Point a missing `path` at `version` again, if no save is running and we may write."""
    try:
        with _lock(path).acquire(timeout=0):
            if os.path.lexists(path) and path.exists():
                return
            link = path.parent / f".{path.name}.lnk-{uuid.uuid4().hex[:8]}"
            os.symlink(version.name, link)
            os.replace(link, path)
    except (OSError, Timeout):
        pass


def model_root(path: str | os.PathLike) -> Path:
    """The directory that holds the model at `path` now (symlinks resolved once, so a concurrent
    save cannot mix two versions). A missing path with a complete version beside it (a save
    interrupted in the one unsafe window) resolves to the newest such version, with a warning.
    Raises ModelNotFoundError when there is no model.
    """
    path = Path(path)
    if (path / "manifest.json").is_file():
        return Path(os.path.realpath(path))
    if not path.exists():
        candidates = _recoverable(path)
        if candidates:
            log.warning("%s: missing after an interrupted save; loading the newest complete version "
                        "%s", path, candidates[0].name)
            _repair(path, candidates[0])
            return candidates[0]
    raise ModelNotFoundError(f"{path}: not an anomaly-vae model directory (no manifest.json)")


@contextmanager
def _parsing(file: Path) -> Iterator[None]:
    """Any error while a hash-consistent file is turned into objects -> ModelFormatError naming it."""
    try:
        yield
    except ModelFormatError as exc:
        if str(file) in str(exc):
            raise
        raise ModelFormatError(f"{file}: {exc}") from exc
    except _FORMAT_PROBLEMS as exc:
        text = " ".join(str(exc).split())
        text = text if len(text) <= 300 else text[:300] + "..."
        raise ModelFormatError(f"{file}: not a valid anomaly-vae {file.name} ({type(exc).__name__}: {text}); "
                               "written by another program or version? retrain or restore the "
                               "model") from exc


def _json(file: Path, data: bytes) -> Any:
    with _parsing(file):
        obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{file}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _read(file: Path, shown: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise ModelFormatError(f"{shown}: unreadable ({exc.strerror or exc})") from exc


def _verified_files(root: Path, shown: Path) -> dict[str, bytes]:
    """Every model file's bytes, read once from `root`, checked against the manifest (and its
    signature); messages name `shown` (the path the caller gave)."""
    manifest_raw = _read(root / "manifest.json", shown / "manifest.json")
    manifest = _json(shown / "manifest.json", manifest_raw)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{shown}: unknown model format {manifest.get('format')!r} version "
                               f"{manifest.get('format_version')!r}; expected {FORMAT!r} v{FORMAT_VERSION}")
    digests = manifest.get("files")
    if not isinstance(digests, dict) or sorted(digests) != sorted(FILES):
        listed = sorted(digests) if isinstance(digests, dict) else digests
        raise ModelFormatError(f"{shown}/manifest.json: lists {listed}, expected {sorted(FILES)}")
    _check_signature(root, shown, manifest_raw)
    blobs = {}
    for name in FILES:
        if not (root / name).is_file():
            raise ModelFormatError(f"{shown}: missing file {name}")
        blobs[name] = _read(root / name, shown / name)
        if _sha256(blobs[name]) != digests[name]:
            raise ModelFormatError(f"{shown}/{name}: sha256 does not match the manifest; the model "
                                   "was modified or corrupted; refusing to load it")
    return blobs


def _check_signature(root: Path, shown: Path, manifest_raw: bytes) -> None:
    key = signing.signing_key()
    sig_file = root / SIGNATURE
    if key is None:
        if sig_file.exists():
            log.info("%s: model is signed but no signing key is configured; signature not checked", shown)
        return
    if not sig_file.is_file():
        raise ModelFormatError(f"{shown}: model is not signed and a signing key is configured "
                               f"({signing.KEY_ENV} / {signing.KEY_FILE_ENV}); refusing to load it; "
                               "re-save it with the key if you trust it")
    with _parsing(shown / SIGNATURE):
        signature = json.loads(_read(sig_file, shown / SIGNATURE))
    problem = signing.problem(manifest_raw, signature, key)
    if problem is not None:
        raise ModelFormatError(f"{shown / SIGNATURE}: {problem}; refusing to load the model")


def load_model(path: str | os.PathLike, cls: type) -> Any:
    """A fitted `cls` (VAEAnomalyDetector, passed in so that persist stays below detector) from a
    model saved by `save_model`; every file is hash-checked (and signature-checked when a key is
    configured) and any malformed content is a ModelFormatError naming the file."""
    from .masked import build_vae
    from .train import History

    root = model_root(path)
    shown = Path(path) if Path(path).exists() else root      # a recovered version: name it
    blobs = _verified_files(root, shown)
    cfg = _json(shown / "config.json", blobs["config.json"])
    with _parsing(shown / "config.json"):
        params = dict(cfg["params"])
        for k in ("hidden", "categorical", "exclude", "id_cols"):
            if params.get(k) is not None:
                params[k] = tuple(params[k])
        det = cls(**params)
        det.config_ = Config.from_dict({**cfg["config"], "hidden": tuple(cfg["config"]["hidden"])})
        det._from_array = bool(cfg.get("from_array", False))
    with _parsing(shown / "schema.json"):
        det.schema_ = Schema.from_dict(_json(shown / "schema.json", blobs["schema.json"]))
        det.feature_names_in_ = np.asarray([c.name for c in det.schema_.features], dtype=object)
        det.n_features_in_ = len(det.feature_names_in_)
    with _parsing(shown / "preprocess.json"):
        det.preprocessor_ = Preprocessor.from_dict(_json(shown / "preprocess.json", blobs["preprocess.json"]))
        vae = build_vae(det.preprocessor_, det.config_)
    with _parsing(shown / "weights.safetensors"):
        vae.load_state_dict(load_tensors(blobs["weights.safetensors"]), strict=True)
        det.vae_ = vae.eval()
    cal = _json(shown / "calibration.json", blobs["calibration.json"])
    with _parsing(shown / "calibration.json"):
        det.threshold_ = float(cal["threshold"])
        if np.isnan(det.threshold_):
            raise ValueError("threshold is NaN")
        det.offset_ = -det.threshold_
        det.column_median_ = np.asarray(cal["column_median"], dtype=np.float64)
        det.calibration_scores_ = np.asarray(cal["scores"], dtype=np.float64)
        typical = cal.get("typical_x")             # absent in models saved before KL attribution
        det.typical_x_ = None if typical is None else np.asarray(typical, dtype=np.float32)
        det.reference_ = cal.get("reference", {})
        det.marginals_ = cal.get("marginals", {})       # older model files: sample() clips instead
        det.calibration_ = {k: v for k, v in cal.items()
                            if k not in ("column_median", "scores", "reference", "typical_x", "marginals")}
    metrics = _json(shown / "metrics.json", blobs["metrics.json"])
    with _parsing(shown / "metrics.json"):
        det.history_ = History(**metrics["history"])
        det.fit_seconds_ = float(metrics.get("fit_seconds", 0.0))
    _smoke_test(det, shown)
    return det


def _smoke_test(det: Any, root: Path) -> None:
    """Score one all-null row, so files that parse but disagree (shapes, spans, medians) fail at
    load with ModelFormatError instead of as an internal error at score time."""
    row = pd.DataFrame({c.name: pd.Series([None], dtype=object) for c in det.schema_.features})
    try:
        terms = det.score_terms(row)
        if len(terms.anomaly_score) != 1 or np.shape(terms.column_nll)[1:] != det.column_median_.shape:
            raise ValueError(f"calibration.json has {det.column_median_.size} column medians, the "
                             f"model scores {np.shape(terms.column_nll)[1:]} columns")
        if det.typical_x_ is not None and det.typical_x_.shape != (det.preprocessor_.n_dims,):
            raise ValueError(f"typical_x has shape {det.typical_x_.shape}, expected "
                             f"({det.preprocessor_.n_dims},)")
    except _FORMAT_PROBLEMS as exc:
        text = " ".join(str(exc).split())[:300]
        raise ModelFormatError(f"{root}: the model files do not fit together ({type(exc).__name__}: "
                               f"{text}); retrain or restore the model") from exc
