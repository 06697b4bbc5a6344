"""tracking.py + plots.py against a real MLflow SQLite store and file artifacts in a tmp dir."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from anomaly_vae import ModelNotFoundError
from anomaly_vae import plots
from anomaly_vae import tracking as T
from anomaly_vae.demo import DEMO_EXCLUDE
from anomaly_vae.store import resolve_tracking_uri
from conftest import log_demo_model

HISTORY_KEYS = ("loss", "recon_nll", "kl", "beta", "val_loss", "active_units")
NAME = "payments-test"


@pytest.fixture(scope="module")
def logged(tmp_path_factory, new_mlflow_store):
    """Train a tiny detector, log it (with eval data), register twice, set aliases."""
    root = tmp_path_factory.mktemp("tracking")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        uri, det, train, test, run = log_demo_model(
            new_mlflow_store(root), n_rows=1500, n_train=1100, seed=1, name=NAME, dataset_name="demo-train",
            dataset_source=str(root / "train.parquet"), label="label", run_name="unit",
            tags={"purpose": "test"}, evaluate=True)
        v2 = T.register(run.run_id, NAME)
        T.set_alias(NAME, run.version, "champion")
        T.set_alias(NAME, v2, "challenger")
        yield SimpleNamespace(uri=uri, root=root, det=det, train=train, test=test, run=run, v2=v2)
    finally:
        os.chdir(cwd)


@pytest.fixture
def store(logged):
    """Re-point MLflow at the module's store (a test may have called configure elsewhere)."""
    T.configure(logged.uri)
    return logged


# ------------------------------------------------------------------ configure
@pytest.fixture
def restore_uri():
    with T.preserve_configuration():
        yield


