import numpy as np
import torch

from anomaly_vae.config import Config
from anomaly_vae.model import VAE
from anomaly_vae.train import beta_at, fit_vae


def data(n=800, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    X = np.c_[z @ rng.normal(size=(2, 6)) + 0.1 * rng.normal(size=(n, 6))].astype(np.float32)
    return X


def make(X):
    torch.manual_seed(0)
    return VAE(X.shape[1], np.arange(X.shape[1]), np.array([], dtype=np.int64), [],
               np.full(X.shape[1], -1), hidden=(32, 16), latent_dim=4)


def test_kl_annealing_schedule():
    c = Config(beta=2.0, kl_warmup=0.5)
    assert beta_at(0.0, c) == 0.0 and beta_at(0.25, c) == 1.0 and beta_at(0.9, c) == 2.0
    assert beta_at(0.0, Config(kl_warmup=0.0)) == 1.0


def test_training_reduces_loss_and_tracks_history():
    X = data()
    cfg = Config(max_epochs=30, batch_size=64, hidden=(32, 16), latent_dim=4, patience=100)
    vae = make(X)
    h = fit_vae(vae, X[:700], X[700:], cfg)
    assert len(h.loss) == 30 and len(h.active_units) == 30 and len(h.beta) == 30
    assert h.val_loss[h.best_epoch] < h.val_loss[0] - 1.0
    assert h.beta[0] < h.beta[-1] == 1.0
    assert 1 <= h.active_units[-1] <= 4     # 2-D latent structure: some units active, not collapsed


def test_early_stopping_and_determinism():
    X = data()
    cfg = Config(max_epochs=200, batch_size=64, hidden=(32, 16), latent_dim=4, patience=3, kl_warmup=0.0)
    h1 = fit_vae(a := make(X), X[:700], X[700:], cfg)
    h2 = fit_vae(b := make(X), X[:700], X[700:], cfg)
    assert h1.stopped_early and len(h1.loss) < 200
    assert h1.loss == h2.loss
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_free_bits_keep_latents_active():
    X = data()
    base = dict(max_epochs=15, batch_size=64, hidden=(32, 16), latent_dim=4, patience=100, beta=4.0)
    h_fb = fit_vae(make(X), X[:700], X[700:], Config(**base, free_bits=0.5))
    assert h_fb.active_units[-1] >= 2


def test_posterior_collapse_warns_when_beta_forces_the_latent_off(caplog):
    import logging
    X = data()
    healthy = fit_vae(make(X), X, X[:200], Config(max_epochs=30, batch_size=64, hidden=(32, 16),
                                                   latent_dim=4, patience=100))
    assert healthy.posterior_collapse == "" and healthy.active_units[-1] > 0
    with caplog.at_level(logging.WARNING, logger="anomaly_vae.train"):
        collapsed = fit_vae(make(X), X, X[:200], Config(max_epochs=30, batch_size=64, hidden=(32, 16),
                                                         latent_dim=4, patience=100, beta=200.0))
    assert collapsed.active_units[collapsed.best_epoch] == 0
    assert "no active latent unit" in collapsed.posterior_collapse and "KL" in collapsed.posterior_collapse
    assert any("posterior collapse" in r.getMessage() for r in caplog.records)
