"""Config: the one frozen dataclass holding every hyperparameter of a fit."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError

NUMERIC_TRANSFORMS = ("yeo-johnson", "standard", "robust", "signed-log", "quantile")
SCORE_METHODS = ("elbo", "recon", "iwae")
PRECISIONS = ("float32", "bfloat16", "auto")
OBJECTIVES = ("elbo", "masked", "ae")
DEFAULT_HIDDEN = (128, 64)   # hidden layer widths unless `hidden` is given (see Config.resolve)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Hyperparameters of one fit. ``None`` means "resolve from the data" (see `resolve`)."""

    # architecture
    latent_dim: int | None = None
    hidden: tuple[int, ...] | None = None
    var_floor: float = 1e-2           # lower bound on a numeric feature's decoded variance
    heteroscedastic: bool = False     # decoder variance depends on z (True) or is one per feature
    dropout: float = 0.0
    # objective: "elbo" (VAE), "masked" (masked-cell VAE: hidden cells predicted from the
    # visible ones, scored as conditional per-column terms), "ae" (plain autoencoder: z = mu, no KL)
    objective: str = "elbo"
    mask_fraction: float = 0.25       # masked: fraction of columns hidden per row (train and score)
    mask_rounds: int = 1              # masked: scoring partitions; each hides every column once
    swap_noise: float = 0.0           # denoising: probability a cell is swapped with another row's
    beta: float = 1.0
    kl_warmup: float = 0.25           # fraction of epochs over which beta ramps from 0 to beta
    free_bits: float = 0.0            # nats per latent dim below which KL is not penalised
    input_noise: float = 0.0          # denoising: std of Gaussian noise on numeric inputs
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int | None = None
    max_epochs: int | None = None
    step_budget: int = 4000           # optimiser steps aimed for when max_epochs is None
    patience: int = 15
    grad_clip: float = 5.0
    # preprocessing
    numeric_transform: str = "standard"
    max_categories: int = 64
    min_category_count: int = 5
    # scoring / calibration
    score_method: str = "elbo"
    n_importance_samples: int = 16
    target_fpr: float = 0.01
    contamination: float | None = None
    calibration_fraction: float = 0.15
    validation_fraction: float = 0.1
    top_k: int = 3
    # runtime
    seed: int = 0
    n_threads: int | None = None
    device: str = "auto"              # auto = CUDA when available, else CPU; or cpu, cuda, cuda:N
    precision: str = "auto"           # scoring MLP precision: auto (bf16 where faster: model.cpu_bf16_is_faster), float32, bfloat16

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        if self.hidden is not None:
            object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
            if not self.hidden or min(self.hidden) < 1:
                raise bad("hidden", "expected a non-empty tuple of positive layer widths")
        if self.latent_dim is not None and self.latent_dim < 1:
            raise bad("latent_dim", "expected a positive integer")
        for name in ("lr", "var_floor"):
            if not getattr(self, name) > 0:
                raise bad(name, "expected > 0")
        for name in ("beta", "free_bits", "input_noise", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise bad(name, "expected >= 0")
        for name in ("kl_warmup", "dropout", "swap_noise"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "expected a fraction in [0, 1)")
        if not 0 < self.target_fpr < 1:
            raise bad("target_fpr", "expected a false-positive rate in (0, 1), e.g. 0.01")
        if self.contamination is not None and not 0 < self.contamination < 0.5:
            raise bad("contamination", "expected None or a fraction in (0, 0.5)")
        for name in ("calibration_fraction", "validation_fraction"):
            if not 0 <= getattr(self, name) < 0.5:
                raise bad(name, "expected a fraction in [0, 0.5)")
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, "expected None or a positive integer")
        for name in ("step_budget", "patience", "max_categories", "min_category_count",
                     "n_importance_samples", "top_k", "mask_rounds"):
            if getattr(self, name) < 1:
                raise bad(name, "expected a positive integer")
        if self.numeric_transform not in NUMERIC_TRANSFORMS:
            raise bad("numeric_transform", f"expected one of {NUMERIC_TRANSFORMS}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise bad("device", "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"expected one of {PRECISIONS}")
        if self.score_method not in SCORE_METHODS:
            raise bad("score_method", f"expected one of {SCORE_METHODS}")
        if self.objective not in OBJECTIVES:
            raise bad("objective", f"expected one of {OBJECTIVES}")
        if not 0 < self.mask_fraction < 1:
            raise bad("mask_fraction", "expected a fraction in (0, 1)")
        if self.objective != "elbo" and self.score_method == "iwae":
            raise bad("score_method", f"'iwae' estimates -log p(x) of the ELBO model; with objective "
                                      f"'{self.objective}' use 'elbo' or 'recon'")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Build a Config from a plain dict (JSON, TOML, CLI), naming unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["hidden"] is not None:
            out["hidden"] = list(out["hidden"])
        return out

    def resolve(self, n_rows: int, n_features: int) -> "Config":
        """Fill data-dependent defaults (documented rule, the same for every dataset).

        - hidden: two layers, 128 then 64, whatever the width (benchmarks/README, "Hidden
          width": better than clip(2 * n_features, 64, 256) on the 15 datasets, and half the
          network cost of wide tables)
        - latent_dim: clip(n_features // 4, 8, 16)
        - batch_size: clip(n_rows // 32, 32, 256)
        - max_epochs: enough epochs for ~step_budget optimiser steps, clipped to [20, 400]
        """
        from dataclasses import replace

        hidden = self.hidden or DEFAULT_HIDDEN
        latent = self.latent_dim or int(min(max(n_features // 4, 8), 16))
        batch = self.batch_size or int(min(max(n_rows // 32, 32), 256))
        steps_per_epoch = max(1, math.ceil(n_rows / batch))
        epochs = self.max_epochs or int(min(max(math.ceil(self.step_budget / steps_per_epoch), 20), 400))
        return replace(self, hidden=hidden, latent_dim=latent, batch_size=batch, max_epochs=epochs)
