"""MaskedVAE: the masked-cell VAE. Cells are hidden and scored given the visible ones.

Training hides a random subset of columns in every row (all dims of a column at once: its
value, its missing indicator, its one-hot block) and trains the decoder likelihood on the
hidden cells only, with the KL term as in the ELBO. The encoder sees the visible cells plus
one mask-indicator input per column; its first layer's weights on that input are in effect a
learned mask token for each column (so per column kind as well). A value that was *missing*
in the data stays visible as "missing" (indicator 1, median value): hidden and missing differ.

Scoring uses a few deterministic masks that together hide every column (``score_masks``): a
column's term is its -log p(x_j | visible cells) averaged over the masks that hide it, and the
KL term is averaged over all masks, so score = sum of column terms + KL still holds.
"""
from __future__ import annotations

import numpy as np
import torch

from .model import VAE, DecoderParams, kl_divergence, lane_chunk, pad_rows


def hidden_per_mask(n_columns: int, mask_fraction: float) -> int:
    """Columns hidden per row: round(mask_fraction * n_columns), at least 1, at most n - 1."""
    return int(min(max(round(mask_fraction * n_columns), 1), max(n_columns - 1, 1)))


def score_masks(n_columns: int, mask_fraction: float, rounds: int = 1, seed: int = 0) -> np.ndarray:
    """Deterministic scoring masks. (n_masks, n_columns) bool, True = hidden.

    Each round is a seeded permutation of the columns cut into groups of
    `hidden_per_mask` columns; one mask per group, so every column is hidden exactly
    `rounds` times and each mask hides as many columns as a training mask does.
    """
    k = hidden_per_mask(n_columns, mask_fraction)
    rng = np.random.RandomState(seed)
    masks = []
    for _ in range(rounds):
        perm = rng.permutation(n_columns)
        for start in range(0, n_columns, k):
            m = np.zeros(n_columns, dtype=bool)
            m[perm[start:start + k]] = True
            masks.append(m)
    return np.stack(masks)


def random_masks(n_rows: int, n_columns: int, n_hidden: int, gen: torch.Generator) -> torch.Tensor:
    """Training masks: each row hides `n_hidden` columns drawn uniformly. (n_rows, n_columns) float."""
    ranks = torch.rand((n_rows, n_columns), generator=gen).argsort(dim=1).argsort(dim=1)
    return (ranks < n_hidden).to(torch.float32)


