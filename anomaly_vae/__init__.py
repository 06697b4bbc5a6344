"""anomaly-vae: variational-autoencoder anomaly detection for mixed-type tabular data."""
__version__ = "0.1.0"

from .config import Config
from .detector import VAEAnomalyDetector
from .errors import (AnomalyVAEError, ConfigError, DataError, ModelFormatError,
                     ModelNotFoundError, SchemaMismatchError)
from .schema import Schema, infer_schema

__all__ = ["VAEAnomalyDetector", "Config", "Schema", "infer_schema", "AnomalyVAEError",
           "ConfigError", "DataError", "SchemaMismatchError", "ModelNotFoundError",
           "ModelFormatError", "__version__"]
