"""MLflow pyfunc model, logged as code ("models from code"; see `tracking.log_training_run`).

MLflow copies this file into the logged model and executes it on load; it must end with
``mlflow.models.set_model(...)``. Nothing is pickled: `load_context` rebuilds the detector from
the native model directory (JSON + safetensors) stored as the artifact "model_dir".
Importing this module registers the model object with MLflow (that is the purpose of the file);
the rest of the package never imports it.
"""
from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

MODEL_DIR_ARTIFACT = "model_dir"


class AnomalyVAEPyfunc(mlflow.pyfunc.PythonModel):
    """predict(rows) -> pass-through id columns present in the input + the detector's explain table."""

    def load_context(self, context: Any) -> None:
        from anomaly_vae.fitted import FittedDetector

        self.detector = FittedDetector.load(context.artifacts[MODEL_DIR_ARTIFACT])

    # pd.DataFrame is a hint MLflow accepts without deriving a schema from it; the logged
    # signature (columns of the training data) is the contract.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        from anomaly_vae.errors import AnomalyVAEError

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        top_k = int(params["top_k"]) if params and params.get("top_k") is not None else None
        try:
            # the signature types columns as Any: the library's Schema.validate does every cast
            table = self.detector.explain(df, top_k=top_k)
        except AnomalyVAEError as exc:       # bad input: HTTP 400 with the library's message
            raise MlflowException(f"{type(exc).__name__}: {exc}", error_code=INVALID_PARAMETER_VALUE) from exc
        ids = [c for c in self.detector.schema_.ids if c in df.columns]
        if not ids:
            return table
        return pd.concat([df[ids].reset_index(drop=True), table.reset_index(drop=True)], axis=1)


mlflow.models.set_model(AnomalyVAEPyfunc())
