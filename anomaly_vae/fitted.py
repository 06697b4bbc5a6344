"""FittedDetector: the scoring side of a fitted detector (score, explain, plots, save/load).

It imports no scikit-learn (nor scipy): loading a model to score it (`anomaly-vae score`,
serving, Spark workers) does not pay for their imports, about 1.4 s of a 1,000-row `score`
on a 2-core machine (2.2-2.6 s instead of 3.3-4.4 s). The estimator,
`detector.VAEAnomalyDetector`, is a FittedDetector with sklearn's base classes and `fit` on
top; `FittedDetector.load` gives the same scores without them.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import explain as E
from . import score as S
from .config import PRECISIONS
from .errors import ConfigError, DataError
from .model import VAE, resolve_device, scoring_dtype
from .preprocess import Encoded, dense
from .sample import sample_rows
from .schema import as_frame, validate_arrow

log = logging.getLogger(__name__)


class FittedDetector:
    """A fitted detector, for scoring: what `VAEAnomalyDetector.load` returns minus sklearn's
    estimator API (`fit`, `get_params`, cloning). Made by `FittedDetector.load(path)`; the
    runtime settings `device` and `precision` are plain attributes (`set_params` sets them)."""

    def __init__(self, **params: Any) -> None:
        self._param_names = list(params)
        for k, v in params.items():
            setattr(self, k, v)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The estimator parameters it was saved with (current values), as `save` writes them."""
        return {k: getattr(self, k) for k in self._param_names}

    def __repr__(self) -> str:
        if not hasattr(self, "vae_"):
            return f"{type(self).__name__}()"
        return (f"{type(self).__name__}(features={self.n_features_in_}, threshold={self.threshold_:.4g}, "
                f"precision={self.precision!r}, device={self.device!r})")

    def set_params(self, **params: Any) -> "FittedDetector":
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "vae_"):
            from sklearn.exceptions import NotFittedError
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' "
                                 "with appropriate arguments before using this estimator.")

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
        from .evaluate import anomaly_mask     # evaluate imports sklearn.metrics
        return df, anomaly_mask(y, name, strict=name != "y")

    # ------------------------------------------------------------- scoring
    def _frame(self, X: Any) -> pd.DataFrame:
        self._check_fitted()
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
        self._check_fitted()
        x = self.preprocessor_.encode(self._frame(X))
        if self.config_.objective == "masked":
            return self.vae_.masked_score_terms(x, return_params=True)[2]
        return self.vae_.decoder_params(x)

    def score_terms(self, X: Any) -> S.ScoreTerms:
        """anomaly_score, recon_nll, kl and per-column NLL for each row of X."""
        self._check_fitted()
        return self._terms_from_X(self._encode(X))

    def _encode(self, X: Any) -> Encoded:
        """Validated, encoded rows, one-hot blocks as indices (`Encoded`: the dense (n, n_dims)
        one-hot matrix is never built; 1M wide rows would be 664 MB); Arrow tables and record
        batches skip pandas."""
        if hasattr(X, "schema") and hasattr(X, "column") and not isinstance(X, pd.DataFrame):
            return self.preprocessor_.encode_compact(validate_arrow(self.schema_, X))
        return self.preprocessor_.encode_compact(self._frame(X))

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
        X_enc = self.preprocessor_.encode_compact(frame)
        table = self.score_table(self._terms_from_X(X_enc), top_k, values=frame, X=X_enc,
                                 explain_all=explain_all)
        if isinstance(X, pd.DataFrame):
            table.index = X.index              # so df.join(det.explain(df)) lines up
        return table

    def score_table(self, terms: S.ScoreTerms, top_k: int | None = None, *, values: Any = None,
                    X: np.ndarray | Encoded | None = None, explain_all: bool = False,
                    X_rows: np.ndarray | None = None) -> pd.DataFrame:
        """The score columns for `terms`. With `X` (the encoded rows `terms` came from) also
        `explanation`: for flagged rows (every row with explain_all=True) the top_features
        columns with value and expected value (`explain.ENTRY_TYPE`), an empty list otherwise
        (an `Encoded` X stays compact: only the explained rows are made dense);
        `values` (DataFrame or Arrow batch of the same rows) gives the values shown.
        `X_rows` (positions, ascending) says X holds only those rows; they must include every
        flagged row (what streaming scoring keeps, so it explains a whole batch at once)."""
        cols = self.score_columns(terms, top_k, values=values, X=X, explain_all=explain_all, X_rows=X_rows)
        cols["top_features"] = pd.arrays.ArrowStringArray(cols["top_features"])  # Arrow-backed, no per-row objects
        if "explanation" in cols:
            cols["explanation"] = pd.arrays.ArrowExtensionArray(cols["explanation"])
        return pd.DataFrame(cols)

    def score_columns(self, terms: S.ScoreTerms, top_k: int | None = None, *, values: Any = None,
                      X: np.ndarray | Encoded | None = None, explain_all: bool = False,
                      X_rows: np.ndarray | None = None) -> dict[str, Any]:
        """`score_table`'s columns as {name: numpy array, or Arrow array for top_features and
        explanation}: what streaming scoring turns into a record batch without a DataFrame
        (whose construction was a good part of the fixed cost of each small batch)."""
        contrib = S.feature_contributions(terms, self.column_median_)
        names = [s.column for s in self.preprocessor_.spans]
        k = top_k or self.config_.top_k
        is_anomaly = terms.anomaly_score > self.threshold_
        cols = {
            "anomaly_score": terms.anomaly_score,
            "recon_nll": terms.recon_nll,
            "kl": terms.kl,
            "p_value": S.p_values(terms.anomaly_score, self.calibration_scores_),
            "is_anomaly": is_anomaly,
            "top_features": S.top_feature_text(contrib, names, k),
        }
        if X is not None:
            if X_rows is not None:
                if explain_all:
                    raise ValueError("explain_all needs X for every row, not X_rows")
                X = _RowsOf(X, X_rows, len(is_anomaly))
            cols["explanation"] = self._explanation(X, values, contrib, k, None if explain_all else is_anomaly)
        return cols

    def _explanation(self, X: Any, values: Any, contrib: np.ndarray, k: int,
                     rows: np.ndarray | None) -> Any:
        """list<struct> explanation per row. The expected value of a column is the decoder's
        prediction for the row with that column set to its typical value (so it comes from
        the other columns; at z = mu the VAE partly echoes the odd value back)."""
        entries = E.select_entries(contrib, k, rows)
        Xe = dense(X, entries.row)
        if self.typical_x_ is not None:
            Xe = E.occlude(Xe, entries.column, self.preprocessor_.dim_to_column(), self.typical_x_)
        params = self.vae_.decoder_params(Xe)
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

        self._check_fitted()
        return plots.loss_curves(self.history_)

    def plot_score_histogram(self, X: Any, y: Any = None) -> Any:
        """Histogram of ``anomaly_score`` on rows X with the threshold as a dashed line; normal
        vs anomalous rows (densities) when labels are given as `y` or as the model's label
        column in X. A `matplotlib.figure.Figure`."""
        from . import plots

        self._check_fitted()
        df, labels = self._split_label(as_frame(X), y)
        return plots.score_histogram(self.anomaly_score(df), labels, self.threshold_)

    def plot_column_error(self, X: Any, y: Any = None, max_columns: int = 30) -> Any:
        """Mean contribution of each column (its NLL minus its median on calibration rows, nats)
        on rows X, largest first, anomalous rows as their own bars when labels are given (`y`
        or the label column). A `matplotlib.figure.Figure`."""
        from . import plots

        self._check_fitted()
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
        self._check_fitted()
        return sample_rows(self.vae_, self.preprocessor_, getattr(self, "marginals_", {}), n, seed)

    # --------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> str:
        """Write a pickle-free model directory atomically; returns its path."""
        from .persist import save_model
        return save_model(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FittedDetector":
        """Load a directory written by `save`, verifying format version and file hashes."""
        from .persist import load_model
        return load_model(path, cls)


_warned_bf16: list[bool] = []


def _warn_slow_bf16() -> None:
    from .model import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        log.warning("precision bfloat16: this CPU has no native bf16 (avx512_bf16/amx), so torch "
                    "emulates it and scoring is several times slower than float32; use float32 here")
    _warned_bf16.append(True)


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
