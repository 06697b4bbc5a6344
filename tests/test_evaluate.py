"""evaluate.py: metrics on constructed cases, and on a tiny real detector."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from anomaly_vae import DataError, VAEAnomalyDetector
from anomaly_vae.demo import DEMO_EXCLUDE, make_transactions
from anomaly_vae.evaluate import evaluate, evaluate_scores, labels_from

KEYS = {"auroc", "auprc", "fpr", "recall", "n", "n_anomalies", "flagged"}


def test_perfect_separation():
    y = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.5, 0.2, 0.3, 5.0, 4.0])
    flags = scores > 1.0
    r = evaluate_scores(y, scores, flags)
    assert KEYS <= set(r)
    assert r["auroc"] == 1.0 and r["auprc"] == 1.0
    assert r["fpr"] == 0.0 and r["recall"] == 1.0
    assert (r["n"], r["n_anomalies"], r["flagged"]) == (6, 2, 2)


def test_reversed_scores_and_partial_flags():
    y = np.array([1, 1, 0, 0, 0, 0])
    scores = np.array([0.0, 0.1, 1.0, 2.0, 3.0, 4.0])      # anomalies score lowest
    flags = np.array([True, False, False, False, False, True])
    r = evaluate_scores(y, scores, flags)
    assert r["auroc"] == 0.0
    assert r["fpr"] == pytest.approx(1 / 4) and r["recall"] == pytest.approx(1 / 2)
    assert r["flagged"] == 2 and r["flag_rate"] == pytest.approx(2 / 6)


def test_ties_give_half_auroc():
    r = evaluate_scores([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0], [False] * 4)
    assert r["auroc"] == pytest.approx(0.5)


def test_one_class_normals_only():
    r = evaluate_scores(np.zeros(5), np.arange(5.0), np.array([0, 0, 0, 1, 1], bool))
    assert r["auroc"] is None and r["auprc"] is None and r["recall"] is None
    assert r["fpr"] == pytest.approx(0.4) and r["n_anomalies"] == 0


def test_one_class_anomalies_only():
    r = evaluate_scores(np.ones(3), np.arange(3.0), np.array([1, 1, 0], bool))
    assert r["auroc"] is None and r["fpr"] is None
    assert r["recall"] == pytest.approx(2 / 3)


def test_non_finite_scores_rank_as_most_anomalous():
    r = evaluate_scores([0, 0, 1, 1], [1.0, 2.0, np.inf, np.nan], [False, False, True, False])
    assert r["auroc"] == 1.0


def test_length_mismatch_and_empty():
    with pytest.raises(DataError, match="lengths differ"):
        evaluate_scores([0, 1], [1.0], [True])
    with pytest.raises(DataError, match="no rows"):
        evaluate_scores([], [], [])


def test_labels_from_variants():
    df = pd.DataFrame({"a": [0, 1, 1, 0], "b": ["0", "1", "true", "no"], "c": [False, True, True, False]})
    assert labels_from(df, "a").tolist() == [False, True, True, False]
    assert labels_from(df, "b").tolist() == [False, True, True, False]
    assert labels_from(df, "c").tolist() == [False, True, True, False]
    with pytest.raises(DataError, match="label column 'nope' not found"):
        labels_from(df, "nope")
    with pytest.raises(DataError, match="label column 'x'.*missing"):
        labels_from(pd.DataFrame({"x": [0, None]}), "x")


def test_labels_that_are_not_binary_are_refused():
    df = pd.DataFrame({"kind": ["none", "amount_spike", "none"], "id": [0, 1, 7], "sk": [1, -1, 1]})
    with pytest.raises(DataError, match=r"label column 'kind'.*3 of 3.*\['none', 'amount_spike'\]"):
        labels_from(df, "kind")
    with pytest.raises(DataError, match=r"label column 'id'.*1 of 3.*\['7'\]"):
        labels_from(df, "id")
    with pytest.raises(DataError, match="sklearn's outlier convention is not accepted: map -1 to 1 and its 1 = inlier"):
        labels_from(df, "sk")


@pytest.fixture(scope="module")
def demo():
    df = make_transactions(1500, fraud_rate=0.03, seed=3)
    det = VAEAnomalyDetector(max_epochs=3, random_state=0, n_threads=1, label="label",
                             exclude=DEMO_EXCLUDE).fit(df.iloc[:1000])
    return det, df.iloc[1000:].reset_index(drop=True)


def test_evaluate_matches_detector(demo):
    det, test = demo
    r = evaluate(det, test, label="label")
    y = test["label"].to_numpy() == 1
    expl = det.explain(test.drop(columns=["label"]))
    assert r["n"] == len(test) and r["n_anomalies"] == int(y.sum()) > 0
    assert r["flagged"] == int(expl["is_anomaly"].sum())
    assert r["recall"] == pytest.approx(expl["is_anomaly"][y].mean())
    assert r["fpr"] == pytest.approx(expl["is_anomaly"][~y].mean())
    assert r["threshold"] == pytest.approx(det.threshold_)
    assert 0.5 < r["auroc"] <= 1.0            # demo fraud is detectable even after 3 epochs


def test_evaluate_unlabelled_and_missing_label(demo):
    det, test = demo
    r = evaluate(det, test.drop(columns=["label"]), label=None)
    assert r["auroc"] is None and r["n_anomalies"] == 0 and r["fpr"] is not None
    with pytest.raises(DataError, match="label column 'is_fraud' not found"):
        evaluate(det, test, label="is_fraud")
