import math

import numpy as np
import torch

from anomaly_vae.model import VAE, gaussian_nll, kl_divergence


def tiny_vae(**kw):
    # dims: 0-2 numeric, 3 indicator for dim 2, 4-6 one categorical
    return VAE(7, np.array([0, 1, 2]), np.array([3]), [(4, 7)], np.array([-1, -1, 3]),
               hidden=(16, 8), latent_dim=2, **kw)


def test_gaussian_nll_and_kl_closed_forms():
    x, mu, logvar = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[0.0]])
    assert math.isclose(gaussian_nll(x, mu, logvar).item(), 0.5 * math.log(2 * math.pi) + 0.5, rel_tol=1e-6)
    assert kl_divergence(torch.zeros(1, 3), torch.zeros(1, 3)).sum().item() == 0.0
    assert kl_divergence(torch.ones(1, 1), torch.zeros(1, 1)).item() == 0.5


def test_forward_shapes_and_variance_floor():
    torch.manual_seed(0)
    vae = tiny_vae(var_floor=0.05)
    x = torch.zeros(5, 7)
    x[:, 4] = 1.0
    nll, kl, mu, logvar = vae(x)
    assert nll.shape == (5, 7) and kl.shape == (5, 2) and mu.shape == (5, 2)
    _, dec_logvar, _, _ = vae.decode(torch.randn(100, 2) * 50)
    assert dec_logvar.min().item() >= math.log(0.05) - 1e-6


def test_missing_numeric_value_is_masked_and_categorical_nll_is_cross_entropy():
    torch.manual_seed(0)
    vae = tiny_vae()
    x = torch.zeros(2, 7)
    x[:, 4] = 1.0
    x[1, 3] = 1.0            # dim 2 missing in row 1
    x[1, 2] = 123.0          # imputed garbage must not count
    nll, _, _, _ = vae(x, sample=False)
    assert nll[1, 2].item() == 0.0 and nll[0, 2].item() != 0.0
    assert torch.all(nll[:, 5:7] == 0) and torch.all(nll[:, 4] > 0)
    params = vae.decode(vae.encode(x)[0])
    ce = -torch.log_softmax(params[3], 1)[:, 0]
    torch.testing.assert_close(nll[:, 4], ce)


def test_iwae_bounds_elbo_and_sample_has_valid_one_hot():
    torch.manual_seed(0)
    vae = tiny_vae()
    X = np.zeros((20, 7), dtype=np.float32)
    X[:, 4] = 1
    dim_nll, kl = vae.score_terms(X)
    iw = vae.iwae_nll(X, n_samples=64)
    # the sampled ELBO upper-bounds -log p(x); its K-sample IWAE estimate sits below it on average
    torch.manual_seed(1)
    with torch.no_grad():
        draws = [vae(torch.from_numpy(X)) for _ in range(20)]
    elbo = np.mean([(nll.sum(1) + kl.sum(1)).numpy() for nll, kl, _, _ in draws], axis=0)
    assert np.isfinite(iw).all() and iw.mean() < elbo.mean() + 0.5
    S = vae.sample(50, seed=1)
    assert S.shape == (50, 7) and np.all(S[:, 4:7].sum(1) == 1)
    np.testing.assert_array_equal(S, vae.sample(50, seed=1))


def test_kl_occlusion_is_the_kl_drop_when_one_column_takes_its_typical_value():
    torch.manual_seed(0)
    vae = tiny_vae()
    columns = [np.array([0]), np.array([1]), np.array([2, 3]), np.array([4, 5, 6])]
    typical = np.array([0, 0, 0, 0, 1, 0, 0], dtype=np.float32)
    X = np.tile(typical, (700, 1))            # > one chunk with max_cells below
    X[:, 0] = np.linspace(-30, 30, 700)
    X[:, 1] = 3.0
    got = vae.kl_occlusion(X, columns, typical, max_cells=2048)
    assert got.shape == (700, 4) and (got >= 0).all()

    def kl(a):
        return kl_divergence(*vae.encode(torch.from_numpy(a))).sum(1).detach().numpy()

    for j, dims in enumerate(columns):
        occluded = X.copy()
        occluded[:, dims] = typical[dims]
        np.testing.assert_allclose(got[:, j], np.maximum(kl(X) - kl(occluded), 0), rtol=1e-5, atol=1e-5)
    assert got[:, 2:].max() < 1e-4             # columns already typical cause no KL (float32 noise)
    assert got[:, 0].max() > 0.1               # an extreme value does (even untrained)
    assert (vae.kl_occlusion(typical[None, :], columns, typical) == 0).all()


