"""scikit-learn's estimator checks, run on a fast configuration."""
from sklearn.utils.estimator_checks import parametrize_with_checks

from anomaly_vae import VAEAnomalyDetector

EXPECTED_FAILED = {
    # Scores are computed in float32; a row scored inside a different batch can differ in the
    # last bits (BLAS kernels depend on batch size) and this check compares to ~1e-7.
    "check_methods_subset_invariance": "batch-independent up to float32 rounding only",
}


@parametrize_with_checks([VAEAnomalyDetector(max_epochs=2, random_state=0, n_threads=1)],
                         expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_sklearn_compatible(estimator, check):
    check(estimator)
