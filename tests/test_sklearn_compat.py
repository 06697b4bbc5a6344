"""scikit-learn's estimator checks, run on a fast configuration. All of them pass, including
check_methods_subset_invariance: a row's scores have the same bits in any batch (`model.pad_rows`)."""
from sklearn.utils.estimator_checks import parametrize_with_checks

from anomaly_vae import VAEAnomalyDetector


@parametrize_with_checks([VAEAnomalyDetector(max_epochs=2, random_state=0, n_threads=1)])
def test_sklearn_compatible(estimator, check):
    check(estimator)