def test_score_terms_returns_the_decoder_params_of_the_same_pass():
    torch.manual_seed(0)
    vae = tiny_vae()
    rng = np.random.default_rng(0)
    X = np.zeros((30, 7), dtype=np.float32)
    X[:, :3] = rng.normal(size=(30, 3))
    X[np.arange(30), 4 + rng.integers(0, 3, 30)] = 1
    nll, kl = vae.score_terms(X, batch_size=7)
    nll2, kl2, params = vae.score_terms(X, batch_size=7, return_params=True)
    np.testing.assert_array_equal(nll, nll2)
    np.testing.assert_array_equal(kl, kl2)
    with torch.no_grad():
        want = vae.decode(vae.encode(torch.from_numpy(X))[0])
    assert [p.shape for p in params] == [(30, 3), (30, 3), (30, 1), (30, 3)]
    for got, w in zip(params, want):
        np.testing.assert_allclose(got, w.numpy(), rtol=1e-5, atol=1e-6)
    for got, same in zip(vae.decoder_params(X, batch_size=7), params):     # params only, same pass
        np.testing.assert_array_equal(got, same)


TINY_OWNER = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3])    # 2 numeric dims, 1 indicator, 2 one-hot blocks of 3


def _tiny_vae_and_rows(n: int, seed: int):
    """A small eval-mode VAE over 9 dims (TINY_OWNER's columns) and n rows for it, compact
    (`Encoded`: numeric + indicator head, one index per one-hot block)."""
    from anomaly_vae.preprocess import Encoded

    torch.manual_seed(0)
    vae = VAE(9, np.array([0, 1]), np.array([2]), [(3, 6), (6, 9)], np.array([-1, 2]),
              hidden=(16, 8), latent_dim=3).eval()
    rng = np.random.default_rng(seed)
    head = np.zeros((n, 3), dtype=np.float32)
    head[:, :2] = rng.normal(size=(n, 2))
    head[:, 2] = rng.random(n) < 0.2
    codes = np.stack([3 + rng.integers(0, 3, n), 6 + rng.integers(0, 3, n)], 1)
    return vae, Encoded(head, codes, 9)


def test_one_hot_scoring_path_equals_the_dense_one_and_falls_back():
    """column_terms reads each one-hot block as an index (embedding lookup + transposed output
    layer); the numbers must be those of the dense product, and inputs that are not one-hot
    (occluded or soft blocks) take the dense path."""
    vae, enc = _tiny_vae_and_rows(300, seed=0)
    X, owner = enc.dense(), TINY_OWNER
    assert vae._one_hot_codes(torch.from_numpy(X)) is not None
    sparse = vae.column_terms(X, owner, 4)
    vae._one_hot_tail = False
    dense = vae.column_terms(X, owner, 4)
    vae._one_hot_tail = True
    for a, b in zip(sparse, dense):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    soft = X.copy()
    soft[0, 3:6] = [0.5, 0.5, 0.0]               # two non-zeros in a block
    assert vae._one_hot_codes(torch.from_numpy(soft)) is None
    half = X.copy()
    half[:, 3:6] *= 0.5                           # one non-zero per block, not 1: weighted lookup
    np.testing.assert_allclose(vae.column_terms(half, owner, 4)[0], _dense_terms(vae, half, owner)[0],
                               rtol=1e-5, atol=1e-5)


