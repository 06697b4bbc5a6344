"""VAEAnomalyDetector: the sklearn-style estimator wiring schema -> preprocess -> VAE -> scorer."""
from __future__ import annotations

import copy
import logging
import os
import sys
import time
from dataclasses import fields
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from . import explain as E
from . import score as S
from .config import PRECISIONS, Config
from .drift import numeric_fractions
from .errors import ConfigError, DataError
from .evaluate import anomaly_mask
from .masked import build_vae
from .model import VAE, resolve_device, scoring_dtype
from .preprocess import Encoded, Preprocessor, dense
from .sample import fit_marginals, sample_rows
from .schema import Schema, as_frame, infer_schema, validate_arrow
from .train import History, fit_vae

log = logging.getLogger(__name__)
_CONFIG_FIELDS = {f.name for f in fields(Config)} - {"seed"}
MIN_ROWS_FOR_HOLDOUT = 50


class VAEAnomalyDetector(OutlierMixin, BaseEstimator):
    """Variational-autoencoder anomaly detector for mixed-type tables.

    Fit on normal rows (rows with label 1 are dropped when ``y`` or ``label`` is given);
    ``anomaly_score`` is reconstruction NLL + KL in nats (higher = stranger), and rows
    above ``threshold_`` (calibrated on held-out normal rows at ``target_fpr``) are flagged.
    sklearn's sign convention holds for ``score_samples`` / ``decision_function`` / ``predict``.

    ``verbose`` (default ``False``: `fit` prints nothing): with ``True``, `fit` shows a
    ``tqdm.auto`` progress bar (a widget in Jupyter, text in a terminal) with the epoch, the
    training and validation loss and the active latent units, and writes one summary line when
    it ends (epochs, best epoch, fit seconds, threshold). Figures of a fitted detector:
    `plot_loss_curves`, `plot_score_histogram`, `plot_column_error` (matplotlib Figures).
    """

    def __init__(self, *, latent_dim: int | None = None, hidden: tuple[int, ...] | None = None,
                 objective: str = "elbo", mask_fraction: float = 0.25, mask_rounds: int = 1,
                 swap_noise: float = 0.0, beta: float = 1.0, kl_warmup: float = 0.25, free_bits: float = 0.0,
                 input_noise: float = 0.0, var_floor: float = 1e-2, heteroscedastic: bool = False,
                 dropout: float = 0.0,
                 lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int | None = None,
                 max_epochs: int | None = None, step_budget: int = 4000, patience: int = 15,
                 grad_clip: float = 5.0, numeric_transform: str = "standard",
                 max_categories: int = 64, min_category_count: int = 5, score_method: str = "elbo",
                 n_importance_samples: int = 16, target_fpr: float = 0.01,
                 contamination: float | None = None, calibration_fraction: float = 0.15,
                 validation_fraction: float = 0.1, top_k: int = 3,
                 categorical: tuple[str, ...] | None = None, exclude: tuple[str, ...] | None = None,
                 id_cols: tuple[str, ...] | None = None, label: str | None = None,
                 random_state: int | None = None, n_threads: int | None = None,
                 device: str = "auto", precision: str = "auto",
                 verbose: bool = False) -> None:
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.objective = objective
        self.mask_fraction = mask_fraction
        self.mask_rounds = mask_rounds
        self.swap_noise = swap_noise
        self.beta = beta
        self.kl_warmup = kl_warmup
        self.free_bits = free_bits
        self.input_noise = input_noise
        self.var_floor = var_floor
        self.heteroscedastic = heteroscedastic
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.step_budget = step_budget
        self.patience = patience
        self.grad_clip = grad_clip
        self.numeric_transform = numeric_transform
        self.max_categories = max_categories
        self.min_category_count = min_category_count
        self.score_method = score_method
        self.n_importance_samples = n_importance_samples
        self.target_fpr = target_fpr
        self.contamination = contamination
        self.calibration_fraction = calibration_fraction
        self.validation_fraction = validation_fraction
        self.top_k = top_k
        self.categorical = categorical
        self.exclude = exclude
        self.id_cols = id_cols
        self.label = label
        self.random_state = random_state
        self.n_threads = n_threads
        self.device = device
        self.precision = precision
        self.verbose = verbose

    # ----------------------------------------------------------------- fit
    def _config(self) -> Config:
        values = {k: v for k, v in self.get_params().items() if k in _CONFIG_FIELDS}
        seed = self.random_state if self.random_state is not None else 0
        if not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"random_state must be an int or None, got {type(seed).__name__}")
        return Config(**values, seed=int(seed))

    def fit(self, X: Any, y: Any = None) -> "VAEAnomalyDetector":
        """Fit on X (DataFrame, Arrow table or 2-D array). Rows with y == 1 are excluded."""
        config = self._config()
        t0 = time.perf_counter()
        df = as_frame(X)
        self._from_array = not isinstance(X, pd.DataFrame) and not hasattr(X, "schema")
        if len(df) < 2:
            raise DataError(f"n_samples={len(df)}: need at least 2 training rows")
        df, y = self._split_label(df, y)
        if y is not None:
            df = df.loc[~y].reset_index(drop=True)
            if len(df) < 2:
                raise DataError(f"only {len(df)} rows left after removing rows labelled anomalous; "
                                "need at least 2 normal training rows")
        self.schema_ = infer_schema(df, categorical=self.categorical or (), exclude=self.exclude or (),
                                    id_cols=self.id_cols or (), label=self.label)
        data = self.schema_.validate(df, source="training data")
        self.feature_names_in_ = np.asarray([c.name for c in self.schema_.features], dtype=object)
        self.n_features_in_ = len(self.feature_names_in_)

        train_idx, val_idx, cal_idx = self._split(len(data), config)
        self.preprocessor_ = Preprocessor(config.numeric_transform, config.max_categories,
                                          config.min_category_count).fit(data.iloc[train_idx], self.schema_)
        X_all = self.preprocessor_.encode(data)
        self.config_ = config.resolve(len(train_idx), self.preprocessor_.n_varying_dims)
        torch.set_num_threads(_train_threads(self.config_))
        torch.manual_seed(self.config_.seed)
        self.vae_ = build_vae(self.preprocessor_, self.config_).to(resolve_device(self.config_.device))
        self.history_: History = fit_vae(self.vae_, X_all[train_idx], X_all[val_idx] if len(val_idx) else None,
                                         self.config_, progress=self.verbose,
                                         column_of_dim=self.preprocessor_.dim_to_column())
        self.vae_ = self.vae_.cpu()          # kept (and saved) on the CPU; scoring moves a copy
        torch.set_num_threads(self.config_.n_threads or os.cpu_count() or 1)
        self._calibrate(X_all, train_idx, cal_idx)
        self.reference_ = _reference_profile(data.iloc[train_idx], self.schema_, self.preprocessor_)
        self.marginals_ = fit_marginals(data.iloc[train_idx], self.schema_)
        self.fit_seconds_ = time.perf_counter() - t0
        if self.verbose:
            h = self.history_
            # the one fit time of this fit (the CLI prints the same number)
            tqdm.write(f"fit: {len(h.loss)} epochs (best {h.best_epoch + 1}"
                       f"{', stopped early' if h.stopped_early else ''}), {len(train_idx):,} training rows, "
                       f"{self.fit_seconds_:.1f} s; threshold {self.threshold_:.4f} nats at target FPR "
                       f"{self.calibration_.get('target_fpr')}", file=sys.stderr)
        return self

    def _split_label(self, df: pd.DataFrame, y: Any) -> tuple[pd.DataFrame, np.ndarray | None]:
        name = "y"
        if self.label is not None and self.label in df.columns:
            if y is not None:
                raise DataError(f"labels given twice: as y and as the label column '{self.label}'; "
                                "pass one of them")
            y, name = df[self.label], f"column '{self.label}'"
            df = df.drop(columns=[self.label])
        if y is None:
            return df, None
        y = np.asarray(y)
        if y.shape[0] != len(df):
            raise DataError(f"y has {y.shape[0]} labels for {len(df)} rows")
        return df, anomaly_mask(y, name, strict=name != "y")

    def _split(self, n: int, config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shuffle rows into train / validation (early stopping) / calibration (threshold)."""
        perm = np.random.RandomState(config.seed).permutation(n)
        if n < MIN_ROWS_FOR_HOLDOUT:
            log.warning("only %d rows: no held-out calibration set; threshold is calibrated on "
                        "training rows and will be optimistic", n)
            return perm, perm[:0], perm
        n_cal = int(round(config.calibration_fraction * n))
        n_val = int(round(config.validation_fraction * n))
        cal, val, train = perm[:n_cal], perm[n_cal:n_cal + n_val], perm[n_cal + n_val:]
        return np.sort(train), np.sort(val), np.sort(cal if n_cal else train)

    def _calibrate(self, X_all: np.ndarray, train_idx: np.ndarray, cal_idx: np.ndarray) -> None:
        terms = self._terms_from_X(X_all, attribute=False)
        cal_scores = terms.anomaly_score[cal_idx]
        held_out = not np.array_equal(cal_idx, train_idx)
        self.column_median_ = np.median(terms.column_nll[cal_idx], axis=0)
        self.typical_x_ = _typical_row(X_all[cal_idx], self.preprocessor_.categorical_spans)
        if self.config_.contamination is not None:
            self.threshold_ = S.contamination_threshold(terms.anomaly_score, self.config_.contamination)
            method = "contamination"
        else:
            self.threshold_ = S.calibrate_threshold(cal_scores, self.config_.target_fpr)
            method = "conformal"
        self.calibration_scores_ = np.sort(cal_scores[np.isfinite(cal_scores)])
        self.offset_ = -self.threshold_
        self.calibration_ = {
            "method": method, "target_fpr": self.config_.target_fpr,
            "contamination": self.config_.contamination, "threshold": self.threshold_,
            "n_calibration": int(len(cal_idx)), "held_out": bool(held_out),
            "calibration_flag_rate": float(np.mean(cal_scores > self.threshold_)),
            "train_flag_rate": float(np.mean(terms.anomaly_score[train_idx] > self.threshold_)),
        }

    # ------------------------------------------------------------- scoring
    def _frame(self, X: Any) -> pd.DataFrame:
        check_is_fitted(self, "vae_")
        df = as_frame(X)
        if not isinstance(X, pd.DataFrame) and not hasattr(X, "schema") and df.shape[1] != self.n_features_in_:
            raise DataError(f"X has {df.shape[1]} features, but {type(self).__name__} is expecting "
                            f"{self.n_features_in_} features as input")
        return self.schema_.validate(df)

    def _terms_from_X(self, X: np.ndarray | Encoded, attribute: bool = True) -> S.ScoreTerms:
        """Score terms of encoded rows (dense X, or `Encoded` from `Preprocessor.encode_compact`)."""
        owner = self.preprocessor_.dim_to_column()
        n_cols = len(self.preprocessor_.spans)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: expected one of {PRECISIONS}")
        device = resolve_device(self.device)
        if self.precision == "bfloat16" and device.type == "cpu" and not _warned_bf16:
            _warn_slow_bf16()
        col_nll, kl = self._model_terms(X, owner, n_cols, device)
        terms = S.scores_from_columns(col_nll, kl)
        if self.config_.score_method == "recon":
            terms = terms._replace(anomaly_score=terms.recon_nll)
        elif self.config_.score_method == "iwae":
            iw = self.vae_.iwae_nll(dense(X), self.config_.n_importance_samples, seed=self.config_.seed)
            terms = terms._replace(anomaly_score=iw)
        if not attribute:       # calibration runs before a threshold exists
            return terms
        return self._attribute_kl(terms, X)

    def _attribute_kl(self, terms: S.ScoreTerms, X: np.ndarray | Encoded) -> S.ScoreTerms:
        """`terms` with column_kl for the flagged rows: the KL term has no column of its own,
        so each column is charged the KL it causes (how much KL falls when that column alone
        takes its typical value). A plain autoencoder has no KL to attribute."""
        flagged = terms.anomaly_score > self.threshold_
        if self.typical_x_ is None or self.config_.objective == "ae" or not flagged.any():
            return terms
        owner = self.preprocessor_.dim_to_column()
        column_kl = np.zeros(terms.column_nll.shape)
        column_kl[flagged] = self.vae_.kl_occlusion(
            X.take(flagged) if isinstance(X, Encoded) else X[flagged], [np.flatnonzero(owner == j) for j in range(len(self.preprocessor_.spans))],
            self.typical_x_, dtype=scoring_dtype(self.precision, torch.device("cpu")))
        return terms._replace(column_kl=column_kl)

    def _vae_on(self, device: torch.device) -> VAE:
        """The fitted network on `device` (a cached copy off the CPU)."""
        if device.type == "cpu":
            return self.vae_
        cached = getattr(self, "_device_vae", None)
        if cached is None or cached[0] != device or cached[1] is not self.vae_:
            self._device_vae = (device, self.vae_, copy.deepcopy(self.vae_).to(device))
        return self._device_vae[2]

    def _model_terms(self, X: np.ndarray, owner: np.ndarray, n_cols: int,
                     device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """Per-column NLL (n, n_cols) and KL (n,) the way the objective scores: the ELBO's terms at
        z = mu; conditional terms under deterministic masks (masked); no KL (plain autoencoder)."""
        objective = self.config_.objective
        if objective == "masked":
            dim_nll, kl = self.vae_.masked_score_terms(dense(X))      # CPU, float32
            return S.column_nll(dim_nll, owner, n_cols), kl
        col_nll, kl = self._vae_on(device).column_terms(X, owner, n_cols, precision=self.precision,
                                                        device=device)
        return (col_nll, np.zeros_like(kl)) if objective == "ae" else (col_nll, kl)

    def decoder_params(self, X: Any):
        """Decoder parameters each column was scored with, per row (`model.DecoderParams`):
        for objective "masked" those of the masks hiding the column, else those at z = mu."""
        check_is_fitted(self, "vae_")
        x = self.preprocessor_.encode(self._frame(X))
        if self.config_.objective == "masked":
            return self.vae_.masked_score_terms(x, return_params=True)[2]
        return self.vae_.score_terms(x, return_params=True)[2]

    def score_terms(self, X: Any) -> S.ScoreTerms:
        """anomaly_score, recon_nll, kl and per-column NLL for each row of X."""
        check_is_fitted(self, "vae_")
        return self._terms_from_X(self._encode(X))

    def _encode(self, X: Any) -> np.ndarray:
        """Validated, encoded rows (n, n_dims); Arrow tables and record batches skip pandas."""
        if hasattr(X, "schema") and hasattr(X, "column") and not isinstance(X, pd.DataFrame):
            return self.preprocessor_.encode(validate_arrow(self.schema_, X))
        return self.preprocessor_.encode(self._frame(X))

    def anomaly_score(self, X: Any) -> np.ndarray:
        """Reconstruction NLL + KL in nats; higher = stranger. (n,)"""
        return self.score_terms(X).anomaly_score

    def score_samples(self, X: Any) -> np.ndarray:
        """sklearn convention: higher = more normal (= -anomaly_score)."""
        return -self.anomaly_score(X)

    def decision_function(self, X: Any) -> np.ndarray:
        """score_samples - offset_; negative values are flagged as anomalies."""
        return self.score_samples(X) - self.offset_

    def predict(self, X: Any) -> np.ndarray:
        """+1 normal, -1 anomaly."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    def p_value(self, X: Any) -> np.ndarray:
        return S.p_values(self.anomaly_score(X), self.calibration_scores_)

    def explain(self, X: Any, top_k: int | None = None, explain_all: bool = False) -> pd.DataFrame:
        """Score table: anomaly_score, recon_nll, kl, p_value, is_anomaly, top_features, explanation.

        top_features lists the columns with the largest contributions, as 'column:+nats'
        separated by ';'. A contribution is the column's NLL above its median on calibration
        normals; for flagged rows it also counts the KL the column causes (the drop in KL when
        that column alone is set to its typical calibration value), so a value the encoder maps
        far into the latent space is named even when it is reconstructed well.

        explanation (pandas ArrowDtype list<struct>, see `anomaly_vae.explain`) gives, for
        flagged rows (all rows with explain_all=True), each top_features column with its value,
        the model's expected value (numeric: 5-95% interval; categorical: most likely category
        and its probability) and a rendered `text`; `explain.to_frame` makes it long format.
        """
        frame = self._frame(X)
        X_enc = self.preprocessor_.encode(frame)
        table = self.score_table(self._terms_from_X(X_enc), top_k, values=frame, X=X_enc,
                                 explain_all=explain_all)
        if isinstance(X, pd.DataFrame):
            table.index = X.index              # so df.join(det.explain(df)) lines up
        return table

    def score_table(self, terms: S.ScoreTerms, top_k: int | None = None, *, values: Any = None,
                    X: np.ndarray | None = None, explain_all: bool = False,
                    X_rows: np.ndarray | None = None) -> pd.DataFrame:
        """The score columns for `terms`. With `X` (the encoded rows `terms` came from) also
        `explanation`: for flagged rows (every row with explain_all=True) the top_features
        columns with value and expected value (`explain.ENTRY_TYPE`), an empty list otherwise;
        `values` (DataFrame or Arrow batch of the same rows) gives the values shown.
        `X_rows` (positions, ascending) says X holds only those rows; they must include every
        flagged row (what streaming scoring keeps, so it explains a whole batch at once)."""
        contrib = S.feature_contributions(terms, self.column_median_)
        names = [s.column for s in self.preprocessor_.spans]
        k = top_k or self.config_.top_k
        is_anomaly = terms.anomaly_score > self.threshold_
        table = pd.DataFrame({
            "anomaly_score": terms.anomaly_score,
            "recon_nll": terms.recon_nll,
            "kl": terms.kl,
            "p_value": S.p_values(terms.anomaly_score, self.calibration_scores_),
            "is_anomaly": is_anomaly,
            "top_features": S.top_features(contrib, names, k),
        })
        if X is not None:
            if X_rows is not None:
                if explain_all:
                    raise ValueError("explain_all needs X for every row, not X_rows")
                X = _RowsOf(X, X_rows, len(is_anomaly))
            ex = self._explanation(X, values, contrib, k, None if explain_all else is_anomaly)
            table["explanation"] = pd.Series(pd.arrays.ArrowExtensionArray(ex), index=table.index)
        return table

    def _explanation(self, X: np.ndarray, values: Any, contrib: np.ndarray, k: int,
                     rows: np.ndarray | None) -> Any:
        """list<struct> explanation per row. The expected value of a column is the decoder's
        prediction for the row with that column set to its typical value (so it comes from
        the other columns; at z = mu the VAE partly echoes the odd value back)."""
        entries = E.select_entries(contrib, k, rows)
        Xe = X[entries.row]
        if self.typical_x_ is not None:
            Xe = E.occlude(Xe, entries.column, self.preprocessor_.dim_to_column(), self.typical_x_)
        _, _, params = self.vae_.score_terms(Xe, return_params=True)
        shown = None if values is None else {c.name: values[c.name] for c in self.schema_.features}
        return E.explanations(entries, params, self.preprocessor_, shown)

    def contributions(self, X: Any) -> pd.DataFrame:
        """Per-column contribution in nats, one column per feature: the column's NLL above its
        calibration median, plus (flagged rows) the KL the column causes."""
        terms = self.score_terms(X)
        contrib = S.feature_contributions(terms, self.column_median_)
        return pd.DataFrame(contrib, columns=[s.column for s in self.preprocessor_.spans],
                            index=X.index if isinstance(X, pd.DataFrame) else None)

    def conditional_nll(self, X: Any) -> pd.DataFrame:
        """Per-column surprisal of each value given the rest of the row, in nats: the column's
        NLL when the decoder predicts it with the column itself set to its typical value.
        One network pass per column (benchmarks/explain.py compares it with `contributions`)."""
        owner = self.preprocessor_.dim_to_column()
        names = [s.column for s in self.preprocessor_.spans]
        nll = self.vae_.conditional_nll(self.preprocessor_.encode(self._frame(X)),
                                        [np.flatnonzero(owner == j) for j in range(len(names))],
                                        self.typical_x_)
        return pd.DataFrame(nll, columns=names, index=X.index if isinstance(X, pd.DataFrame) else None)

    # ----------------------------------------------------------------- figures
    def plot_loss_curves(self) -> Any:
        """Training curves per epoch (1-based): loss and validation loss; reconstruction NLL and
        KL; KL weight beta with the active latent units. A `matplotlib.figure.Figure` with
        three axes (display it in a notebook, or ``fig.savefig("loss.png")``)."""
        from . import plots

        check_is_fitted(self, "vae_")
        return plots.loss_curves(self.history_)

    def plot_score_histogram(self, X: Any, y: Any = None) -> Any:
        """Histogram of ``anomaly_score`` on rows X with the threshold as a dashed line; normal
        vs anomalous rows (densities) when labels are given as `y` or as the model's label
        column in X. A `matplotlib.figure.Figure`."""
        from . import plots

        check_is_fitted(self, "vae_")
        df, labels = self._split_label(as_frame(X), y)
        return plots.score_histogram(self.anomaly_score(df), labels, self.threshold_)

    def plot_column_error(self, X: Any, y: Any = None, max_columns: int = 30) -> Any:
        """Mean contribution of each column (its NLL minus its median on calibration rows, nats)
        on rows X, largest first, anomalous rows as their own bars when labels are given (`y`
        or the label column). A `matplotlib.figure.Figure`."""
        from . import plots

        check_is_fitted(self, "vae_")
        df, labels = self._split_label(as_frame(X), y)
        return plots.column_error(self, self.contributions(df), y=labels, contributions=True,
                                  max_columns=max_columns)

    def encode(self, X: Any) -> np.ndarray:
        """Latent means (n, latent_dim)."""
        return self.vae_.latent_means(self.preprocessor_.encode(self._frame(X)))

    def sample(self, n: int, seed: int = 0) -> pd.DataFrame:
        """n synthetic rows in the original schema: z ~ N(0, I), each column drawn from the
        decoder, numeric columns mapped onto their training marginals by rank, timestamps with
        the model's hour and weekday on a date in the training range (see `anomaly_vae.sample`)."""
        check_is_fitted(self, "vae_")
        return sample_rows(self.vae_, self.preprocessor_, getattr(self, "marginals_", {}), n, seed)

    # --------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> str:
        """Write a pickle-free model directory atomically; returns its path."""
        from .persist import save_model
        return save_model(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VAEAnomalyDetector":
        """Load a directory written by `save`, verifying format version and file hashes."""
        from .persist import load_model
        return load_model(path, cls)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.non_deterministic = False
        return tags


_warned_bf16: list[bool] = []


def _warn_slow_bf16() -> None:
    from .model import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        log.warning("precision bfloat16: this CPU has no native bf16 (avx512_bf16/amx), so torch "
                    "emulates it and scoring is several times slower than float32; use float32 here")
    _warned_bf16.append(True)


def _train_threads(config: Config) -> int:
    """Torch threads for training. Small MLP steps run fastest on one thread (measured: 1.6 ms
    vs 84 ms per step with 2 threads on a busy 2-core machine); wide layers and big batches
    use all cores. `n_threads` overrides."""
    if config.n_threads:
        return config.n_threads
    big = config.batch_size * max(config.hidden) >= 131_072
    return (os.cpu_count() or 1) if big else 1


def _reference_profile(df: pd.DataFrame, schema: Schema, pre: Preprocessor, bins: int = 10) -> dict:
    """Training-data profile for drift checks: decile edges of numerics, category frequencies."""
    prof: dict[str, Any] = {}
    for col in schema.features:
        s = df[col.name]
        if col.kind == "numeric":
            v = s.to_numpy("float64", na_value=np.nan)
            v = v[np.isfinite(v)]
            edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])) if len(v) else np.array([])
            fractions, missing = numeric_fractions(s, edges)     # the rule drift checks apply later
            prof[col.name] = {"kind": "numeric", "edges": edges.tolist(),
                              "fractions": fractions.tolist(), "missing": missing}
        elif col.kind in ("categorical", "boolean"):
            freq = s.astype("string").fillna("<null>").value_counts(normalize=True)
            prof[col.name] = {"kind": "categorical", "freq": {str(k): float(v) for k, v in freq.items()}}
    return prof


def _typical_row(X: np.ndarray, categorical_spans: list[tuple[int, int]]) -> np.ndarray:
    """Encoded "typical" row: per-dim median; the most frequent category in one-hot blocks."""
    typical = np.median(X, axis=0)
    for a, b in categorical_spans:
        typical[a:b] = 0.0
        typical[a + int(np.argmax(X[:, a:b].sum(0)))] = 1.0
    return typical.astype(np.float32)


class _RowsOf:
    """Rows `rows` (ascending positions of n) of a matrix held as X[rows] only: indexing it
    with positions (all among `rows`) gives those rows, as indexing the full matrix would."""

    def __init__(self, X: np.ndarray, rows: np.ndarray, n: int) -> None:
        self.X, self.pos = X, np.full(n, -1, dtype=np.int64)
        self.pos[np.asarray(rows, dtype=np.int64)] = np.arange(len(rows))

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        at = self.pos[idx]
        if (at < 0).any():
            raise IndexError("row not kept in X_rows")
        return self.X[at]
