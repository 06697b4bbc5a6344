"""sample(): fidelity to the training marginals (stated measures) and to the model's structure."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from anomaly_vae import VAEAnomalyDetector
from anomaly_vae.demo import DEMO_EXCLUDE, make_transactions
from anomaly_vae.sample import match_quantiles

NUMERIC = ["amount", "customer_age", "customer_tenure_months", "distance_from_home_km", "txn_count_1h"]
CATEGORICAL = ["merchant_category", "channel", "country", "card_present"]
KS_MAX, TV_MAX = 0.05, 0.08       # per-column Kolmogorov-Smirnov statistic / total-variation distance


def total_variation(a: pd.Series, b: pd.Series) -> float:
    p = a.astype(str).value_counts(normalize=True)
    q = b.astype(str).value_counts(normalize=True)
    return 0.5 * float(p.sub(q, fill_value=0).abs().sum())


@pytest.fixture(scope="module")
def demo():
    df = make_transactions(6000, seed=5)
    det = VAEAnomalyDetector(label="label", exclude=DEMO_EXCLUDE, max_epochs=15, random_state=0,
                             n_threads=1).fit(df)
    normal = df[df["label"] == 0].reset_index(drop=True)
    return det, normal, det.sample(5000, seed=0)


def test_match_quantiles_maps_ranks_onto_the_marginal():
    q = np.linspace(10, 20, 11)
    v = np.array([-5.0, np.nan, 0.0, 100.0, 3.0])
    out = match_quantiles(v, q)
    assert np.isnan(out[1]) and np.all(np.diff(out[[0, 2, 4, 3]]) > 0)     # order kept
    assert out[0] == pytest.approx(11.25) and out[3] == pytest.approx(18.75)   # (rank - 0.5) / n


def test_sampled_marginals_match_training(demo):
    det, normal, synth = demo
    for col in NUMERIC:
        data, fake = normal[col].dropna().astype(float), pd.to_numeric(synth[col]).dropna().astype(float)
        assert stats.ks_2samp(data, fake).statistic < KS_MAX, col
        assert abs(synth[col].isna().mean() - normal[col].isna().mean()) < 0.05, col
    for col in ("amount", "distance_from_home_km"):           # no pile-up at the training minimum
        assert (pd.to_numeric(synth[col]) == normal[col].min()).mean() < 0.01
    for col in CATEGORICAL:
        assert total_variation(normal[col], synth[col]) < TV_MAX, col
    assert str(synth["txn_count_1h"].dtype) == "Int64"


def test_sampled_timestamps_are_timestamps_in_the_training_range(demo):
    det, normal, synth = demo
    assert "timestamp_hour" not in synth and pd.api.types.is_datetime64_any_dtype(synth["timestamp"])
    ts = synth["timestamp"].dropna()
    assert ts.min() >= normal["timestamp"].min().normalize()
    assert ts.max() < normal["timestamp"].max().normalize() + pd.Timedelta(days=1)
    assert total_variation(normal["timestamp"].dt.day_of_week, ts.dt.day_of_week) < 0.1
    assert total_variation(normal["timestamp"].dt.hour, ts.dt.hour) < 0.2


def test_samples_keep_the_models_structure(demo):
    det, normal, synth = demo
    # amount depends on the merchant category; the rank mapping keeps that dependence
    med_data = normal.groupby("merchant_category")["amount"].median()
    med_fake = synth.groupby("merchant_category")["amount"].median().reindex(med_data.index)
    assert stats.spearmanr(med_data, med_fake).statistic > 0.6      # 10 categories: p < 0.05
    online = synth["channel"] == "online"
    assert synth.loc[online, "distance_from_home_km"].isna().mean() > 0.8     # online -> no distance
    assert synth.loc[~online, "distance_from_home_km"].isna().mean() < 0.2


def test_sample_is_deterministic_and_survives_save_load(demo, tmp_path):
    det = demo[0]
    again = VAEAnomalyDetector.load(det.save(tmp_path / "m"))
    pd.testing.assert_frame_equal(det.sample(300, seed=3), again.sample(300, seed=3))


def test_models_without_stored_marginals_still_sample(demo):
    det = demo[0]
    saved, det.marginals_ = det.marginals_, {}
    try:
        old = det.sample(200, seed=1)
    finally:
        det.marginals_ = saved
    assert "timestamp_hour" in old and old["amount"].min() >= det.preprocessor_.params["amount"]["min"]
