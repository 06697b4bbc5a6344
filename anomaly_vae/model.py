"""VAE(nn.Module) for mixed-type rows, and the likelihood terms it is trained and scored with."""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import Config
from .errors import ConfigError
from .preprocess import Preprocessor

LOG_2PI = math.log(2 * math.pi)
ACTIVATION_BYTES = 2 << 20      # a scoring pass's widest activations: about one core's L2 (`score_block`)
LANE_ROWS = 64                  # scoring blocks are padded to a multiple of this many rows (`pad_rows`)


def pad_rows(t: torch.Tensor, multiple: int = LANE_ROWS) -> torch.Tensor:
    """`t` with its first row repeated at the end up to a multiple of `multiple` rows.

    torch's CPU kernels run the tail of a vectorised loop (exp, log, softplus, logsumexp)
    through scalar code, whose last bits differ from the vector code's. With whole vectors
    only, a row's scores do not depend on the rows it is scored with: the same bits alone, in
    a pool of small files, with any --batch-size or on Spark. Callers drop the extra rows."""
    pad = -len(t) % multiple
    return t if pad == 0 or len(t) == 0 else torch.cat([t, t[:1].expand(pad, *t.shape[1:])])


def lane_chunk(rows: int) -> int:
    """`rows` rounded down to a multiple of LANE_ROWS (at least LANE_ROWS): a chunk size whose
    blocks need no padding."""
    return max(LANE_ROWS, rows // LANE_ROWS * LANE_ROWS)


_GOLDEN = np.array(0x9E3779B97F4A7C15, dtype=np.uint64)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 arrays (arithmetic wraps mod 2**64)."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def row_normals(X: np.ndarray, n_draws: int, seed: int = 0) -> np.ndarray:
    """Standard normals (n, n_draws), float32, that depend only on each row's values and `seed`:
    a row gets the same draws whatever rows it comes with, in any batch, on any worker.

    Each row's float32 bits are hashed (a random linear form mod 2**64, then splitmix64's
    finaliser); pair i of draws is the splitmix64 stream of that key at counter i, turned
    into two normals by Box-Muller. Identical rows get identical draws (and so identical scores)."""
    bits = np.ascontiguousarray(X, dtype=np.float32).view(np.uint32).astype(np.uint64)     # (n, d)
    salt = _mix64(np.arange(1, bits.shape[1] + 2, dtype=np.uint64) * _GOLDEN
                  + np.array(int(seed) % 2 ** 64, dtype=np.uint64)) | np.uint64(1)    # odd coefficients, one per dim + 1
    key = _mix64(bits @ salt[1:] + salt[0])
    pairs = (n_draws + 1) // 2
    h = _mix64(key[:, None] + np.arange(1, pairs + 1, dtype=np.uint64)[None, :] * _GOLDEN)
    # two 24-bit uniforms in (0, 1] from each 64-bit draw (float32: normals reach ~5.9 sigma;
    # the top one rounds to 1.0, a radius of 0, never log(0))
    u1 = ((h >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)
    u2 = ((h & np.uint64(0xFFFFFF)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)
    r, theta = np.sqrt(np.float32(-2.0) * np.log(u1)), np.float32(2.0 * np.pi) * u2
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1)[:, :n_draws]


def gaussian_nll(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise -log N(x | mu, exp(logvar)). Shapes (n, d) -> (n, d)."""
    return 0.5 * (LOG_2PI + logvar + (x - mu) ** 2 * torch.exp(-logvar))


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-dim KL(N(mu, exp(logvar)) || N(0, 1)). Shapes (n, k) -> (n, k)."""
    return 0.5 * (mu ** 2 + torch.exp(logvar) - 1.0 - logvar)


class DecoderParams(NamedTuple):
    """Decoder likelihood parameters at z = mu for a block of rows (numpy, float32).

    mean, logvar: (n, n_num) Gaussian of each numeric/datetime dim, standardised units;
    ind_logit: (n, n_ind) Bernoulli logit of each missing indicator (1 = missing);
    cat_logit: (n, n_cat_dims) logits of the one-hot blocks, concatenated in `cat_spans` order.
    """

    mean: np.ndarray
    logvar: np.ndarray
    ind_logit: np.ndarray
    cat_logit: np.ndarray


class ColumnLayout(NamedTuple):
    """Index tensors that route each likelihood term to its original column (built per call
    from the preprocessor's dim -> column map; all small)."""

    n_columns: int
    num_owner: torch.Tensor        # (n_num,) column of each Gaussian dim
    num_with_ind: torch.Tensor     # positions (in the numeric block) that have an indicator
    ind_of_num: torch.Tensor       # (same length) the indicator dim of each of those
    ind_owner: torch.Tensor        # (n_ind,) column of each indicator dim
    cat_blocks: list[tuple[int, int]]   # one-hot block bounds within the concatenated cat logits
    cat_block_of_dim: torch.Tensor      # (n_cat_dims,) block of each categorical dim
    cat_owner: torch.Tensor        # (n_blocks,) column of each block

    @classmethod
    def build(cls, vae: "VAE", owner: np.ndarray, n_columns: int, device="cpu") -> "ColumnLayout":
        own = torch.as_tensor(np.asarray(owner, dtype=np.int64))
        has_ind = vae.num_ind >= 0
        blocks, off = [], 0
        for a, b in vae.cat_spans:
            blocks.append((off, off + b - a))
            off += b - a
        t = lambda v: torch.as_tensor(v, dtype=torch.long).to(device)  # noqa: E731
        return cls(n_columns, t(own[vae.num_idx.cpu()]), t(torch.nonzero(has_ind.cpu())[:, 0]),
                   t(vae.num_ind[has_ind].cpu()), t(own[vae.ind_idx.cpu()]), blocks, t(vae.cat_block.cpu()),
                   t([int(own[a]) for a, _ in vae.cat_spans]))


@functools.lru_cache(maxsize=1)
def _cpu_info() -> tuple[str, frozenset[str]]:
    """(vendor_id, flags) of the first CPU in Linux /proc/cpuinfo; ('', {}) elsewhere."""
    vendor, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX, Linux /proc/cpuinfo).
    Without it, torch emulates bf16 matmuls: measured 7x slower than float32 on an AVX2 EPYC."""
    flags = _cpu_info()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_bf16_is_faster() -> bool:
    """Whether bfloat16 scoring beats float32 on this CPU, by its features (a fixed rule, so
    that "auto" always picks the same dtype on a machine): AMX (oneDNN's bf16 tiles), or
    AVX512-BF16 on an AMD CPU. Measured (one thread, the wide benchmark model's scoring pass):
    AMD EPYC with AVX512-BF16 2.1x faster than float32; an Intel Xeon (model 207) VM with
    AVX512-BF16 but no AMX exposed 0.77x (oneDNN's avx512_core_bf16 matmul ran at 33 GMAC/s vs
    56 for MKL's float32). An Intel Xeon VM with AMX (2026-12-08, benchmarks/throughput.py): the
    network stage one thread 0.99 s bf16 vs 1.41 s float32 per 1M wide rows (demo 0.72 vs 1.22)."""
    vendor, flags = _cpu_info()
    return "amx_bf16" in flags or ("avx512_bf16" in flags and vendor == "AuthenticAMD")


def scoring_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The scoring MLPs' dtype for a precision setting: "float32", "bfloat16", or "auto" =
    bfloat16 on a CPU where it is faster than float32 (`cpu_bf16_is_faster`) or a CUDA device
    that has bf16, else float32."""
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "auto":
        native = cpu_bf16_is_faster() if device.type == "cpu" else (
            device.type == "cuda" and torch.cuda.is_bf16_supported())
        return torch.bfloat16 if native else torch.float32
    raise ConfigError(f"precision {precision!r}: expected 'float32', 'bfloat16' or 'auto'")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu', 'cuda', 'cuda:N' as given. ConfigError
    when CUDA is asked for and not available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}': CUDA is not available on this machine (torch "
                          f"{torch.__version__}); use device='auto' or 'cpu'")
    return device


def _mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Encoder -> (mu, logvar) -> z -> decoder -> per-dim likelihood parameters.

    Numeric dims: Gaussian (mean from z; variance >= var_floor, learned per feature or, with
    heteroscedastic=True, from z); missing-indicator
    dims: Bernoulli logit; one-hot blocks: categorical logits. The layout (which dim is which)
    comes from the fitted Preprocessor and is stored as buffers so it is saved with the weights.
    """

    def __init__(self, n_dims: int, numeric_dims: np.ndarray, indicator_dims: np.ndarray,
                 categorical_spans: list[tuple[int, int]], numeric_indicator: np.ndarray,
                 hidden: tuple[int, ...] = (64, 32), latent_dim: int = 8, var_floor: float = 1e-2,
                 dropout: float = 0.0, heteroscedastic: bool = False) -> None:
        super().__init__()
        self.n_dims, self.latent_dim, self.var_floor = n_dims, latent_dim, var_floor
        self.heteroscedastic = heteroscedastic
        self.register_buffer("num_idx", torch.as_tensor(numeric_dims, dtype=torch.long))
        self.register_buffer("ind_idx", torch.as_tensor(indicator_dims, dtype=torch.long))
        self.register_buffer("num_ind", torch.as_tensor(numeric_indicator, dtype=torch.long))
        self.cat_spans = [(int(a), int(b)) for a, b in categorical_spans]
        cat_dims = [d for a, b in self.cat_spans for d in range(a, b)]
        self.register_buffer("cat_idx", torch.as_tensor(cat_dims, dtype=torch.long))
        # the block of each categorical logit, for segment sums (`row_nll`, `ColumnLayout`; not saved: derived)
        self.register_buffer("cat_block", torch.as_tensor([j for j, (a, b) in enumerate(self.cat_spans)
                                                           for _ in range(a, b)], dtype=torch.long),
                             persistent=False)
        # the encoder's layout puts the one-hot blocks last, side by side: scoring then reads
        # each block as one index (an embedding lookup) instead of a dense one-hot product
        self._cat_start = self.cat_spans[0][0] if self.cat_spans else n_dims
        self._one_hot_tail = bool(self.cat_spans) and cat_dims == list(range(self._cat_start, n_dims))
        n_num, n_ind = len(numeric_dims), len(indicator_dims)
        self.encoder = _mlp([n_dims, *hidden], dropout)
        self.enc_mu = nn.Linear(hidden[-1], latent_dim)
        self.enc_logvar = nn.Linear(hidden[-1], latent_dim)
        self.decoder = _mlp([latent_dim, *reversed(hidden)], dropout)
        self.dec_out = nn.Linear(hidden[0], 2 * n_num + n_ind + len(cat_dims))
        self._splits = [n_num, n_num, n_ind, len(cat_dims)]
        # homoscedastic option: one learned variance per numeric feature, independent of z
        self.feature_raw_var = nn.Parameter(torch.zeros(n_num)) if not heteroscedastic else None
        self._layouts: dict[tuple, ColumnLayout] = {}    # `_layout`: per (owner, columns, device)

    @classmethod
    def from_config(cls, pre: Preprocessor, config: Config) -> "VAE":
        """The network for a fitted preprocessor's layout and a resolved Config
        (`masked.build_vae` picks the class for the config's objective)."""
        return cls.from_preprocessor(pre, hidden=config.hidden, latent_dim=config.latent_dim,
                                     var_floor=config.var_floor, dropout=config.dropout,
                                     heteroscedastic=config.heteroscedastic)

    @classmethod
    def from_preprocessor(cls, pre: Preprocessor, **kwargs) -> "VAE":
        num = pre.numeric_dims
        ind_of = {d: s.indicator for s in pre.spans if s.kind in ("numeric", "datetime")
                  for d in range(s.start, s.stop)}
        numeric_indicator = np.array([ind_of[int(d)] for d in num], dtype=np.int64)
        vae = cls(pre.n_dims, num, pre.indicator_dims, pre.categorical_spans, numeric_indicator, **kwargs)
        vae.init_indicator_bias(pre.indicator_rates)
        return vae

    @torch.no_grad()
    def init_indicator_bias(self, rates: np.ndarray) -> None:
        """Start each missing-indicator logit at its training missing rate (the usual output-bias
        init); for a column never missing in training, a missing value then costs ~log(2 n) nats."""
        a = 2 * self._splits[0]
        rates = torch.as_tensor(rates, dtype=self.dec_out.bias.dtype)
        self.dec_out.bias[a:a + len(rates)] = torch.log(rates) - torch.log1p(-rates)

    # ------------------------------------------------------------------ forward
    def _layout(self, owner: np.ndarray, n_columns: int, device: torch.device) -> ColumnLayout:
        """`ColumnLayout.build`, kept per (owner, columns, device): it was rebuilt per batch."""
        key = (np.asarray(owner, dtype=np.int64).tobytes(), n_columns, str(device))
        if key not in self._layouts:
            self._layouts[key] = ColumnLayout.build(self, owner, n_columns, device)
        return self._layouts[key]

    def _eval(self) -> None:
        """`eval()` unless already in eval mode (`train`/`eval` set every submodule; walking
        them on each scored batch cost ~0.2 ms)."""
        if self.training:
            self.eval()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.enc_mu(h), self.enc_logvar(h).clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """z (n, k) -> numeric mean (n, n_num), numeric logvar, indicator logits, cat logits."""
        out = self.dec_out(self.decoder(z))
        mean, raw_var, ind_logit, cat_logit = torch.split(out, self._splits, dim=1)
        if self.feature_raw_var is not None:
            raw_var = self.feature_raw_var.expand_as(mean)
        logvar = torch.log(self.var_floor + F.softplus(raw_var))
        return mean, logvar, ind_logit, cat_logit

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def dim_nll(self, x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Per-dim negative log-likelihood of x under decoder params. (n, n_dims).

        Gaussian NLL of a numeric dim is masked out where its value was missing (the
        indicator's Bernoulli term carries that information instead). Categorical NLL
        is spread over the one-hot dims (only the observed category's dim is non-zero).
        """
        mean, logvar, ind_logit, cat_logit = params
        nll = x.new_zeros(x.shape)
        if len(self.num_idx):
            nll[:, self.num_idx] = self._numeric_nll(x, mean, logvar)
        if len(self.ind_idx):
            nll[:, self.ind_idx] = F.binary_cross_entropy_with_logits(
                ind_logit, x[:, self.ind_idx], reduction="none")
        if self.cat_spans:
            off, parts = 0, []
            for a, b in self.cat_spans:
                logp = F.log_softmax(cat_logit[:, off:off + b - a], dim=1)
                parts.append(-x[:, a:b] * logp)
                off += b - a
            nll[:, self.cat_idx] = torch.cat(parts, dim=1)
        return nll

    def _numeric_nll(self, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Gaussian NLL of the numeric dims, (n, n_num); 0 where the value was missing (its
        indicator is 1)."""
        g = gaussian_nll(x[:, self.num_idx], mean, logvar)
        has_ind = self.num_ind >= 0
        if has_ind.any():
            observed = torch.ones_like(g)
            observed[:, has_ind] = 1.0 - x[:, self.num_ind[has_ind]]
            g = g * observed
        return g

    def row_nll(self, x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Negative log-likelihood of each row, (n,): `dim_nll(x, params).sum(1)` without the
        (n, n_dims) tensor. The training loss, where building that tensor (index assignments
        and their backward) was ~10% of a step: 60k wide rows x 4 epochs, training loop
        2.07-2.16 against 2.26-2.43 s. A categorical block adds
        logsumexp(logits) * sum(x) - sum(x * logits), its cross-entropy; the logsumexps of all
        blocks are segment sums (`cat_block`) shifted by each block's largest logit, not one
        call per block: 2.05-2.12 against 2.17-2.30 s. (A matmul with a dims x blocks one-hot
        matrix was 3% faster on the wide table but grows with dims x blocks.)"""
        mean, logvar, ind_logit, cat_logit = params
        total = x.new_zeros(len(x))
        if len(self.num_idx):
            total = total + self._numeric_nll(x, mean, logvar).sum(1)
        if len(self.ind_idx):
            total = total + F.binary_cross_entropy_with_logits(ind_logit, x[:, self.ind_idx], reduction="none").sum(1)
        if self.cat_spans:
            n, shape = len(x), (len(x), len(self.cat_spans))
            with torch.no_grad():        # lse does not depend on the shift: no gradient through it
                top = torch.full(shape, -torch.inf, dtype=cat_logit.dtype, device=x.device).scatter_reduce_(
                    1, self.cat_block.expand(n, -1), cat_logit, "amax")
            shifted = torch.exp(cat_logit - top[:, self.cat_block])
            sums = cat_logit.new_zeros(shape).index_add_(1, self.cat_block, shifted)
            xc = x[:, self.cat_idx]
            mass = x.new_zeros(shape).index_add_(1, self.cat_block, xc)
            total = total + ((torch.log(sums) + top) * mass).sum(1) - (xc * cat_logit).sum(1)
        return total

    def forward(self, x: torch.Tensor, sample: bool = True):
        """Returns (dim_nll (n, n_dims), kl (n, k), mu (n, k), logvar (n, k))."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if sample else mu
        return self.dim_nll(x, self.decode(z)), kl_divergence(mu, logvar), mu, logvar

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_terms(self, X: np.ndarray, batch_size: int = 8192, return_params: bool = False):
        """Deterministic terms: per-dim NLL at z = mu (n, n_dims) and KL per row (n,).

        With return_params=True also the decoder parameters at z = mu (`DecoderParams`), from
        the same pass (expected values are read from them): (nll, kl, params).
        """
        self._eval()
        nll_out = np.empty((len(X), self.n_dims), dtype=np.float32)
        kl_out = np.empty(len(X), dtype=np.float32)
        widths = [self._splits[0], self._splits[1], self._splits[2], self._splits[3]]
        params_out = DecoderParams(*(np.empty((len(X), w), dtype=np.float32) for w in widths)) \
            if return_params else None
        step = lane_chunk(batch_size)
        for i in range(0, len(X), step):
            x = torch.from_numpy(X[i:i + step])
            m, x = len(x), pad_rows(x)
            mu, logvar = self.encode(x)
            params = self.decode(mu)
            nll_out[i:i + m] = self.dim_nll(x, params)[:m].numpy()
            kl_out[i:i + m] = kl_divergence(mu, logvar).sum(1)[:m].numpy()
            if params_out is not None:
                for out, p in zip(params_out, params):
                    out[i:i + m] = p[:m].numpy()
        return (nll_out, kl_out) if params_out is None else (nll_out, kl_out, params_out)

    @torch.no_grad()
    def decoder_params(self, X: np.ndarray, batch_size: int = 8192) -> DecoderParams:
        """The decoder parameters at z = mu for rows X (n, n_dims), as `score_terms` returns
        them, without the likelihood terms (what explanations read expected values from)."""
        self._eval()
        out = DecoderParams(*(np.empty((len(X), w), dtype=np.float32) for w in self._splits))
        step = lane_chunk(batch_size)
        for i in range(0, len(X), step):
            x = torch.from_numpy(X[i:i + step])
            for o, p in zip(out, self.decode(self.encode(pad_rows(x))[0])):
                o[i:i + len(x)] = p[:len(x)].numpy()
        return out

    def column_nll(self, x: torch.Tensor, params: tuple[torch.Tensor, ...],
                   layout: "ColumnLayout") -> torch.Tensor:
        """Per-column NLL of x under decoder params, float32 (n, n_columns); the same numbers
        as summing `dim_nll` over each column's dims, without the (n, n_dims) intermediate
        per categorical dim. Each term is index-added into its column (a segment sum)."""
        mean, logvar, ind_logit, cat_logit = params
        out = x.new_zeros((len(x), layout.n_columns), dtype=torch.float32)
        if len(self.num_idx):
            g = gaussian_nll(x[:, self.num_idx], mean.float(), logvar.float())
            if len(layout.num_with_ind):
                g[:, layout.num_with_ind] *= 1.0 - x[:, layout.ind_of_num]
            out.index_add_(1, layout.num_owner, g)
        if len(self.ind_idx):
            out.index_add_(1, layout.ind_owner, F.binary_cross_entropy_with_logits(
                ind_logit.float(), x[:, self.ind_idx], reduction="none"))
        if self.cat_spans:
            cat_logit = cat_logit.float()
            xc = x[:, self.cat_idx]
            # -sum_k x_k log softmax(l)_k = logsumexp(l) * sum_k x_k - sum_k x_k l_k, per block
            lt = cat_logit.T.contiguous()           # blocks as contiguous rows: faster reductions
            lse = torch.stack([torch.logsumexp(lt[a:b], 0) for a, b in layout.cat_blocks], 1)
            dot = x.new_zeros((len(x), len(layout.cat_blocks))).index_add_(1, layout.cat_block_of_dim, xc * cat_logit)
            mass = x.new_zeros((len(x), len(layout.cat_blocks))).index_add_(1, layout.cat_block_of_dim, xc)
            out.index_add_(1, layout.cat_owner, lse * mass - dot)
        return out

    def _one_hot_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Dim (n, B) and value (n, B) of the one non-zero of each one-hot block of x, or None
        when some block of some row has not exactly one (then the dense path is used)."""
        if not self._one_hot_tail:
            return None
        nz = torch.nonzero(x[:, self._cat_start:])
        n, n_blocks = len(x), len(self.cat_spans)
        if len(nz) != n * n_blocks:
            return None
        dims = nz[:, 1].view(n, n_blocks) + self._cat_start
        starts = torch.as_tensor([a for a, _ in self.cat_spans], device=x.device)
        stops = torch.as_tensor([b for _, b in self.cat_spans], device=x.device)
        if not bool(((dims >= starts) & (dims < stops)).all()):
            return None
        return dims, x.gather(1, dims)

    def _weights(self, dtype: torch.dtype) -> dict[str, Any]:
        """The scoring pass's weights in `dtype`, laid out for it: the first layer split into
        its dense head and its one-hot part (as embedding rows), mu and logvar as one layer.
        Made once and kept until a parameter changes (training, load_state_dict), so a
        bfloat16 pass does not re-cast the weights per batch as autocast does."""
        key = (dtype, tuple((p.data_ptr(), p._version) for p in self.parameters()))
        cached = self.__dict__.get("_weight_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            cast = lambda t: t.detach().to(dtype).contiguous()  # noqa: E731
            enc = [m for m in self.encoder if isinstance(m, nn.Linear)]
            dec = [m for m in self.decoder if isinstance(m, nn.Linear)]
            s = self._cat_start
            w = {"head": (cast(enc[0].weight[:, :s]), cast(enc[0].bias)),
                 "one_hot": cast(enc[0].weight[:, s:].T),
                 "encoder": [(cast(m.weight), cast(m.bias)) for m in enc[1:]],
                 "latent": (cast(torch.cat([self.enc_mu.weight, self.enc_logvar.weight])),
                            cast(torch.cat([self.enc_mu.bias, self.enc_logvar.bias]))),
                 "decoder": [(cast(m.weight), cast(m.bias)) for m in dec],
                 "out": (cast(self.dec_out.weight), cast(self.dec_out.bias)[:, None])}
        self.__dict__["_weight_cache"] = (key, w)
        return w

    def _encode_pass(self, head: torch.Tensor, dims: torch.Tensor, values: torch.Tensor | None,
                     dtype: torch.dtype, w: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode` (eval mode) for rows given as head = x[:, :cat_start] and the dims (n, B)
        and values (n, B; None = all 1) of their one-hot blocks: the first layer adds one
        weight row per block (embedding_bag) instead of multiplying by the 0/1 dims.
        mu, logvar in `dtype`. `w`: `_weights(dtype)`, when the caller has it."""
        w = w or self._weights(dtype)
        h = F.linear(head.to(dtype), *w["head"])
        if dims.shape[1]:
            h = h + F.embedding_bag(dims - self._cat_start, w["one_hot"], mode="sum",
                                    per_sample_weights=None if values is None else values.to(dtype))
        h = F.silu(h)
        for weight, bias in w["encoder"]:
            h = F.silu(F.linear(h, weight, bias))
        mu, logvar = F.linear(h, *w["latent"]).split(self.latent_dim, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def encode_rows(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode` for scoring (no gradients needed): the one-hot path when x allows it, its
        MLP in `dtype` (see `scoring_dtype`); mu, logvar float32."""
        codes = self._one_hot_codes(x)
        if codes is None:
            return self.encode(x)
        dims, values = codes
        mu, logvar = self._encode_pass(x[:, :self._cat_start], dims,
                                       None if bool(values.eq(1.0).all()) else values, dtype)
        return mu.float(), logvar.float()

    def _forward_t(self, head: torch.Tensor, dims: torch.Tensor, values: torch.Tensor | None,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder, then decoder at z = mu, MLPs in `dtype`: mu, logvar (n, k) and the decoder
        output transposed (n_outputs, n), all float32."""
        w = self._weights(dtype)
        mu, logvar = self._encode_pass(head, dims, values, dtype, w)
        d = mu
        for weight, bias in w["decoder"]:
            d = F.silu(F.linear(d, weight, bias))
        weight, bias = w["out"]
        return mu.float(), logvar.float(), torch.addmm(bias, weight, d.T).float()

    def _sparse_terms(self, head: torch.Tensor, dims: torch.Tensor, values: torch.Tensor | None,
                      layout: "ColumnLayout", dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`column_nll` and KL at z = mu for rows given as (head, one-hot dims, values), see
        `_encode_pass`: the same numbers (to float rounding) as the dense pass, with less work.
        The MLPs run in `dtype`; the likelihood terms in float32. The output layer is computed
        transposed, (outputs, n), so that each block's logits are contiguous for logsumexp and
        the observed logit is a gather."""
        mu, logvar, out_t = self._forward_t(head, dims, values, dtype)
        mean_t, raw_t, ind_t, cat_t = torch.split(out_t, self._splits, dim=0)
        if self.feature_raw_var is not None:        # one variance per feature: (n_num, 1)
            logvar_t = torch.log(self.var_floor + F.softplus(self.feature_raw_var))[:, None]
        else:
            logvar_t = torch.log(self.var_floor + F.softplus(raw_t))
        head_t = head.T.contiguous()                # (head dims, n): rows gathered below
        col_t = head.new_zeros((layout.n_columns, len(head)), dtype=torch.float32)
        if len(self.num_idx):
            g = gaussian_nll(head_t[self.num_idx], mean_t, logvar_t)
            if len(layout.num_with_ind):
                g[layout.num_with_ind] *= 1.0 - head_t[layout.ind_of_num]
            col_t.index_add_(0, layout.num_owner, g)
        if len(self.ind_idx):
            col_t.index_add_(0, layout.ind_owner, F.binary_cross_entropy_with_logits(
                ind_t, head_t[self.ind_idx], reduction="none"))
        if self.cat_spans:
            # block NLL = value * (logsumexp(block logits) - observed logit)
            lse = torch.stack([torch.logsumexp(cat_t[a:b], 0) for a, b in layout.cat_blocks])
            nll = lse - cat_t.gather(0, (dims - self._cat_start).T)
            col_t.index_add_(0, layout.cat_owner, nll if values is None else values.T * nll)
        return col_t.T, kl_divergence(mu, logvar).sum(1)

    def score_block(self, dtype: torch.dtype) -> int:
        """Rows per scoring pass: the largest power of two (512 to 4,096) whose activations of
        the widest layer fit in ACTIVATION_BYTES. Measured, one thread, best block: 4,096 for
        the wide benchmark model (widest 256) in bf16 on an AMD EPYC (1.3x faster than 16,384);
        on an Intel Xeon in float32, 2,048 for that model (~10% faster than 4,096) and 4,096
        for the demo model (widest 72; ~10% faster than 2,048 and 8,192). The wide model with
        the 128/64 default (widest 180, the output layer) gets 2,048: median 412k rows/s
        against 408k for 4,096, 343k for 1,024 and 295k for 8,192."""
        widest = max((m.out_features for m in self.modules() if isinstance(m, nn.Linear)), default=1)
        rows = ACTIVATION_BYTES // (widest * torch.finfo(dtype).bits // 8)
        return int(min(4096, max(512, 1 << (max(int(rows), 1).bit_length() - 1))))

    def column_terms(self, X: Any, owner: np.ndarray, n_columns: int, *,
                     batch_size: int | None = None, precision: str = "float32",
                     device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """Deterministic scoring terms in one fused pass: per-column NLL at z = mu (n, n_columns)
        and KL per row (n,), both float32. `X` is encoded rows (n, n_dims) or a
        `preprocess.Encoded` (head + one-hot codes: no one-hot zeros to build or search).
        `owner` (n_dims,) maps each dim to its column. precision: "float32", "bfloat16" (the
        encoder/decoder MLPs in bf16, the likelihood terms in float32) or "auto" (bfloat16 where
        the device computes it natively, see `scoring_dtype`). Results are deterministic for a
        given model, machine and setting. Rows go through in blocks of `batch_size` (default
        `score_block`: the activations stay in cache)."""
        self._eval()
        device = torch.device(device)
        dtype = scoring_dtype(precision, device)
        batch_size = lane_chunk(batch_size or self.score_block(dtype))
        layout = self._layout(owner, n_columns, device)
        col_out = np.empty((len(X), n_columns), dtype=np.float32)
        kl_out = np.empty(len(X), dtype=np.float32)
        compact = not isinstance(X, np.ndarray)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        with torch.inference_mode():
            for i in range(0, len(X), batch_size):
                sl = slice(i, i + batch_size)
                if compact:
                    head = pad_rows(torch.from_numpy(X.head[sl]).to(device))
                    codes = pad_rows(torch.from_numpy(X.codes[sl]).to(device)), None
                else:
                    x = pad_rows(torch.from_numpy(X[sl]).to(device))
                    codes = self._one_hot_codes(x)
                    head = x[:, :self._cat_start]
                    if codes is not None and bool(codes[1].eq(1.0).all()):
                        codes = codes[0], None
                if codes is not None:
                    col, kl = self._sparse_terms(head, *codes, layout, dtype)
                else:
                    with autocast:
                        mu, logvar = self.encode(x)
                        params = self.decode(mu)
                    col, kl = self.column_nll(x, params, layout), kl_divergence(mu.float(), logvar.float()).sum(1)
                m = len(kl_out[sl])
                col_out[sl] = col[:m].cpu().numpy()
                kl_out[sl] = kl[:m].cpu().numpy()
        return col_out, kl_out

    @torch.no_grad()
    def iwae_nll(self, X: np.ndarray, n_samples: int = 16, batch_size: int = 2048,
                 seed: int = 0) -> np.ndarray:
        """Importance-weighted estimate of -log p(x) with K samples from q(z|x). (n,)
        A row's samples come from its own values and `seed` (`row_normals`) and its blocks are
        padded to whole lanes (`pad_rows`): its score does not depend on the other rows."""
        self._eval()
        out = np.empty(len(X), dtype=np.float64)
        step = lane_chunk(batch_size)
        for i in range(0, len(X), step):
            rows = X[i:i + step]
            m, x = len(rows), pad_rows(torch.from_numpy(rows))
            mu, logvar = self.encode(x)
            std = torch.exp(0.5 * logvar)
            draws = torch.from_numpy(row_normals(x.numpy(), n_samples * mu.shape[1], seed))
            logw = []
            for k in range(n_samples):
                eps = draws[:, k * mu.shape[1]:(k + 1) * mu.shape[1]]
                z = mu + std * eps
                log_px = -self.row_nll(x, self.decode(z))
                log_pz = -0.5 * (z ** 2 + LOG_2PI).sum(1)
                log_qz = -0.5 * (eps ** 2 + LOG_2PI + logvar).sum(1)
                logw.append(log_px + log_pz - log_qz)
            lw = torch.stack(logw, 0)
            out[i:i + m] = -(torch.logsumexp(lw, 0) - math.log(n_samples))[:m].double().numpy()
        return out

    @torch.no_grad()
    def kl_occlusion(self, X: Any, column_dims: list[np.ndarray], typical: np.ndarray,
                     max_cells: int = 1 << 22, dtype: torch.dtype = torch.float32) -> np.ndarray:
        """KL each column causes: KL(q(z|x)) minus KL with that column's dims set to `typical`
        (its usual encoded value), floored at 0. (n, n_columns); one encoder pass per column.
        X is dense (n, n_dims) or `preprocess.Encoded` (then the occluded copies stay compact)."""
        self._eval()
        if not isinstance(X, np.ndarray):
            occluders = self._compact_occluders(column_dims, typical)
            if occluders is not None:
                return self._kl_occlusion_compact(X, occluders, typical, max_cells, dtype)
            X = X.dense()
        n_cols = len(column_dims)
        out = np.zeros((len(X), n_cols), dtype=np.float64)
        chunk = lane_chunk(max_cells // max(1, (n_cols + 1) * self.n_dims))
        typ = torch.from_numpy(np.asarray(typical, dtype=np.float32))
        for i in range(0, len(X), chunk):
            x = pad_rows(torch.from_numpy(X[i:i + chunk]))
            m, real = len(x), len(X[i:i + chunk])
            batch = x.repeat(n_cols + 1, 1)
            for j, dims in enumerate(column_dims, start=1):
                idx = torch.as_tensor(dims, dtype=torch.long)
                batch[j * m:(j + 1) * m, idx] = typ[idx]
            kl = kl_divergence(*self.encode_rows(batch, dtype)).sum(1).view(n_cols + 1, m)
            out[i:i + real] = (kl[0] - kl[1:]).clamp_min(0.0).T[:real].double().numpy()
        return out

    def _compact_occluders(self, column_dims: list[np.ndarray], typical: np.ndarray
                           ) -> list[tuple[np.ndarray, list[tuple[int, int]]]] | None:
        """Per column: (its dims in the head, [(one-hot block, typical dim)]) for occluding
        compact rows; None when `typical` is not one-hot in some block or the layout is not
        the preprocessor's (then the dense path is used)."""
        if not self._one_hot_tail:
            return None
        block_of = {d: (j, a, b) for j, (a, b) in enumerate(self.cat_spans) for d in range(a, b)}
        out = []
        for dims in column_dims:
            dims = np.asarray(dims, dtype=np.int64)
            blocks = []
            for j, a, b in {block_of[int(d)] for d in dims if d >= self._cat_start}:
                if not (np.count_nonzero(typical[a:b]) == 1 and typical[a:b].max() == 1.0):
                    return None
                blocks.append((j, a + int(np.argmax(typical[a:b]))))
            out.append((dims[dims < self._cat_start], sorted(blocks)))
        return out

    def _kl_occlusion_compact(self, X: Any, occluders: list, typical: np.ndarray, max_cells: int,
                              dtype: torch.dtype) -> np.ndarray:
        n_cols = len(occluders)
        out = np.zeros((len(X), n_cols), dtype=np.float64)
        chunk = lane_chunk(min(max_cells // max(1, (n_cols + 1) * (X.head.shape[1] + X.codes.shape[1])),
                               16384 // (n_cols + 1)))      # <= ~16k encoder rows a pass: cache-sized
        typ = torch.from_numpy(np.asarray(typical, dtype=np.float32))
        with torch.inference_mode():
            for i in range(0, len(X), chunk):
                head, codes = torch.from_numpy(X.head[i:i + chunk]), torch.from_numpy(X.codes[i:i + chunk])
                real = len(head)
                head, codes = pad_rows(head), pad_rows(codes)
                m = len(head)
                head, codes = head.repeat(n_cols + 1, 1), codes.repeat(n_cols + 1, 1)
                for j, (dims, blocks) in enumerate(occluders, start=1):
                    rows = slice(j * m, (j + 1) * m)
                    if len(dims):
                        idx = torch.from_numpy(dims)
                        head[rows, idx] = typ[idx]
                    for block, dim in blocks:
                        codes[rows, block] = dim
                mu, logvar = self._encode_pass(head, codes, None, dtype)
                kl = kl_divergence(mu.float(), logvar.float()).sum(1).view(n_cols + 1, m)
                out[i:i + real] = (kl[0] - kl[1:]).clamp_min(0.0).T[:real].double().numpy()
        return out

    @torch.no_grad()
    def conditional_nll(self, X: np.ndarray, column_dims: list[np.ndarray], typical: np.ndarray,
                        batch_size: int = 4096) -> np.ndarray:
        """Each column's NLL under the decoder's prediction for the row with that column set to
        `typical` (so predicted from the other columns): ~ -log p(x_j | x_rest). (n, n_columns);
        one encoder + decoder pass per column."""
        self._eval()
        out = np.zeros((len(X), len(column_dims)), dtype=np.float64)
        typ = torch.from_numpy(np.asarray(typical, dtype=np.float32))
        for i in range(0, len(X), batch_size):
            x = torch.from_numpy(X[i:i + batch_size])
            for j, dims in enumerate(column_dims):
                idx = torch.as_tensor(dims, dtype=torch.long)
                xo = x.clone()
                xo[:, idx] = typ[idx]
                nll = self.dim_nll(x, self.decode(self.encode(xo)[0]))
                out[i:i + len(x), j] = nll[:, idx].sum(1).double().numpy()
        return out

    @torch.no_grad()
    def latent_means(self, X: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        self._eval()
        return np.concatenate([self.encode(torch.from_numpy(X[i:i + batch_size]))[0].numpy()
                               for i in range(0, len(X), batch_size)]) if len(X) else \
            np.zeros((0, self.latent_dim), dtype=np.float32)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """Draw n synthetic encoded rows: z ~ N(0, I), then sample each likelihood. (n, n_dims)"""
        self._eval()
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn((n, self.latent_dim), generator=gen)
        mean, logvar, ind_logit, cat_logit = self.decode(z)
        X = torch.zeros((n, self.n_dims))
        if len(self.num_idx):
            X[:, self.num_idx] = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        if len(self.ind_idx):
            X[:, self.ind_idx] = torch.bernoulli(torch.sigmoid(ind_logit), generator=gen)
        off = 0
        for a, b in self.cat_spans:
            logits = cat_logit[:, off:off + b - a]
            if b - a > 1:                    # the last category is <unk>: a bucket, never drawn
                logits = logits[:, :-1]
            pick = torch.multinomial(F.softmax(logits, dim=1), 1, generator=gen)[:, 0]
            X[torch.arange(n), a + pick] = 1.0
            off += b - a
        return X.numpy()
