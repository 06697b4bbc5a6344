"""fit_vae: the training loop (AdamW, KL annealing, free bits, early stopping, clipping)."""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config
from .model import VAE, kl_divergence

log = logging.getLogger(__name__)
ACTIVE_UNIT_VAR = 0.01


@dataclass
class History:
    """Per-epoch training record (lists have one entry per epoch)."""

    loss: list[float] = field(default_factory=list)
    recon_nll: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    beta: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_recon_nll: list[float] = field(default_factory=list)
    val_kl: list[float] = field(default_factory=list)
    active_units: list[int] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def beta_at(progress: float, config: Config) -> float:
    """KL weight at a training progress in [0, 1]: linear ramp 0 -> beta over `kl_warmup`."""
    if config.kl_warmup <= 0:
        return config.beta
    return config.beta * min(1.0, progress / config.kl_warmup)


def active_units(mu: torch.Tensor) -> int:
    """Latent dims whose posterior mean varies across rows (Var_x[mu] > 0.01)."""
    return int((mu.var(0) > ACTIVE_UNIT_VAR).sum()) if len(mu) > 1 else 0


def _elbo_terms(vae: VAE, x: torch.Tensor, config: Config, beta: float, noise: torch.Tensor | None):
    """(loss, recon NLL, KL) averaged over the batch; free bits floor each latent dim's mean KL."""
    x_in = x if noise is None else x + noise
    mu, logvar = vae.encode(x_in)
    z = vae.reparameterize(mu, logvar)
    recon = vae.dim_nll(x, vae.decode(z)).sum(1).mean()
    kl_dims = kl_divergence(mu, logvar).mean(0)
    kl_pen = torch.clamp(kl_dims, min=config.free_bits).sum() if config.free_bits else kl_dims.sum()
    return recon + beta * kl_pen, recon, kl_dims.sum()


def fit_vae(vae: VAE, X_train: np.ndarray, X_val: np.ndarray | None, config: Config,
            *, progress: bool = False) -> History:
    """Train `vae` in place on X_train; early-stop on X_val's loss (full beta). Returns History."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    device = next(vae.parameters()).device          # train where the model lives (CPU or CUDA)
    X = torch.from_numpy(np.ascontiguousarray(X_train, dtype=np.float32)).to(device)
    Xv = torch.from_numpy(np.ascontiguousarray(X_val, dtype=np.float32)).to(device) \
        if X_val is not None and len(X_val) else None
    n, bs, epochs = len(X), int(config.batch_size), int(config.max_epochs)
    steps_per_epoch = max(1, -(-n // bs))
    total_steps = steps_per_epoch * epochs
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    num_mask = torch.zeros(vae.n_dims, device=device)
    num_mask[vae.num_idx] = 1.0
    hist = History()
    best, best_state, bad_epochs, step = float("inf"), None, 0, 0
    warm_epochs = int(np.ceil(config.kl_warmup * epochs))
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        vae.train()
        perm = torch.randperm(n, generator=gen)
        sums = np.zeros(3)
        for i in range(0, n, bs):
            xb = X[perm[i:i + bs].to(device)]
            if len(xb) < 2 and n >= 2:
                continue
            beta = beta_at(step / total_steps, config)
            noise = (torch.randn(xb.shape, generator=gen).to(device) * config.input_noise * num_mask
                     if config.input_noise else None)
            loss, recon, kl = _elbo_terms(vae, xb, config, beta, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
            opt.step()
            step += 1
            sums += np.array([loss.item(), recon.item(), kl.item()]) * len(xb)
        sums /= n
        hist.loss.append(float(sums[0])); hist.recon_nll.append(float(sums[1]))
        hist.kl.append(float(sums[2])); hist.beta.append(float(beta))
        vae.eval()
        with torch.no_grad():
            ref = Xv if Xv is not None else X[: min(n, 4096)]
            mu, logvar = vae.encode(ref)
            v_recon = vae.dim_nll(ref, vae.decode(mu)).sum(1).mean().item()
            v_kl = kl_divergence(mu, logvar).mean(0).sum().item()
            hist.active_units.append(active_units(mu))
        v_loss = v_recon + config.beta * v_kl
        hist.val_loss.append(v_loss); hist.val_recon_nll.append(v_recon); hist.val_kl.append(v_kl)
        bar.set_postfix(loss=f"{sums[0]:.3f}", val=f"{v_loss:.3f}", au=hist.active_units[-1])
        if not np.isfinite(sums[0]):
            log.warning("training loss became non-finite at epoch %d; keeping the best weights", epoch)
            break
        if epoch + 1 < warm_epochs:        # early stopping starts once beta reached its target
            continue
        if not np.isfinite(best) or v_loss < best - 1e-4 * abs(best):
            best, best_state, bad_epochs, hist.best_epoch = v_loss, copy.deepcopy(vae.state_dict()), 0, epoch
        else:
            bad_epochs += 1
            if bad_epochs >= config.patience:
                hist.stopped_early = True
                break
    bar.close()
    if best_state is not None:
        vae.load_state_dict(best_state)
    vae.eval()
    hist.seconds = time.perf_counter() - t0
    log.info("trained %d epochs in %.1fs (best epoch %d, val loss %.4f, active units %d/%d)",
             len(hist.loss), hist.seconds, hist.best_epoch + 1, best, hist.active_units[-1], vae.latent_dim)
    return hist
