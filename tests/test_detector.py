
import numpy as np
import pandas as pd
import pytest

from anomaly_vae import (DataError, SchemaMismatchError,
                         VAEAnomalyDetector)
from conftest import FAST, mixed_frame


def test_fit_returns_self_and_sets_fitted_state(frame):
    det = VAEAnomalyDetector(**FAST)
    assert det.fit(frame) is det
    for attr in ("schema_", "preprocessor_", "vae_", "threshold_", "offset_", "history_", "config_"):
        assert hasattr(det, attr)
    assert det.n_features_in_ == 6 and "row_id" not in det.feature_names_in_


def test_sklearn_sign_conventions(fitted, frame):
    s = fitted.anomaly_score(frame)
    np.testing.assert_allclose(fitted.score_samples(frame), -s)
    np.testing.assert_allclose(fitted.decision_function(frame), fitted.threshold_ - s)
    pred = fitted.predict(frame)
    assert set(np.unique(pred)) <= {-1, 1}
    np.testing.assert_array_equal(pred == -1, s > fitted.threshold_)


def test_explain_table_contributions_sum_to_score(fitted, frame):
    tab = fitted.explain(frame.head(50))
    assert list(tab.columns) == ["anomaly_score", "recon_nll", "kl", "p_value", "is_anomaly", "top_features",
                                 "explanation"]
    np.testing.assert_allclose(tab.recon_nll + tab.kl, tab.anomaly_score, rtol=1e-6)
    contrib = fitted.contributions(frame.head(50))
    np.testing.assert_allclose(contrib.sum(axis=1) + fitted.column_median_.sum() + tab.kl, tab.anomaly_score,
                               rtol=1e-5)
    assert ((tab.p_value > 0) & (tab.p_value <= 1)).all()


def test_explain_points_at_the_broken_column(fitted, frame):
    odd = frame.head(5).copy()
    odd["amount"] = odd["amount"] * 50
    tab = fitted.explain(odd)
    assert tab.is_anomaly.all()
    assert all(t.startswith("amount:") for t in tab.top_features)
    assert (fitted.anomaly_score(odd) > fitted.anomaly_score(frame.head(5))).all()


def test_missing_column_error_names_it(fitted, frame):
    with pytest.raises(SchemaMismatchError, match="'cat'"):
        fitted.anomaly_score(frame.drop(columns=["cat"]))


def test_unseen_category_and_nan_do_not_crash(fitted, frame):
    df = frame.head(4).copy()
    df["cat"] = ["never-seen", None, "a", "b"]
    df["amount"] = [np.nan, 1.0, 2.0, 3.0]
    assert np.isfinite(fitted.anomaly_score(df)).all()


def test_label_rows_are_excluded_from_training(frame):
    df = frame.assign(label=0)
    df.loc[:99, "label"] = 1
    det = VAEAnomalyDetector(label="label", **FAST).fit(df)
    n_used = det.calibration_["n_calibration"]
    assert n_used == round(0.15 * (len(frame) - 100))
    assert "label" not in det.feature_names_in_


def test_false_alarm_rate_on_new_normals_is_near_target():
    train, fresh = mixed_frame(4000, seed=1), mixed_frame(6000, seed=2)
    det = VAEAnomalyDetector(target_fpr=0.05, **FAST).fit(train)
    rate = np.mean(det.predict(fresh) == -1)
    # conformal guarantee on exchangeable normals; 600 calibration rows -> sd of the rate ~0.009
    assert 0.02 <= rate <= 0.09, rate


def test_contamination_mode_flags_that_fraction_of_training(frame):
    det = VAEAnomalyDetector(contamination=0.1, **FAST).fit(frame)
    assert det.calibration_["method"] == "contamination"
    assert np.mean(det.predict(frame) == -1) == pytest.approx(0.1, abs=0.01)


def test_same_seed_same_scores_different_seed_different(frame):
    a = VAEAnomalyDetector(**FAST).fit(frame).anomaly_score(frame)
    b = VAEAnomalyDetector(**FAST).fit(frame).anomaly_score(frame)
    c = VAEAnomalyDetector(**{**FAST, "random_state": 1}).fit(frame).anomaly_score(frame)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_numpy_input_and_feature_count_check():
    X = np.random.default_rng(0).normal(size=(300, 4))
    det = VAEAnomalyDetector(**FAST).fit(X)
    assert det.anomaly_score(X).shape == (300,)
    with pytest.raises(ValueError, match="4 features"):
        det.anomaly_score(X[:, :3])


