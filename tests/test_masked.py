"""The masked-cell VAE (objective="masked") and the other model-family variants (ae, swap noise)."""
import numpy as np
import pytest
import torch

from anomaly_vae import ConfigError, VAEAnomalyDetector
from anomaly_vae.config import Config
from anomaly_vae.masked import MaskedVAE, hidden_per_mask, random_masks, score_masks
from anomaly_vae.train import fit_vae, swap_cells
from conftest import FAST, mixed_frame

# dims: 0-2 numeric, 3 indicator of dim 2, 4-6 one categorical; columns: 0, 1, 2 (dims 2 + 3), 3
OWNER = np.array([0, 1, 2, 2, 3, 3, 3])


def tiny_masked(**kw):
    torch.manual_seed(0)
    return MaskedVAE(7, np.array([0, 1, 2]), np.array([3]), [(4, 7)], np.array([-1, -1, 3]),
                     owner=OWNER, hidden=(16, 8), latent_dim=2, **kw)


def rows(n=6, seed=0):
    rng = np.random.default_rng(seed)
    X = np.zeros((n, 7), dtype=np.float32)
    X[:, :3] = rng.normal(size=(n, 3))
    X[np.arange(n), 4 + rng.integers(0, 3, n)] = 1.0
    return X


@pytest.mark.parametrize("n_cols,fraction,rounds", [(4, 0.25, 1), (8, 0.25, 3), (7, 0.5, 2), (1, 0.25, 1)])
def test_score_masks_hide_every_column_exactly_rounds_times_and_are_deterministic(n_cols, fraction, rounds):
    m = score_masks(n_cols, fraction, rounds, seed=3)
    assert m.shape[1] == n_cols and m.dtype == bool
    np.testing.assert_array_equal(m.sum(0), rounds)            # every column hidden, `rounds` times
    assert m.sum(1).max() == hidden_per_mask(n_cols, fraction)
    np.testing.assert_array_equal(m, score_masks(n_cols, fraction, rounds, seed=3))
    assert hidden_per_mask(8, 0.25) == 2 and hidden_per_mask(2, 0.9) == 1 and hidden_per_mask(3, 0.01) == 1


def test_training_masks_hide_the_same_number_of_columns_in_every_row():
    m = random_masks(50, 8, 3, torch.Generator().manual_seed(0))
    assert torch.all(m.sum(1) == 3)
    assert len({tuple(r) for r in m.int().tolist()}) > 10          # different rows, different masks


def test_a_hidden_column_is_predicted_without_seeing_its_value():
    vae = tiny_masked(mask_fraction=0.25)                          # 1 column hidden per mask
    X = rows()
    _, _, p1 = vae.masked_score_terms(X, return_params=True)
    X2 = X.copy()
    X2[:, 0] += 5.0                                                 # change column 0 only
    nll1, _ = vae.masked_score_terms(X)
    nll2, _, p2 = vae.masked_score_terms(X2, return_params=True)
    # column 0's decoder mean comes from the mask hiding it: its own value was not an input
    np.testing.assert_allclose(p1.mean[:, 0], p2.mean[:, 0], rtol=1e-6)
    assert not np.allclose(p1.mean[:, 1], p2.mean[:, 1])  # column 1 sees column 0
    assert np.all(nll2[:, 0] != nll1[:, 0])


def test_hidden_and_missing_are_different_encoder_inputs():
    vae = tiny_masked()
    x = torch.from_numpy(rows(2))
    missing = x.clone()
    missing[:, 3] = 1.0                                             # column 2 observed as missing
    hide2 = torch.zeros(2, 4)
    hide2[:, 2] = 1.0
    mu_missing, _ = vae.encode(missing)
    mu_hidden, _ = vae.encode(x, hide2)
    assert not torch.allclose(mu_missing, mu_hidden)
    mu_hidden_of_missing, _ = vae.encode(missing, hide2)            # hiding drops value and indicator
    torch.testing.assert_close(mu_hidden, mu_hidden_of_missing)


def test_masked_terms_are_deterministic_and_averaged_over_the_hiding_masks():
    vae = tiny_masked(mask_fraction=0.5, mask_rounds=3)
    X = rows(20)
    a, ka = vae.masked_score_terms(X)
    b, kb = vae.masked_score_terms(X, batch_size=7)                # batching does not change them
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ka, kb, rtol=1e-5, atol=1e-6)
    # by hand: each column's NLL averaged over the 3 masks hiding it, KL over all 6 masks
    masks = torch.from_numpy(score_masks(4, 0.5, 3, seed=0).astype(np.float32))
    x = torch.from_numpy(X)
    nll, kl = torch.zeros(20, 7), torch.zeros(20)
    with torch.no_grad():
        for m in masks:
            hidden = m.expand(20, 4)
            mu, logvar = vae.encode(x, hidden)
            nll += vae.dim_nll(x, vae.decode(mu)) * hidden[:, vae.owner] / 3
            kl += (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).sum(1) / len(masks)
    np.testing.assert_allclose(a, nll.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ka, kl.numpy(), rtol=1e-4, atol=1e-5)


