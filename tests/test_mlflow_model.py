"""mlflow_model.py: the pyfunc (models from code) loaded back through the registry predicts
exactly what the detector's explain() returns."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from anomaly_vae import tracking as T
from conftest import log_demo_model

NAME = "pyfunc-test"
SCORE_COLS = ["anomaly_score", "recon_nll", "kl", "p_value", "is_anomaly", "top_features", "explanation"]


@pytest.fixture(scope="module")
def champion(tmp_path_factory, new_mlflow_store):
    root = tmp_path_factory.mktemp("pyfunc")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        uri, det, _, test, run = log_demo_model(new_mlflow_store(root), n_rows=1200, n_train=900, seed=2,
                                                name=NAME, dataset_name="pyfunc-train")
        T.set_alias(NAME, run.version, "champion")
        yield SimpleNamespace(uri=uri, root=root, det=det, test=test, run=run)
    finally:
        os.chdir(cwd)


@pytest.fixture
def model(champion):
    T.configure(champion.uri)
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def test_predict_equals_explain(champion, model):
    df = champion.test                     # includes label / customer_id / fraud_type: ignored
    out = model.predict(df)
    expected = champion.det.explain(df.drop(columns=["label"]))
    assert list(out.columns) == ["transaction_id"] + SCORE_COLS
    assert out["transaction_id"].tolist() == df["transaction_id"].tolist()
    np.testing.assert_allclose(out["anomaly_score"], expected["anomaly_score"], rtol=1e-9)
    np.testing.assert_allclose(out["p_value"], expected["p_value"], rtol=1e-12)
    assert out["is_anomaly"].tolist() == expected["is_anomaly"].tolist()
    assert out["top_features"].tolist() == expected["top_features"].tolist()


def test_predict_nulls_unseen_categories_and_no_ids(champion, model):
    df = champion.test.head(20).drop(columns=["label", "transaction_id"]).copy()
    df.loc[:4, "amount"] = np.nan
    df.loc[5:9, "merchant_category"] = "space_travel"        # never seen in training
    df.loc[10:12, "customer_age"] = np.nan
    out = model.predict(df)
    assert list(out.columns) == SCORE_COLS                   # id column is optional
    expected = champion.det.explain(df)
    np.testing.assert_allclose(out["anomaly_score"], expected["anomaly_score"], rtol=1e-9)
    assert np.isfinite(out["anomaly_score"]).all()


def test_predict_params_top_k(champion, model):
    df = champion.test.head(30)
    one = model.predict(df, params={"top_k": 1})["top_features"]
    assert all(s.count(":") <= 1 for s in one) and any(s for s in one)
    three = model.predict(df)["top_features"]
    assert sum(s.count(":") for s in three) > sum(s.count(":") for s in one)


def test_predict_casts_like_the_library(champion, model):
    rows = champion.test.head(6).drop(columns=["label"]).reset_index(drop=True)
    rows["card_present"] = pd.Series(["no", "false", "0", True, "yes", None], dtype=object)
    rows["txn_count_1h"] = [1.5, 2.7, 9.9, np.nan, 3.0, 0.0]
    out = model.predict(rows)
    np.testing.assert_allclose(out["anomaly_score"], champion.det.anomaly_score(rows), rtol=1e-9)
    rows.loc[0, "card_present"] = "maybe"
    with pytest.raises(Exception, match="SchemaMismatchError.*card_present"):
        model.predict(rows)


def test_missing_feature_column_is_rejected(champion, model):
    with pytest.raises(Exception, match="amount"):
        model.predict(champion.test.head(5).drop(columns=["amount"]))


def test_logged_model_metadata(champion, model):
    meta = model.metadata
    sig = meta.get_input_schema()
    det = champion.det
    cols = {c.name: c for c in sig.inputs}
    assert list(cols) == [c.name for c in det.schema_.columns]
    assert cols["transaction_id"].required is False and cols["amount"].required is True
    # typed Any: MLflow passes values through and the model's Schema.validate casts them
    assert {type(c.type).__name__ for c in cols.values()} == {"AnyType"}
    assert [c.name for c in meta.get_output_schema().inputs] == ["transaction_id"] + SCORE_COLS
    assert meta.get_params_schema().to_dict()[0]["name"] == "top_k"
    assert meta.saved_input_example_info is not None
    flavor = meta.flavors["python_function"]
    assert flavor.get("model_code_path", "").endswith("mlflow_model.py")
    assert "python_model" not in flavor                       # nothing cloudpickled
    assert set(flavor["artifacts"]) == {"model_dir"}
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion",
                                                     dst_path=str(champion.root / "dl")))
    example = Model.load(str(local)).load_input_example(str(local))
    assert len(example) == 5 and "label" not in example.columns
    reqs = (local / "requirements.txt").read_text().split()
    assert f"mlflow=={mlflow.__version__}" in reqs and any(r.startswith("torch==") for r in reqs)
    assert not [r for r in reqs if r.startswith("anomaly-vae")]        # not on PyPI: shipped as code
    assert (local / "code" / "anomaly_vae" / "detector.py").is_file()


def test_run_without_eval_df_plots_training_scores(champion):
    pngs = {a.path for a in MlflowClient().list_artifacts(champion.run.run_id, "plots")}
    assert pngs == {"plots/loss_curves.png", "plots/score_histogram_training.png", "plots/column_error.png"}
    assert "auroc" not in champion.run.metrics and champion.run.version == 1