def test_score_methods(frame):
    rec = VAEAnomalyDetector(score_method="recon", **FAST).fit(frame)
    iw = VAEAnomalyDetector(score_method="iwae", n_importance_samples=8, **FAST).fit(frame)
    t = rec.score_terms(frame.head(20))
    np.testing.assert_allclose(t.anomaly_score, t.recon_nll)
    terms = iw.score_terms(frame.head(200))
    elbo = terms.recon_nll + terms.kl
    assert np.isfinite(terms.anomaly_score).all() and not np.allclose(terms.anomaly_score, elbo)
    assert np.corrcoef(np.argsort(np.argsort(terms.anomaly_score)), np.argsort(np.argsort(elbo)))[0, 1] > 0.7
    # a row's importance samples come from its own values (model.row_normals): the same bits
    # however the rows are cut or ordered, as for the other score methods
    rows = frame.head(300)
    whole = iw.anomaly_score(rows)
    parts = np.concatenate([iw.anomaly_score(rows.iloc[a:b]) for a, b in ((0, 1), (1, 130), (130, 300))])
    np.testing.assert_array_equal(parts, whole)
    order = np.random.default_rng(0).permutation(len(rows))
    np.testing.assert_array_equal(iw.anomaly_score(rows.iloc[order]), whole[order])


def test_encode_and_sample(fitted, frame):
    Z = fitted.encode(frame.head(10))
    assert Z.shape == (10, fitted.config_.latent_dim)
    synth = fitted.sample(200, seed=0)
    assert set(synth["cat"]) <= set(fitted.preprocessor_.params["cat"]["vocab"])
    lo, hi = frame["amount"].quantile([0.25, 0.75])
    assert lo <= synth["amount"].median() <= hi       # synthetic rows look like training rows


def test_too_few_rows_is_a_data_error():
    with pytest.raises(DataError):
        VAEAnomalyDetector(**FAST).fit(pd.DataFrame({"a": [1.0]}))


def test_y_marks_anomalies_with_one_only(frame):
    y = np.zeros(len(frame), dtype=int)
    y[:200] = 1
    det = VAEAnomalyDetector(**FAST).fit(frame, y)
    assert det.calibration_["n_calibration"] == round(0.15 * (len(frame) - 200))


@pytest.mark.parametrize("bad", [2, "fraud"])
def test_label_column_values_other_than_zero_one_are_refused(frame, bad):
    y = np.zeros(len(frame), dtype=object if isinstance(bad, str) else int)
    y[:5] = bad
    with pytest.raises(DataError, match=r"label column 'lab': expected 1 = anomaly / 0 = normal.*5 of"):
        VAEAnomalyDetector(label="lab", **FAST).fit(frame.assign(lab=y))


def test_y_that_is_missing_two_dimensional_or_doubled_is_refused(frame):
    y = np.zeros(len(frame))
    y[:3] = np.nan
    with pytest.raises(DataError, match=r"label y: 3 of 1,500 values are missing"):
        VAEAnomalyDetector(**FAST).fit(frame, y)
    with pytest.raises(DataError, match=r"one label per row \(1-D\), got shape \(1500, 2\)"):
        VAEAnomalyDetector(**FAST).fit(frame, np.zeros((len(frame), 2)))
    with pytest.raises(DataError, match="labels given twice"):
        VAEAnomalyDetector(label="lab", **FAST).fit(frame.assign(lab=0), np.zeros(len(frame)))


def test_y_in_sklearns_outlier_convention_is_refused(frame):
    y = np.ones(len(frame), dtype=int)     # sklearn: 1 = inlier, -1 = outlier: the opposite of ours
    y[:5] = -1
    with pytest.raises(DataError, match="sklearn's outlier convention is not accepted: map -1 to 1 and its 1 = inlier"):
        VAEAnomalyDetector(**FAST).fit(frame, y)


def test_missing_value_never_seen_in_training_raises_the_score(fitted, frame):
    # amount and ts have no nulls in training; imputing them would make the row look typical
    assert not frame["amount"].isna().any() and not frame["ts"].isna().any()
    rows = frame.head(3).reset_index(drop=True)
    holes = rows.assign(amount=[np.nan, np.inf, rows.amount[2]], ts=[rows.ts[0], rows.ts[1], pd.NaT])
    before, after = fitted.explain(rows), fitted.explain(holes)
    gain = after.anomaly_score - before.anomaly_score
    n_train = len(frame) * (1 - 0.15 - 0.1)
    assert (gain > 0.5 * np.log(2 * n_train)).all(), gain.tolist()   # ~log(2n) nats or more
    assert [t.split(":")[0] for t in after.top_features] == ["amount", "amount", "ts"]


def test_always_present_indicators_do_not_change_the_network_size(fitted):
    pre = fitted.preprocessor_
    silent = [s.column for s in pre.spans if s.indicator >= 0 and not pre.params[s.column]["has_missing"]]
    assert silent == ["amount", "y", "ts"] and pre.n_varying_dims == pre.n_dims - 3
    assert fitted.config_.hidden == fitted._config().resolve(1, pre.n_varying_dims).hidden


def test_flagged_rows_charge_columns_for_the_kl_they_cause(fitted, frame):
    rows = frame.head(40).reset_index(drop=True)
    rows.loc[:19, "amount"] *= 40                    # 20 extreme rows, 20 ordinary ones
    terms = fitted.score_terms(rows)
    flagged = terms.anomaly_score > fitted.threshold_
    assert flagged[:20].all() and terms.column_kl is not None
    assert (terms.column_kl[~flagged] == 0).all() and (terms.column_kl >= 0).all()
    amount = [s.column for s in fitted.preprocessor_.spans].index("amount")
    assert (terms.column_kl[:20, amount] > 0).all()
    contrib = fitted.contributions(rows).to_numpy()
    np.testing.assert_allclose(contrib, terms.column_nll - fitted.column_median_ + terms.column_kl)
    assert fitted.explain(rows).top_features[:20].str.startswith("amount:").all()


