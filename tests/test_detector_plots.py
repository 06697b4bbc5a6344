"""The Python API's figures (det.plot_*) and verbose fit: what the figures show, not just that
they are built."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from anomaly_vae import VAEAnomalyDetector
from conftest import FAST


@pytest.fixture(scope="module")
def labelled(frame):
    """The session frame with a label column: 40 rows made odd and labelled 1."""
    df = frame.copy()
    df["label"] = 0
    odd = df.index[:40]
    df.loc[odd, "amount"] = df.loc[odd, "amount"] * 50
    df.loc[odd, "label"] = 1
    return df


def test_plot_loss_curves(fitted):
    fig = fitted.plot_loss_curves()
    assert isinstance(fig, Figure)
    ax_loss, ax_terms, ax_beta, ax_units = fig.axes              # three panels + the active-units twin axis
    h = fitted.history_
    lines = {ln.get_label(): ln for ln in ax_loss.get_lines()}
    assert {"loss", "val_loss"} <= set(lines)
    np.testing.assert_array_equal(lines["loss"].get_xdata(), np.arange(1, len(h.loss) + 1))   # epochs 1-based
    np.testing.assert_allclose(lines["val_loss"].get_ydata(), h.val_loss)
    best = [ln for ln in ax_loss.get_lines() if ln.get_linestyle() == ":"]
    assert [float(b.get_xdata()[0]) for b in best] == [h.best_epoch + 1]   # the best epoch, as the CLI prints it
    assert {ln.get_label() for ln in ax_terms.get_lines()} >= {"recon_nll", "kl"}
    assert ax_units.get_ylabel() == "active units" and all(a.get_xlabel() == "epoch" for a in fig.axes[:3])


def test_plot_score_histogram(fitted, frame, labelled):
    fig = fitted.plot_score_histogram(frame)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    labels = ax.get_legend_handles_labels()[1]
    assert sorted(labels) == [f"normal (n={len(frame):,})", f"threshold {fitted.threshold_:.3g}"]
    (thr,) = ax.get_lines()
    assert list(thr.get_xdata()) == [fitted.threshold_] * 2
    assert ax.get_ylabel() == "rows" and ax.get_xlabel() == "anomaly_score"
    # the label column (or y) splits normal and anomalous rows
    det = VAEAnomalyDetector(label="label", **FAST).fit(labelled)
    for fig in (det.plot_score_histogram(labelled),
                det.plot_score_histogram(labelled.drop(columns="label"), y=labelled["label"])):
        labels = fig.axes[0].get_legend_handles_labels()[1]
        assert f"normal (n={len(labelled) - 40:,})" in labels and "anomalous (n=40)" in labels
        assert fig.axes[0].get_ylabel() == "density"


def test_plot_column_error(fitted, frame, labelled):
    fig = fitted.plot_column_error(frame)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    features = [s.column for s in fitted.preprocessor_.spans]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(ticks) == sorted(features)
    means = fitted.contributions(frame).mean()
    widths = {tick: bar.get_width() for tick, bar in zip(ticks, ax.patches)}
    for col in features:
        assert widths[col] == pytest.approx(means[col], rel=1e-5, abs=1e-6)
    assert ticks[-1] == means.abs().idxmax()                         # largest at the top
    fig = fitted.plot_column_error(labelled.drop(columns="label"), y=labelled["label"], max_columns=2)
    (ax,) = fig.axes
    assert len(ax.get_yticklabels()) == 2 and len(ax.patches) == 4  # two groups x two columns
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == "amount"   # the column made odd
    assert "anomalous (n=40)" in ax.get_legend_handles_labels()[1]


def test_verbose_fit_shows_a_bar_and_one_summary_line(frame, capsys):
    VAEAnomalyDetector(**FAST).fit(frame)
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""                       # verbose=False (the default): silent
    det = VAEAnomalyDetector(verbose=True, **FAST).fit(frame)
    err = capsys.readouterr().err
    h = det.history_
    assert "train:" in err and "epoch" in err and "loss=" in err and "val=" in err     # the tqdm bar
    summary = [line for line in err.splitlines() if line.startswith("fit: ")]
    assert summary == [f"fit: {len(h.loss)} epochs (best {h.best_epoch + 1}"
                       f"{', stopped early' if h.stopped_early else ''}), "
                       f"{int(round(len(frame) * 0.75)):,} training rows, {det.fit_seconds_:.1f} s; threshold "
                       f"{det.threshold_:.4f} nats at target FPR 0.01"]
    assert VAEAnomalyDetector().get_params()["verbose"] is False