class MaskedVAE(VAE):
    """VAE whose encoder also takes a per-column hidden mask (see the module docstring).

    `owner` (n_dims,) maps each encoded dim to its column (`Preprocessor.dim_to_column`).
    Without a mask, `encode(x)` treats every cell as visible.
    """

    def __init__(self, n_dims: int, numeric_dims: np.ndarray, indicator_dims: np.ndarray,
                 categorical_spans: list[tuple[int, int]], numeric_indicator: np.ndarray,
                 owner: np.ndarray, mask_fraction: float = 0.25, mask_rounds: int = 1,
                 mask_seed: int = 0, **kwargs) -> None:
        super().__init__(n_dims, numeric_dims, indicator_dims, categorical_spans, numeric_indicator, **kwargs)
        owner = np.asarray(owner, dtype=np.int64)
        self.n_columns = int(owner.max()) + 1 if len(owner) else 0
        self.mask_fraction, self.mask_rounds, self.mask_seed = mask_fraction, mask_rounds, mask_seed
        self.register_buffer("owner", torch.as_tensor(owner, dtype=torch.long), persistent=False)
        hidden = kwargs.get("hidden", (64, 32))
        # the encoder's first layer sees [visible cells, mask indicators]
        self.encoder[0] = torch.nn.Linear(n_dims + self.n_columns, hidden[0])

    @classmethod
    def from_config(cls, pre, config) -> "MaskedVAE":
        return cls.from_preprocessor(pre, owner=pre.dim_to_column(), mask_fraction=config.mask_fraction,
                                     mask_rounds=config.mask_rounds, mask_seed=config.seed,
                                     hidden=config.hidden, latent_dim=config.latent_dim,
                                     var_floor=config.var_floor, dropout=config.dropout,
                                     heteroscedastic=config.heteroscedastic)

    @property
    def n_hidden(self) -> int:
        return hidden_per_mask(self.n_columns, self.mask_fraction)

    def encode(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, n_dims), hidden (n, n_columns) 1 = hidden (None: all visible) -> mu, logvar (n, k)."""
        if hidden is None:
            hidden = x.new_zeros((len(x), self.n_columns))
        visible = 1.0 - hidden[:, self.owner]
        return super().encode(torch.cat([x * visible, hidden], dim=1))

    def masked_loss(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training terms for one batch: (hidden-cell NLL (n,), KL per latent dim (n, k)).

        The hidden cells' NLL is scaled by n_columns / n_hidden, an unbiased estimate of the sum
        of every column's conditional NLL, i.e. of the recon part of the score.
        """
        mu, logvar = self.encode(x, hidden)
        z = self.reparameterize(mu, logvar)
        nll = (self.dim_nll(x, self.decode(z)) * hidden[:, self.owner]).sum(1)
        return nll * (self.n_columns / hidden.sum(1).clamp_min(1.0)), kl_divergence(mu, logvar)

    @torch.no_grad()
    def masked_score_terms(self, X: np.ndarray, batch_size: int = 4096, return_params: bool = False):
        """Deterministic conditional terms with the `score_masks` masks, z = posterior mean.

        Returns dim_nll (n, n_dims): each dim's NLL averaged over the masks hiding its column,
        and kl (n,): KL averaged over all masks (so dim_nll.sum(1) + kl is the score); with
        return_params, also the `model.DecoderParams` those dims were scored with (averaged
        likewise): (nll, kl, params), as `VAE.score_terms` returns them.
        """
        self._eval()
        device = self.owner.device
        masks = torch.from_numpy(score_masks(self.n_columns, self.mask_fraction, self.mask_rounds,
                                             self.mask_seed).astype(np.float32)).to(device)
        n_masks = len(masks)
        dim_masks = masks[:, self.owner]                             # (M, n_dims)
        dim_weight = dim_masks / dim_masks.sum(0).clamp_min(1.0)     # averages over hiding masks
        nll_out = np.empty((len(X), self.n_dims), dtype=np.float32)
        kl_out = np.empty(len(X), dtype=np.float32)
        params_out = [] if return_params else None
        n_num = self._splits[0]
        chunk = lane_chunk(batch_size // n_masks)
        for i in range(0, len(X), chunk):
            x = pad_rows(torch.from_numpy(np.ascontiguousarray(X[i:i + chunk])).to(device))
            m, real = len(x), len(X[i:i + chunk])
            xs = x.repeat(n_masks, 1)
            hidden = masks.repeat_interleave(m, dim=0)
            mu, logvar = self.encode(xs, hidden)
            params = self.decode(mu)
            w = dim_weight.repeat_interleave(m, dim=0)               # (M * m, n_dims)
            nll = (self.dim_nll(xs, params) * w).view(n_masks, m, -1).sum(0)
            nll_out[i:i + real] = nll[:real].cpu().numpy()
            kl_out[i:i + real] = kl_divergence(mu, logvar).sum(1).view(n_masks, m).mean(0)[:real].cpu().numpy()
            if return_params:
                params_out.append([p[:real] for p in self._params_per_column(params, w, n_masks, m, n_num)])
        if not return_params:
            return nll_out, kl_out
        joined = [np.concatenate([p[j] for p in params_out]) if params_out else
                  np.zeros((0, 0), dtype=np.float32) for j in range(4)]
        return nll_out, kl_out, DecoderParams(*joined)

    def _params_per_column(self, params, w: torch.Tensor, n_masks: int, m: int, n_num: int):
        """Decoder params weighted by the masks that hid each dim's column, summed over masks."""
        mean, logvar, ind_logit, cat_logit = params
        w = w.view(n_masks, m, -1)
        out = []
        for value, idx in ((mean, self.num_idx), (logvar, self.num_idx), (ind_logit, self.ind_idx),
                           (cat_logit, self.cat_idx)):
            out.append((value.view(n_masks, m, -1) * w[:, :, idx]).sum(0).cpu().numpy())
        return out


def masked_val_terms(vae: MaskedVAE, X: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """Validation (recon, KL) means with the deterministic scoring masks, and mu with nothing
    hidden (for the active-unit count)."""
    nll, kl = vae.masked_score_terms(X.cpu().numpy())
    mu, _ = vae.encode(X)
    return float(nll.sum(1).mean()), float(kl.mean()), mu


def build_vae(pre, config) -> VAE:
    """The network for a fitted preprocessor and a resolved Config: a `MaskedVAE` for
    objective "masked", else a `VAE`."""
    return (MaskedVAE if config.objective == "masked" else VAE).from_config(pre, config)