def test_sample_keeps_integer_columns_and_training_ranges():
    from anomaly_vae.demo import DEMO_EXCLUDE, make_transactions
    df = make_transactions(3000, seed=5)
    det = VAEAnomalyDetector(label="label", exclude=DEMO_EXCLUDE, **FAST).fit(df)
    synth = det.sample(2000, seed=1)
    assert df["txn_count_1h"].dtype.kind == "i" and str(synth["txn_count_1h"].dtype) == "Int64"
    assert synth["customer_age"].dtype == "float64"       # float in training (it has nulls): stays float
    for col in ("amount", "distance_from_home_km", "txn_count_1h", "customer_age"):
        assert synth[col].min() >= df[col].min() and synth[col].max() <= df[col].max()


def test_explain_and_contributions_keep_the_input_index(fitted, frame):
    rows = frame.iloc[10:20].set_index(pd.Index(range(100, 110)))
    assert fitted.explain(rows).index.tolist() == list(range(100, 110))
    assert fitted.contributions(rows).index.tolist() == list(range(100, 110))
    joined = rows.join(fitted.explain(rows))
    np.testing.assert_allclose(joined["anomaly_score"], fitted.anomaly_score(rows))


def test_sample_never_emits_unk_and_keeps_integer_categories():
    rng = np.random.default_rng(0)
    n = 800
    df = pd.DataFrame({"x": rng.normal(size=n),
                       "code": rng.choice([1, 2, 3, 4, 5, 6, 7], n, p=[.3, .3, .2, .1, .05, .04, .01]),
                       "shop": rng.choice(["a", "b", "c", "rare1", "rare2"], n, p=[.4, .3, .28, .01, .01])})
    det = VAEAnomalyDetector(categorical=("code",), **FAST).fit(df)
    assert "<unk>" in det.preprocessor_.params["shop"]["vocab"]
    synth = det.sample(3000, seed=2)
    assert "<unk>" not in set(synth["shop"].dropna()) and synth["shop"].notna().all()
    assert str(synth["code"].dtype) == "Int64" and set(synth["code"]) <= set(df["code"])


def test_device_option_cpu_auto_and_unavailable_cuda(frame, fitted):
    import torch

    from anomaly_vae.errors import ConfigError

    scores = fitted.anomaly_score(frame)
    cpu = clone_fitted(fitted, device="cpu")
    np.testing.assert_array_equal(cpu.anomaly_score(frame), scores)
    with pytest.raises(ConfigError, match="device"):
        clone_fitted(fitted, device="tpu").anomaly_score(frame)
    with pytest.raises(ConfigError, match="device"):
        VAEAnomalyDetector(device="gpu0", **FAST).fit(frame)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            VAEAnomalyDetector(device="cuda", **FAST).fit(frame)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_fit_and_score_match_cpu_closely(frame, fitted):
    gpu = VAEAnomalyDetector(device="cuda", **FAST).fit(frame)
    assert next(gpu.vae_.parameters()).device.type == "cpu"        # saved from the CPU
    np.testing.assert_allclose(clone_fitted(gpu, device="cpu").anomaly_score(frame),
                               gpu.anomaly_score(frame), rtol=1e-3, atol=1e-3)


def test_bfloat16_precision_is_deterministic_and_close(frame, fitted):
    from anomaly_vae.errors import ConfigError

    bf = clone_fitted(fitted, precision="bfloat16")
    a, b = bf.anomaly_score(frame), bf.anomaly_score(frame)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, fitted.anomaly_score(frame), rtol=0.05, atol=1.0)
    with pytest.raises(ConfigError, match="precision"):
        clone_fitted(fitted, precision="float16").anomaly_score(frame)
    with pytest.raises(ConfigError, match="precision"):
        VAEAnomalyDetector(precision="int8", **FAST).fit(frame)


def test_bfloat16_warns_once_where_the_cpu_has_no_native_bf16(frame, fitted, caplog):
    import anomaly_vae.fitted as D
    from anomaly_vae.model import cpu_has_native_bf16

    flags = open("/proc/cpuinfo").read()
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    D._warned_bf16.clear()
    bf = clone_fitted(fitted, precision="bfloat16")
    with caplog.at_level("WARNING", logger="anomaly_vae.fitted"):
        bf.anomaly_score(frame.head(50))
        bf.anomaly_score(frame.head(50))
    warned = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warned) == (0 if cpu_has_native_bf16() else 1)


def clone_fitted(det, **params):
    """A shallow copy of a fitted detector with some runtime params changed (no refit)."""
    import copy
    other = copy.copy(det)
    return other.set_params(**params)
