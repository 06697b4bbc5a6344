"""Optional model signing: HMAC-SHA256 of a model's manifest.json with a shared secret key.

The key comes from ``ANOMALY_VAE_SIGNING_KEY`` (the key itself, as text) or
``ANOMALY_VAE_SIGNING_KEY_FILE`` (a file holding it; one trailing newline is ignored). When a key
is configured, `persist.save_model` writes ``signature.json`` and `persist.load_model` refuses
models whose signature is missing or does not match. The manifest lists the sha256 of every
model file, so signing it covers them all. The key is never logged nor written anywhere.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from .errors import ConfigError

KEY_ENV = "ANOMALY_VAE_SIGNING_KEY"
KEY_FILE_ENV = "ANOMALY_VAE_SIGNING_KEY_FILE"
ALGORITHM = "hmac-sha256"
MIN_KEY_BYTES = 16


def signing_key() -> bytes | None:
    """The configured key, or None when neither environment variable is set.

    Raises ConfigError (without the key's value) when both are set, the file cannot be read,
    or the key is shorter than 16 bytes.
    """
    text, file = os.environ.get(KEY_ENV), os.environ.get(KEY_FILE_ENV)
    if text and file:
        raise ConfigError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; set only one")
    if file:
        try:
            key = Path(file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{KEY_FILE_ENV}={file}: cannot read the signing key file "
                              f"({exc.strerror or exc})") from None
        key = key[:-1] if key.endswith(b"\n") else key
        origin = f"{KEY_FILE_ENV}={file}"
    elif text:
        key, origin = text.encode(), KEY_ENV
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{origin}: the signing key is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
                          "random bytes, e.g. the output of `openssl rand -hex 32`")
    return key


def key_id(key: bytes) -> str:
    """A short public fingerprint of the key (an HMAC of a constant, not a hash of the key)."""
    return hmac.new(key, b"anomaly-vae key id", hashlib.sha256).hexdigest()[:12]


def sign(manifest: bytes, key: bytes) -> dict[str, str]:
    """The signature.json content for the exact bytes of manifest.json."""
    return {"algorithm": ALGORITHM, "key_id": key_id(key),
            "hmac": hmac.new(key, manifest, hashlib.sha256).hexdigest()}


def problem(manifest: bytes, signature: object, key: bytes) -> str | None:
    """None when `signature` (parsed signature.json) is valid for `manifest`, else what is wrong."""
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        return f"unknown signature format (expected algorithm {ALGORITHM!r})"
    expected = hmac.new(key, manifest, hashlib.sha256).hexdigest()
    if hmac.compare_digest(expected, str(signature.get("hmac", ""))):
        return None
    if signature.get("key_id") != key_id(key):
        return (f"signed with another key (key id {signature.get('key_id')!r}, the configured key "
                f"has id {key_id(key)!r})")
    return "the signature does not match manifest.json: the model was modified after signing"
