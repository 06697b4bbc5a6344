"""The same thing has the same name and number in every command: --label defaults, 1-based
epochs (summary = MLflow metric = history steps), one fit time."""
from __future__ import annotations

import re

import pytest

from anomaly_vae.demo import make_transactions

from conftest import DEMO_EXCLUDE_ARGS as EXCLUDE, cli_run as run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency")
    df = make_transactions(1500, seed=11)
    df.iloc[:1100].to_parquet(root / "train.parquet", index=False)
    df.iloc[1100:].to_parquet(root / "holdout.parquet", index=False)
    df.iloc[1100:].rename(columns={"label": "is_fraud"}).to_parquet(root / "renamed.parquet", index=False)
    return root


def test_evaluate_label_defaults_to_the_models(data, tmp_path):
    run("-q", "train", data / "train.parquet", "--label", "label", *EXCLUDE, "--epochs", "2", "--no-mlflow",
        "-o", tmp_path / "labelled")
    implicit = run("evaluate", "-m", tmp_path / "labelled", data / "holdout.parquet", "--no-mlflow").stdout
    explicit = run("evaluate", "-m", tmp_path / "labelled", data / "holdout.parquet", "--label", "label",
                   "--no-mlflow").stdout
    assert "AUROC:" in implicit and implicit == explicit
    # another column name in the data: --label names it; without, the model's 'label' is missing
    assert "AUROC:" in run("evaluate", "-m", tmp_path / "labelled", data / "renamed.parquet", "--label",
                           "is_fraud", "--no-mlflow").stdout
    r = run("evaluate", "-m", tmp_path / "labelled", data / "renamed.parquet", "--no-mlflow", ok=False)
    assert r.exit_code == 2 and "label column 'label' not found" in r.stderr and "renamed.parquet" in r.stderr
    # a model trained without --label (train has no default): evaluate asks for one
    run("-q", "train", data / "train.parquet", "--exclude", "label", *EXCLUDE, "--epochs", "2", "--no-mlflow",
        "-o", tmp_path / "unsupervised")
    r = run("evaluate", "-m", tmp_path / "unsupervised", data / "holdout.parquet", "--no-mlflow", ok=False)
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [f"Error: {tmp_path / 'unsupervised'} was trained without a label "
                                             "column; name the label column of the data with --label COL"]


def test_epochs_are_one_based_everywhere(data, tmp_path, new_mlflow_store):
    from mlflow.tracking import MlflowClient

    uri = new_mlflow_store(tmp_path)
    out = run("--tracking-uri", uri, "train", data / "train.parquet", "--label", "label", *EXCLUDE,
              "--epochs", "6", "-o", tmp_path / "m").stdout
    n_epochs, best = map(int, re.search(r"epochs:\s+(\d+) \(best (\d+)", out).groups())
    fit_times = re.findall(r"fit ([\d.]+) s", out)
    assert len(fit_times) == 1                                       # one fit time in the summary
    run_id = re.search(r"mlflow run: (\w+)", out).group(1)
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["best_epoch"] == best and metrics["epochs"] == n_epochs
    assert f"{metrics['fit_seconds']:.1f}" == fit_times[0]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val_loss"))
    assert steps == list(range(1, n_epochs + 1))
    at_best = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}[best]
    assert at_best == pytest.approx(metrics["best_val_loss"])       # step `best` is the best epoch