def test_configure_precedence(tmp_path, monkeypatch, restore_uri):
    """--tracking-uri > MLFLOW_TRACKING_URI > ANOMALY_VAE_HOME > XDG data dir; never the cwd."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "ANOMALY_VAE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    uri = T.configure()
    assert uri == f"sqlite:///{tmp_path.resolve()}/home/.local/share/anomaly-vae/mlruns/mlflow.db"
    assert not (tmp_path / "mlruns").exists()                            # not the working directory
    assert (tmp_path / "home/.local/share/anomaly-vae/mlruns").is_dir()
    assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert T.configure() == f"sqlite:///{tmp_path.resolve()}/xdg/anomaly-vae/mlruns/mlflow.db"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/xdg")                  # ignored, as the XDG spec says
    assert T.configure() == uri
    monkeypatch.setenv("ANOMALY_VAE_HOME", str(tmp_path / "project"))
    assert T.configure() == f"sqlite:///{tmp_path.resolve()}/project/mlruns/mlflow.db"
    assert resolve_tracking_uri()[1] == "ANOMALY_VAE_HOME"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///envstore/x.db")
    assert T.configure() == f"sqlite:///{tmp_path.resolve()}/envstore/x.db"
    assert T.configure(f"sqlite:///{tmp_path}/explicit.db") == f"sqlite:///{tmp_path}/explicit.db"
    # MLflow writes MLFLOW_TRACKING_URI itself; that is not the user's choice for the next default
    assert T.configure() == f"sqlite:///{tmp_path.resolve()}/envstore/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    T.configure(f"sqlite:///{tmp_path}/explicit.db")
    assert T.configure() == f"sqlite:///{tmp_path.resolve()}/project/mlruns/mlflow.db"
    assert resolve_tracking_uri("sqlite:///rel.db") == (f"sqlite:///{tmp_path.resolve()}/rel.db", "--tracking-uri")
    assert T.artifact_location(f"sqlite:///{tmp_path}/m/mlflow.db", "my exp") == \
        (tmp_path / "m" / "artifacts" / "my_exp").as_uri()
    assert T.artifact_location("http://127.0.0.1:5000", "x") is None


# ------------------------------------------------------------- the logged run
def test_run_params_metrics_and_tags(store):
    client = MlflowClient()
    run = client.get_run(store.run.run_id)
    p = run.data.params
    assert p["max_epochs"] == "3" and p["random_state"] == "0"
    assert p["config.latent_dim"] == str(store.det.config_.latent_dim)
    assert json.loads(p["config.hidden"]) == list(store.det.config_.hidden)
    assert json.loads(p["exclude"]) == list(DEMO_EXCLUDE)
    assert run.data.tags["purpose"] == "test" and run.data.tags["anomaly_vae.run_type"] == "training"
    n_epochs = len(store.det.history_.loss)
    for key in HISTORY_KEYS:
        hist = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(1, n_epochs + 1)), key
        assert sorted(hist, key=lambda m: m.step)[-1].value == pytest.approx(getattr(store.det.history_, key)[-1])
    m = run.data.metrics
    assert m["best_epoch"] == store.det.history_.best_epoch + 1          # 1-based, as the train summary
    assert m["threshold"] == pytest.approx(store.det.threshold_)
    assert m["calibration_flag_rate"] == pytest.approx(store.det.calibration_["calibration_flag_rate"])
    for key in ("auroc", "auprc", "fpr_at_threshold", "recall"):
        assert key in m and key in store.run.metrics
    y = store.test["label"].to_numpy() == 1
    flagged = store.det.explain(store.test.drop(columns=["label"]))["is_anomaly"].to_numpy()
    assert m["recall"] == pytest.approx(flagged[y].mean())
    assert m["fpr_at_threshold"] == pytest.approx(flagged[~y].mean())


def test_run_artifacts_and_model_files(store):
    client = MlflowClient()
    rid = store.run.run_id
    top = {a.path for a in client.list_artifacts(rid)}
    assert {"schema.json", "calibration.json", "plots"} <= top
    pngs = {a.path for a in client.list_artifacts(rid, "plots")}
    assert pngs == {"plots/loss_curves.png", "plots/score_histogram_evaluation.png", "plots/column_error.png"}
    local = Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="plots",
                                                     dst_path=str(store.root / "dl")))
    for png in local.iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    schema = json.loads((Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="schema.json",
                                                                   dst_path=str(store.root / "dl")))).read_text())
    assert schema == store.det.schema_.to_dict()
    # the pyfunc model: code file + native dir; artifacts live under mlruns/artifacts/<experiment>
    model_dir = Path(mlflow.artifacts.download_artifacts(store.run.model_uri, dst_path=str(store.root / "m")))
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert "MLmodel" in files and "mlflow_model.py" in {Path(f).name for f in files}
    assert "artifacts/anomaly_vae_model/weights.safetensors" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert (store.root / "mlruns" / "artifacts" / "anomaly-vae").is_dir()
    assert "torch==" in (model_dir / "requirements.txt").read_text()
    assert "code/anomaly_vae/persist.py" in files


def test_dataset_inputs(store):
    run = MlflowClient().get_run(store.run.run_id)
    by_context = {}
    for di in run.inputs.dataset_inputs:
        ctx = {t.key: t.value for t in di.tags}.get("mlflow.data.context")
        by_context[ctx] = di.dataset
    train = by_context["training"]
    assert train.name == "demo-train" and len(train.digest) >= 8
    assert "train.parquet" in train.source
    assert "amount" in train.schema and train.profile
    assert by_context["evaluation"].name == "demo-train-eval"


# ------------------------------------------------------------------- registry
def test_list_versions_and_aliases(store):
    versions = T.list_versions(NAME)
    assert [v["version"] for v in versions] == [store.run.version, store.v2] == [1, 2]
    assert versions[0]["aliases"] == ["champion"] and versions[1]["aliases"] == ["challenger"]
    assert all(v["run_id"] == store.run.run_id for v in versions)
    assert versions[0]["metrics"]["threshold"] == pytest.approx(store.det.threshold_)
    assert versions[0]["created"].endswith("+00:00")
    assert T.get_alias_version(NAME, "champion") == 1
    assert T.get_alias_version(NAME, "nope") is None
    assert T.get_alias_version("no-such-model", "champion") is None
    T.set_alias(NAME, 2, "champion")                # moving an alias
    try:
        assert T.get_alias_version(NAME, "champion") == 2
        assert T.list_versions(NAME)[1]["aliases"] == ["challenger", "champion"]
    finally:
        T.set_alias(NAME, 1, "champion")
    with pytest.raises(ModelNotFoundError, match=re.escape(f"registered model 'nope' not found in store "
                                                           f"{store.uri}; registered models: {NAME}")):
        T.list_versions("nope")
    with pytest.raises(ModelNotFoundError, match=re.escape(f"version 99 not found in store {store.uri}")):
        T.set_alias(NAME, 99, "champion")


@pytest.mark.parametrize("uri_kind", ["alias", "version", "run", "logged", "local"])
def test_load_detector_gives_identical_scores(store, uri_kind):
    uri = {"alias": f"models:/{NAME}@champion", "version": f"models:/{NAME}/2",
           "run": store.run.model_uri, "logged": None, "local": None}[uri_kind]
    if uri_kind == "local":
        uri = store.det.save(store.root / "native")
    if uri_kind == "logged":          # MLflow 3's models:/<model_id>, as the UI shows it
        uri = MlflowClient().get_model_version(NAME, "1").source
        assert uri.startswith("models:/m-")
    det, info = T.load_detector(uri)
    X = store.test.drop(columns=["label"])
    np.testing.assert_array_equal(det.anomaly_score(X), store.det.anomaly_score(X))
    assert det.threshold_ == store.det.threshold_
    assert info["uri"] == str(uri)
    expected = {"alias": (NAME, 1, store.run.run_id), "version": (NAME, 2, store.run.run_id),
                "run": (None, None, store.run.run_id), "logged": (None, None, store.run.run_id),
                "local": (None, None, None)}[uri_kind]
    assert (info["name"], info["version"], info["run_id"]) == expected


@pytest.mark.parametrize("uri, message", [
    (f"models:/{NAME}@nope", "has no alias '@nope' in store {store}; versions: v1 @champion, v2 @challenger"),
    (f"models:/{NAME}/7", "has no version 7 in store {store}; versions: v1"),
    ("models:/unknown-model@champion", f"registered model 'unknown-model' not found in store {{store}}; "
                                       f"registered models: {NAME}"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "run '0123456789abcdef0123456789abcdef' not found "
                                                     "in store {store}"),
    ("models:/m-0123456789abcdef", "logged model 'm-0123456789abcdef' not found in store {store}"),
    ("no/such/dir", "no such model directory"),
    ("s3x:/weird", "expected a model directory, runs:/"),
])
def test_load_detector_not_found(store, uri, message):
    """Every "not found" names the store that was searched."""
    with pytest.raises(ModelNotFoundError, match=re.escape(message.format(store=store.uri))):
        T.load_detector(uri)


def test_log_evaluation(store):
    r = T.log_evaluation(store.det, store.test, label="label", model_uri=f"models:/{NAME}@champion",
                         dataset_name="demo-holdout")
    run = MlflowClient().get_run(r["run_id"])
    assert run.data.tags["model_uri"] == f"models:/{NAME}@champion"
    assert run.data.tags["anomaly_vae.run_type"] == "evaluation"
    assert run.data.metrics["auroc"] == pytest.approx(r["auroc"])
    assert run.data.metrics["fpr_at_threshold"] == pytest.approx(r["fpr"])
    assert {a.path for a in MlflowClient().list_artifacts(r["run_id"], "plots")} == \
        {"plots/score_histogram_evaluation.png"}
    assert run.inputs.dataset_inputs[0].dataset.name == "demo-holdout"


# ---------------------------------------------------------------------- plots
def test_plots_return_figures(logged, tmp_path):
    det, test = logged.det, logged.test
    X, y = test.drop(columns=["label"]), test["label"].to_numpy() == 1
    figs = [plots.loss_curves(det.history_), plots.loss_curves(det.history_.to_dict()),
            plots.score_histogram(det.anomaly_score(X), y, det.threshold_),
            plots.score_histogram(np.r_[det.anomaly_score(X), np.inf]),
            plots.column_error(det, X, y=y)]
    for i, fig in enumerate(figs):
        assert isinstance(fig, Figure)
        fig.savefig(tmp_path / f"{i}.png")
        assert (tmp_path / f"{i}.png").stat().st_size > 5000


def test_column_error_recognises_contributions(logged):
    det, X = logged.det, logged.test.drop(columns=["label"])
    contrib = det.contributions(X)

    def bars(fig):
        return sorted((t.get_text(), round(p.get_width(), 9))
                      for t, p in zip(fig.axes[0].get_yticklabels(), fig.axes[0].patches))

    from_raw = bars(plots.column_error(det, X))
    assert from_raw == bars(plots.column_error(det, contrib))          # auto-detected
    assert from_raw == bars(plots.column_error(det, contrib.to_numpy()))
    means = contrib.mean()
    assert dict(from_raw) == pytest.approx({k: round(v, 9) for k, v in means.items()})


def test_runs_nest_under_an_active_run(store):
    with mlflow.start_run(experiment_id=MlflowClient().get_experiment_by_name("anomaly-vae").experiment_id,
                          run_name="pipeline") as parent:
        r = T.log_evaluation(store.det, store.test, label="label")
    child = MlflowClient().get_run(r["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "model_uri" not in child.data.tags


def test_log_evaluation_requires_labels(store):
    with pytest.raises(Exception, match="label column 'label' not found"):
        T.log_evaluation(store.det, store.test.drop(columns=["label"]))


def test_log_run_summary(store):
    rid = T.log_run("retrain-decision", params={"promote": True, "gates": ["auroc", "fpr"]},
                    metrics={"candidate_auroc": 0.9, "champion_auroc": None}, tags={"decision": "promote"},
                    json_artifacts={"decision.json": {"promote": True, "reasons": []}})
    run = MlflowClient().get_run(rid)
    assert run.data.params == {"promote": "True", "gates": '["auroc", "fpr"]'}
    assert run.data.metrics == {"candidate_auroc": 0.9}
    assert run.data.tags["decision"] == "promote"
    assert [a.path for a in MlflowClient().list_artifacts(rid)] == ["decision.json"]


def test_posterior_collapse_tag(store):
    from anomaly_vae import VAEAnomalyDetector
    tags = MlflowClient().get_run(store.run.run_id).data.tags
    # the 3-epoch fixture model may itself count as collapsed; the tag follows its history
    assert tags["anomaly_vae.posterior_collapse"] == ("true" if store.det.history_.posterior_collapse else "false")
    det = VAEAnomalyDetector(label="label", exclude=DEMO_EXCLUDE, beta=200.0, max_epochs=6,
                             random_state=0, n_threads=1).fit(store.train)
    assert det.history_.posterior_collapse
    run = T.log_training_run(det, store.train, dataset_name="demo-train", label="label",
                             experiment="collapse-test")
    tags = MlflowClient().get_run(run.run_id).data.tags
    assert tags["anomaly_vae.posterior_collapse"] == "true"
    assert tags["anomaly_vae.posterior_collapse_reason"] == det.history_.posterior_collapse