def test_masked_training_learns_the_hidden_cells_and_is_deterministic():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(800, 1))
    X = np.zeros((800, 7), dtype=np.float32)
    X[:, :3] = z @ np.array([[1.0, -1.0, 0.5]]) + 0.05 * rng.normal(size=(800, 3))
    X[np.arange(800), 4 + (z[:, 0] > 0)] = 1.0
    cfg = Config(objective="masked", max_epochs=25, batch_size=64, hidden=(16, 8), latent_dim=2,
                 patience=100, mask_fraction=0.25)
    a, b = tiny_masked(), tiny_masked()
    h = fit_vae(a, X[:700], X[700:], cfg)
    fit_vae(b, X[:700], X[700:], cfg)
    assert h.val_loss[h.best_epoch] < h.val_loss[0] - 1.0
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # column 0 is predictable from the others: hidden, it costs far less than under N(0, 1)
    nll, _ = a.masked_score_terms(X[700:])
    assert nll[:, 0].mean() < 0.5 * (np.log(2 * np.pi) + 1)


@pytest.fixture(scope="module")
def masked_det():
    return VAEAnomalyDetector(objective="masked", **FAST).fit(mixed_frame())


def test_masked_detector_scores_add_up_and_are_deterministic(masked_det):
    df = mixed_frame(300, seed=1)
    terms = masked_det.score_terms(df)
    np.testing.assert_allclose(terms.column_nll.sum(1, dtype=np.float64) + terms.kl, terms.anomaly_score, rtol=1e-9)
    tab = masked_det.explain(df)
    contrib = masked_det.contributions(df)
    np.testing.assert_allclose(contrib.sum(axis=1) + masked_det.column_median_.sum() + tab.kl,
                               tab.anomaly_score + np.nan_to_num(
                                   terms.column_kl.sum(1) if terms.column_kl is not None else 0.0),
                               rtol=1e-5)
    again = VAEAnomalyDetector(objective="masked", **FAST).fit(mixed_frame())
    np.testing.assert_array_equal(again.anomaly_score(df), terms.anomaly_score)
    assert terms.kl.min() > 0


def test_masked_detector_flags_a_broken_dependency_and_survives_save_load(masked_det, tmp_path):
    df = mixed_frame(300, seed=1)
    base = df[df["y"].abs() > 1.5].head(20)
    odd = base.assign(y=-base["y"])             # y = 2x: plausible alone, wrong given x
    assert np.mean(masked_det.anomaly_score(odd) > masked_det.anomaly_score(base)) >= 0.9
    assert np.all(masked_det.contributions(odd)["y"] > masked_det.contributions(base)["y"])
    loaded = VAEAnomalyDetector.load(masked_det.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.anomaly_score(df), masked_det.anomaly_score(df))
    params = loaded.decoder_params(df.head(5))
    assert params.mean.shape == (5, len(loaded.preprocessor_.numeric_dims))


def test_plain_autoencoder_has_no_kl_and_its_score_is_the_reconstruction():
    df = mixed_frame()
    det = VAEAnomalyDetector(objective="ae", **FAST).fit(df)
    terms = det.score_terms(df.head(100))
    assert np.all(terms.kl == 0) and terms.column_kl is None
    np.testing.assert_allclose(terms.anomaly_score, terms.column_nll.sum(1, dtype=np.float64), rtol=1e-9)
    np.testing.assert_array_equal(VAEAnomalyDetector(objective="ae", **FAST).fit(df).anomaly_score(df.head(100)),
                                  terms.anomaly_score)


def test_swap_noise_replaces_whole_columns_from_other_rows():
    x = torch.arange(40, dtype=torch.float32).view(5, 8)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3])
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(swap_cells(x, owner, 0.0, gen), x)
    out = swap_cells(x, owner, 0.5, gen)
    assert not torch.equal(out, x)
    for col in range(4):
        dims = (owner == col).nonzero()[:, 0]
        src = (out[:, dims[0]] // 8).long()                           # which row each cell came from
        for d in dims:                                                 # a column moves as a whole
            torch.testing.assert_close(out[:, d], x[src, d])
    det = VAEAnomalyDetector(swap_noise=0.15, **FAST).fit(mixed_frame())
    assert np.isfinite(det.anomaly_score(mixed_frame(100, seed=2))).all()


@pytest.mark.parametrize("bad", [dict(objective="vae"), dict(mask_fraction=0.0), dict(mask_fraction=1.0),
                                 dict(swap_noise=1.0), dict(mask_rounds=0),
                                 dict(objective="masked", score_method="iwae")])
def test_variant_settings_are_checked(bad):
    with pytest.raises(ConfigError):
        Config(**bad)
