"""anomaly-vae: variational-autoencoder anomaly detection for mixed-type tabular data."""
__version__ = "0.1.0"

from .config import Config
from .errors import (AnomalyVAEError, ConfigError, DataError, InputTypeError, LockedError,
                     ModelFormatError, ModelNotFoundError, SchemaMismatchError)

__all__ = ["VAEAnomalyDetector", "Config", "Schema", "infer_schema", "AnomalyVAEError",
           "ConfigError", "DataError", "SchemaMismatchError", "ModelNotFoundError",
           "ModelFormatError", "InputTypeError", "LockedError", "__version__"]


def __getattr__(name: str):
    # torch and pandas are imported on first use, so `anomaly-vae --help` and `models` start fast
    if name == "VAEAnomalyDetector":
        from .detector import VAEAnomalyDetector
        return VAEAnomalyDetector
    if name in ("Schema", "infer_schema"):       # pandas, also kept out of `anomaly-vae models ...`
        from . import schema
        return getattr(schema, name)
    raise AttributeError(f"module 'anomaly_vae' has no attribute {name!r}")
