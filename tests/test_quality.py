"""Detection quality checks on the demo data and, when present, one real ADBench dataset."""
import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly_vae import VAEAnomalyDetector
from anomaly_vae.demo import DEMO_EXCLUDE, make_transactions


def test_demo_fraud_is_found_well_above_chance():
    """20k demo rows, time split 70/30. Measured with this seed: AUROC ~0.95, AUPRC ~0.7.

    We assert AUROC >= 0.85 and AUPRC >= 0.3 (chance is 0.5 and ~0.015): well clear of chance yet
    loose enough for small numeric differences across platforms. Fraud rows are dropped from
    training via the label column. The flag rate on held-out normals must be near the 1% target.
    """
    df = make_transactions(20_000, seed=3)
    cut = int(0.7 * len(df))
    train, test = df.iloc[:cut], df.iloc[cut:]
    det = VAEAnomalyDetector(label="label", exclude=DEMO_EXCLUDE, random_state=0, n_threads=1).fit(train)
    tab = det.explain(test.drop(columns=["label"]))
    y = test["label"].to_numpy()
    assert roc_auc_score(y, tab.anomaly_score) >= 0.85
    assert average_precision_score(y, tab.anomaly_score) >= 0.3
    assert tab.is_anomaly[y == 0].mean() <= 0.03


def test_adbench_smoke(adbench_dir):
    """One-class protocol on thyroid (small): AUROC must clearly beat chance (PyOD KNN ~0.96)."""
    df = pd.read_parquet(adbench_dir / "thyroid.parquet")
    rng = np.random.RandomState(0)
    normal = df[df.label == 0].iloc[rng.permutation((df.label == 0).sum())]
    half = len(normal) // 2
    train = normal.iloc[:half].drop(columns="label")
    test = pd.concat([normal.iloc[half:], df[df.label == 1]])
    det = VAEAnomalyDetector(random_state=0, n_threads=1).fit(train)
    auc = roc_auc_score(test.label, det.anomaly_score(test.drop(columns="label")))
    assert auc >= 0.85, auc
