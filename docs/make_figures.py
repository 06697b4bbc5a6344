#!/usr/bin/env python
"""Figures for docs/how-it-works.md, generated from the demo data (deterministic, ~2 min).

    python docs/make_figures.py            # writes docs/figures/*.png (each well under 200 KB)
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from anomaly_vae import VAEAnomalyDetector  # noqa: E402
from anomaly_vae import explain as E  # noqa: E402
from anomaly_vae.demo import DEMO_EXCLUDE, make_transactions  # noqa: E402

OUT = ROOT / "docs" / "figures"
DPI = 80


def save(fig, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(OUT / name, dpi=DPI)
    plt.close(fig)
    print(f"wrote {OUT / name} ({(OUT / name).stat().st_size / 1024:.0f} KB)")


def main() -> None:
    df = make_transactions(30_000, seed=0)
    cut = int(0.7 * len(df))
    train, test = df.iloc[:cut].reset_index(drop=True), df.iloc[cut:].reset_index(drop=True)
    det = VAEAnomalyDetector(label="label", exclude=DEMO_EXCLUDE, random_state=0, n_threads=1).fit(train)
    normal = train[train["label"] == 0].reset_index(drop=True)
    features = test.drop(columns=["label"])

    # 1. training: the ELBO's two terms, beta annealing and active units
    h = det.history_
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ep = np.arange(1, len(h.loss) + 1)
    ax[0].plot(ep, h.val_recon_nll, label="reconstruction NLL")
    ax[0].plot(ep, h.val_kl, label="KL(q(z|x) || N(0, I))")
    ax[0].set_xlabel("epoch"); ax[0].set_ylabel("nats per row (validation)"); ax[0].legend(fontsize=8)
    ax[1].plot(ep, h.beta, color="tab:green", label="beta (KL weight)")
    ax[1].set_xlabel("epoch"); ax[1].set_ylabel("beta")
    ax2 = ax[1].twinx()
    ax2.step(ep, h.active_units, where="mid", color="tab:orange", label="active units")
    ax2.set_ylabel("active latent units"); ax2.set_ylim(0, det.config_.latent_dim + 0.5)
    ax[1].set_title("KL annealing; units with Var[mu] > 0.01", fontsize=9)
    save(fig, "training.png")

    # 2. decoder likelihoods per column kind, for one flagged fraud row (column occluded)
    flagged = det.explain(features)
    fraud = test.index[(test["fraud_type"] == "amount_spike") & flagged["is_anomaly"].to_numpy()]
    row = int(fraud[0])
    frame = det.schema_.validate(features.iloc[[row]])
    X = det.preprocessor_.encode(frame)
    spans = {s.column: s for s in det.preprocessor_.spans}
    owner = det.preprocessor_.dim_to_column()
    names = [s.column for s in det.preprocessor_.spans]
    Xo = E.occlude(np.repeat(X, 2, 0), np.array([names.index("amount"), names.index("country")]), owner,
                   det.typical_x_)
    _, _, params = det.vae_.score_terms(Xo, return_params=True)
    fig, ax = plt.subplots(1, 3, figsize=(11, 2.9))
    p = det.preprocessor_.params["amount"]
    j = spans["amount"].start
    mu, sd = params.mean[0, j] * p["std"] + p["mean"], np.exp(0.5 * params.logvar[0, j]) * p["std"]
    grid = np.linspace(0, max(600, test["amount"].iloc[row] * 1.1), 400)
    ax[0].plot(grid, np.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)))
    ax[0].axvline(test["amount"].iloc[row], color="tab:red", label=f"this row: {test['amount'].iloc[row]:,.0f}")
    ax[0].set_title("numeric: Gaussian p(amount | z)", fontsize=9); ax[0].legend(fontsize=8)
    ax[0].set_xlabel("amount")
    a, b = spans["country"].start, spans["country"].stop
    off = sum(s.stop - s.start for s in det.preprocessor_.spans
              if s.kind in ("categorical", "boolean") and s.start < a)
    logits = params.cat_logit[1, off:off + b - a]
    probs = np.exp(logits - logits.max()); probs /= probs.sum()
    vocab = det.preprocessor_.params["country"]["vocab"]
    ax[1].bar(vocab, probs, color=["tab:red" if v == test["country"].iloc[row] else "tab:blue" for v in vocab])
    ax[1].set_title("categorical: softmax p(country | z)", fontsize=9); ax[1].tick_params(axis="x", labelsize=7)
    ind = {s.column: k for k, s in enumerate(sorted((s for s in det.preprocessor_.spans if s.indicator >= 0),
                                                    key=lambda s: s.indicator))}
    cols = ["customer_age", "customer_tenure_months", "distance_from_home_km"]
    _, _, row_params = det.vae_.score_terms(X, return_params=True)
    pm = [1 / (1 + np.exp(-row_params.ind_logit[0, ind[c]])) for c in cols]
    ax[2].barh(cols, pm); ax[2].set_xlim(0, 1); ax[2].tick_params(axis="y", labelsize=7)
    ax[2].set_title("indicators: Bernoulli P(missing | z)", fontsize=9)
    save(fig, "likelihoods.png")

    # 3. score = NLL + KL; threshold and p-value
    scores = flagged["anomaly_score"].to_numpy()
    y = test["label"].to_numpy() == 1
    fig, ax = plt.subplots(figsize=(7, 3))
    bins = np.linspace(np.percentile(det.calibration_scores_, 0.5), np.percentile(scores, 99.7), 80)
    ax.hist(det.calibration_scores_, bins=bins, density=True, alpha=0.6, label="calibration normals")
    ax.hist(scores[y], bins=bins, density=True, alpha=0.6, label="held-out fraud")
    ax.axvline(det.threshold_, color="k", ls="--", label=f"threshold (1% of normals above) {det.threshold_:.1f}")
    ax.set_xlabel("anomaly_score = recon NLL + KL (nats)"); ax.legend(fontsize=8); ax.set_yticks([])
    save(fig, "scores.png")

    # 4. contributions of one flagged row
    contrib = det.contributions(features.iloc[[row]]).iloc[0].sort_values()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(contrib.index, contrib.to_numpy(), color=["tab:red" if v > 0 else "tab:gray" for v in contrib])
    ax.set_xlabel("contribution (nats above the column's median on normal rows)")
    ax.set_title(E.to_frame(flagged.loc[[row], "explanation"])["text"].iloc[0], fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    save(fig, "contributions.png")

    # 5. latent space and KL per dimension
    Z = det.encode(normal.drop(columns=["label"]).iloc[:4000])
    order = np.argsort(-Z.var(0))
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    cats = normal["merchant_category"].iloc[:4000].to_numpy()
    for c in ["grocery", "online_retail", "travel", "cash"]:
        m = cats == c
        ax[0].scatter(Z[m, order[0]], Z[m, order[1]], s=3, label=c)
    ax[0].set_title("latent means (2 most active dims)", fontsize=9); ax[0].legend(fontsize=7, markerscale=3)
    with torch.no_grad():
        Xn = det.preprocessor_.encode(det.schema_.validate(normal.drop(columns=["label"]).iloc[:4000]))
        m_, lv = det.vae_.encode(torch.from_numpy(Xn))
        kl_dim = (0.5 * (m_ ** 2 + lv.exp() - 1 - lv)).mean(0).numpy()
    ax[1].bar(np.arange(len(kl_dim)), kl_dim)
    ax[1].axhline(0.01, color="tab:red", ls=":", label="collapse floor 0.01 nats")
    ax[1].set_xlabel("latent dim"); ax[1].set_ylabel("mean KL (nats)"); ax[1].legend(fontsize=8)
    save(fig, "latent.png")

    # 6. blurry reconstructions: decoder mean at z = mu vs the value
    Xa = det.preprocessor_.encode(det.schema_.validate(normal.drop(columns=["label"]).iloc[:4000]))
    _, _, pa_ = det.vae_.score_terms(Xa, return_params=True)
    recon = pa_.mean[:, spans["amount"].start] * p["std"] + p["mean"]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ax[0].scatter(normal["amount"].iloc[:4000], recon, s=2, alpha=0.4)
    lim = np.percentile(normal["amount"], 99)
    ax[0].plot([0, lim], [0, lim], "k:", lw=1); ax[0].set_xlim(0, lim); ax[0].set_ylim(0, lim)
    ax[0].set_xlabel("amount"); ax[0].set_ylabel("decoder mean at z = mu")
    ax[0].set_title("decoder means are pulled toward the bulk", fontsize=9)
    synth_raw = det.preprocessor_.decode(det.vae_.sample(5000, seed=0))["amount"]
    synth = det.sample(5000, seed=0)["amount"]
    bins = np.linspace(0, lim, 60)
    ax[1].hist(normal["amount"], bins=bins, density=True, histtype="step", lw=1.5, label="training")
    ax[1].hist(synth_raw, bins=bins, density=True, histtype="step", label="raw Gaussian draws, clipped")
    ax[1].hist(synth, bins=bins, density=True, histtype="step", label="sample(): rank-mapped")
    ax[1].set_xlabel("amount"); ax[1].legend(fontsize=7); ax[1].set_yticks([])
    save(fig, "reconstruction_and_samples.png")


if __name__ == "__main__":
    main()