def test_compact_rows_score_like_dense_ones_and_bf16_weights_follow_the_parameters():
    """column_terms and kl_occlusion on `Encoded` rows (head + one-hot codes, as batch scoring
    passes them) give the dense rows' numbers; bfloat16 runs on cached bf16 weights that are re-made when
    a parameter changes; "auto" picks bf16 exactly where the CPU runs it faster than float32."""
    from anomaly_vae.model import _cpu_info, cpu_bf16_is_faster, scoring_dtype

    vae, enc = _tiny_vae_and_rows(500, seed=1)
    X, owner = enc.dense(), TINY_OWNER
    for got, want in zip(vae.column_terms(enc, owner, 4, batch_size=128), _dense_terms(vae, X, owner)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    bf = vae.column_terms(enc, owner, 4, precision="bfloat16")
    np.testing.assert_array_equal(bf[0], vae.column_terms(X, owner, 4, precision="bfloat16")[0])
    np.testing.assert_allclose(bf[0], _dense_terms(vae, X, owner)[0], rtol=0.05, atol=0.05)
    with torch.no_grad():
        vae.dec_out.bias.add_(1.0)                  # a changed parameter: the bf16 copies follow
    np.testing.assert_allclose(vae.column_terms(enc, owner, 4, precision="bfloat16")[0],
                               _dense_terms(vae, X, owner)[0], rtol=0.05, atol=0.05)
    assert not np.allclose(vae.column_terms(enc, owner, 4, precision="bfloat16")[0], bf[0], atol=0.05)
    cols = [np.flatnonzero(owner == j) for j in range(4)]
    typical = np.array([0.1, -0.2, 0.0, 0, 1, 0, 1, 0, 0], dtype=np.float32)     # one-hot blocks
    np.testing.assert_allclose(vae.kl_occlusion(enc, cols, typical), vae.kl_occlusion(X, cols, typical),
                               rtol=1e-5, atol=1e-6)
    soft = typical.copy()
    soft[3:6] = [0.2, 0.5, 0.3]                  # not one-hot: the compact rows are made dense
    np.testing.assert_allclose(vae.kl_occlusion(enc, cols, soft), vae.kl_occlusion(X, cols, soft),
                               rtol=1e-5, atol=1e-6)
    native = cpu_bf16_is_faster()
    vendor, flags = _cpu_info()
    assert native == ("amx_bf16" in flags or ("avx512_bf16" in flags and vendor == "AuthenticAMD"))
    assert vendor in open("/proc/cpuinfo").read() and flags
    assert scoring_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    np.testing.assert_array_equal(vae.column_terms(enc, owner, 4, precision="auto")[0],
                                  vae.column_terms(enc, owner, 4, precision="bfloat16" if native else "float32")[0])


def _dense_terms(vae, X, owner):
    vae._one_hot_tail = False
    try:
        return vae.column_terms(X, owner, int(owner.max()) + 1)
    finally:
        vae._one_hot_tail = True


def test_score_block_keeps_the_widest_activations_near_two_mib():
    wide = VAE(166, np.arange(20), np.array([20]), [(25, 166)], np.full(20, -1), hidden=(256, 128), latent_dim=16)
    small = VAE(9, np.array([0, 1]), np.array([2]), [(3, 6), (6, 9)], np.array([-1, 2]), hidden=(72, 36), latent_dim=3)
    assert wide.score_block(torch.float32) == 2048 and wide.score_block(torch.bfloat16) == 4096
    assert small.score_block(torch.float32) == small.score_block(torch.bfloat16) == 4096
    vae, enc = _tiny_vae_and_rows(3000, seed=2)
    default = vae.column_terms(enc, TINY_OWNER, 4)
    for got, want in zip(vae.column_terms(enc, TINY_OWNER, 4, batch_size=700), default):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_row_nll_is_the_sum_of_dim_nll_with_the_same_gradients():
    """The training loss's row NLL equals dim_nll summed over dims (missing numerics masked,
    one-hot cross-entropy, indicators), and so do its gradients."""
    torch.manual_seed(0)
    vae = VAE(10, np.array([0, 1, 2]), np.array([3]), [(4, 7), (7, 10)], np.array([-1, -1, 3]),
              hidden=(16, 8), latent_dim=2)
    rng = np.random.default_rng(0)
    x = torch.zeros(64, 10)
    x[:, :3] = torch.from_numpy(rng.normal(size=(64, 3)).astype(np.float32))
    x[:, 3] = torch.from_numpy((rng.random(64) < 0.3).astype(np.float32))
    x[x[:, 3] == 1, 2] = 99.0                     # imputed value of a missing cell: not counted
    x[torch.arange(64), torch.from_numpy(4 + rng.integers(0, 3, 64))] = 1.0
    x[torch.arange(64), torch.from_numpy(7 + rng.integers(0, 3, 64))] = 1.0
    grads = []
    for loss_of in (lambda p: vae.dim_nll(x, p).sum(1), lambda p: vae.row_nll(x, p)):
        vae.zero_grad()
        rows = loss_of(vae.decode(vae.encode(x)[0]))
        rows.mean().backward()
        grads.append([q.grad.clone() for q in vae.parameters() if q.grad is not None])
        if len(grads) == 1:
            dense = rows.detach()
    torch.testing.assert_close(rows.detach(), dense, rtol=1e-6, atol=1e-5)
    assert len(grads[0]) == len(grads[1]) > 0
    for g_dense, g_rows in zip(*grads):
        torch.testing.assert_close(g_rows, g_dense, rtol=1e-5, atol=1e-6)


def test_row_nll_is_stable_when_blocks_logits_are_far_apart():
    """Each block's logsumexp is shifted by that block's own largest logit: blocks hundreds of
    nats apart (where one shift for the row would underflow a block to log 0) stay exact."""
    vae = VAE(6, np.array([], dtype=int), np.array([], dtype=int), [(0, 3), (3, 6)], np.array([], dtype=int),
              hidden=(4,), latent_dim=1)
    x = torch.tensor([[1.0, 0, 0, 0, 0, 1.0], [0, 1.0, 0, 1.0, 0, 0]])
    logits = torch.tensor([[500.0, 499.0, 0.0, -500.0, -501.0, -499.0],
                           [1.0, 2.0, 3.0, -800.0, -800.0, -801.0]])
    empty = torch.zeros(2, 0)
    got = vae.row_nll(x, (empty, empty, empty, logits))
    assert torch.isfinite(got).all()
    exact = -(x.double() * torch.cat([torch.log_softmax(logits[:, :3].double(), 1),
                                      torch.log_softmax(logits[:, 3:].double(), 1)], 1)).sum(1)
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-4)   # float32 sums of +-500
