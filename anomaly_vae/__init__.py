"""anomaly-vae: variational-autoencoder anomaly detection for mixed-type tabular data."""
__version__ = "0.1.0"

from .config import Config
from .errors import (AnomalyVAEError, ConfigError, DataError, InputTypeError, LockedError,
                     ModelFormatError, ModelNotFoundError, SchemaMismatchError)
from .schema import Schema, infer_schema

__all__ = ["VAEAnomalyDetector", "Config", "Schema", "infer_schema", "AnomalyVAEError",
           "ConfigError", "DataError", "SchemaMismatchError", "ModelNotFoundError",
           "ModelFormatError", "InputTypeError", "LockedError", "__version__"]


def __getattr__(name: str):
    # torch is imported on first use of the detector, so `anomaly-vae --help` stays fast
    if name == "VAEAnomalyDetector":
        from .detector import VAEAnomalyDetector
        return VAEAnomalyDetector
    raise AttributeError(f"module 'anomaly_vae' has no attribute {name!r}")
