"""One family of errors: everything raised on purpose derives from AnomalyVAEError."""
from __future__ import annotations


class AnomalyVAEError(Exception):
    """Base class for errors the package raises on purpose (bad input, bad config)."""


class ConfigError(AnomalyVAEError, ValueError):
    """A hyperparameter or option is out of range or unknown."""


class SchemaMismatchError(AnomalyVAEError, ValueError):
    """Data to score does not match the schema the model was trained on."""


class DataError(AnomalyVAEError, ValueError):
    """Input data is unusable: empty table, all-null column, unreadable file."""


class InputTypeError(DataError, TypeError):
    """The data given is of a type that cannot be used (None, a dict, a Series, an array of
    objects that are not numbers); a TypeError too, as scikit-learn expects."""


class ModelNotFoundError(AnomalyVAEError, LookupError):
    """A model directory or registry URI does not exist."""


class ModelFormatError(AnomalyVAEError, ValueError):
    """A saved model is corrupt, tampered with, or of an unknown format version."""


class LockedError(AnomalyVAEError):
    """Another run holds the lock (another `score` into the same output directory, another
    `retrain` of the same model); the CLI exits 3."""
