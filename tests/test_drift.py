"""Population stability index: pure functions, the detector's reference profile, the plot."""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest

from anomaly_vae.drift import (NEW, SCORE_ROW, drift_table, feature_psi, numeric_fractions, psi,
                               psi_plot, score_psi)
from anomaly_vae.errors import SchemaMismatchError


# ------------------------------------------------------------------ psi()
def test_psi_identical_is_zero_and_known_value():
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    # 0.4 ln(0.9/0.5) + 0.4 ln(0.5/0.1) = 0.4 ln 1.8 + 0.4 ln 5, worked out by hand
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.23511 + 0.64378, abs=1e-4)


def test_psi_symmetric_grows_with_shift_and_survives_empty_bins():
    e = [0.25, 0.25, 0.25, 0.25]
    small, large = [0.3, 0.25, 0.25, 0.2], [0.7, 0.1, 0.1, 0.1]
    assert psi(e, small) == pytest.approx(psi(small, e))
    assert 0 < psi(e, small) < psi(e, large)
    empty = psi([0.5, 0.5, 0.0], [0.4, 0.4, 0.2])        # a bin the reference never saw
    assert math.isfinite(empty) and empty > psi([0.5, 0.5, 0.0], [0.5, 0.5, 0.0])
    assert psi([0.5, 0.5, 0.0], [0.4, 0.4, 0.2], eps=1e-2) < empty  # larger floor, smaller penalty


def test_psi_rejects_mismatched_bins():
    with pytest.raises(ValueError, match="equal length"):
        psi([0.5, 0.5], [1.0])


# ---------------------------------------------------------------- binning
def test_numeric_fractions_edge_convention_and_missing():
    # bins: (-inf, 0), [0, 1), [1, inf)  -- a value equal to an edge goes to the bin above it
    values = [-1.0, -0.5, 0.0, 0.5, 0.99, 1.0, 2.0, np.nan]
    frac, missing = numeric_fractions(values, [0.0, 1.0])
    np.testing.assert_allclose(frac, [2 / 7, 3 / 7, 2 / 7])
    assert missing == pytest.approx(1 / 8)


def test_feature_psi_zero_when_new_data_matches_the_profile():
    reference = {
        "x": {"kind": "numeric", "edges": [0.0, 1.0], "fractions": [0.25, 0.5, 0.25], "missing": 0.2},
        "c": {"kind": "categorical", "freq": {"a": 0.5, "b": 0.3, "<null>": 0.2}},
        "flag": {"kind": "categorical", "freq": {"True": 0.6, "False": 0.4}},
    }
    x = [-1.0] * 4 + [0.0, 0.5] * 4 + [1.0] * 4 + [np.nan] * 4          # 20 rows: 4/8/4 + 4 missing
    c = ["a"] * 10 + ["b"] * 6 + [None] * 4
    flag = [True] * 12 + [False] * 8
    df = pd.DataFrame({"x": x, "c": pd.Series(c, dtype="string"), "flag": flag})
    table = feature_psi(reference, df)
    assert list(table["feature"]) == ["x", "c", "flag"]
    np.testing.assert_allclose(table["psi"], 0.0, atol=1e-12)
    assert table.set_index("feature").loc["x", "missing_new"] == pytest.approx(0.2)


def test_feature_psi_detects_missingness_new_categories_and_shift():
    reference = {
        "x": {"kind": "numeric", "edges": [0.0, 1.0], "fractions": [0.25, 0.5, 0.25], "missing": 0.0},
        "c": {"kind": "categorical", "freq": {"a": 0.5, "b": 0.5}},
    }
    base = pd.DataFrame({"x": [-1.0, 0.2, 0.7, 2.0] * 25, "c": ["a", "b"] * 50})
    assert feature_psi(reference, base)["psi"].max() < 1e-12
    nulls = base.assign(x=base["x"].where(np.arange(100) % 2 == 0))      # half missing
    unseen = base.assign(c=["a", "zzz", "yyy", "b"] * 25)               # half never-seen values
    shifted = base.assign(x=base["x"] + 5)                              # everything in the top bin
    for frame, col in ((nulls, "x"), (unseen, "c"), (shifted, "x")):
        t = feature_psi(reference, frame).set_index("feature")["psi"]
        assert t[col] > 0.5, (col, t.to_dict())
        other = "c" if col == "x" else "x"
        assert t[other] < 1e-12


def test_unseen_categories_share_one_new_bin():
    reference = {"c": {"kind": "categorical", "freq": {"a": 1.0}}}
    many = pd.DataFrame({"c": ["a"] * 50 + [f"v{i}" for i in range(50)]})
    one = pd.DataFrame({"c": ["a"] * 50 + ["v"] * 50})
    assert NEW == "<new>"
    assert feature_psi(reference, many)["psi"].iloc[0] == pytest.approx(
        feature_psi(reference, one)["psi"].iloc[0])


def test_feature_psi_names_a_missing_column():
    reference = {"amount": {"kind": "numeric", "edges": [1.0], "fractions": [0.5, 0.5], "missing": 0.0}}
    with pytest.raises(SchemaMismatchError, match="amount"):
        feature_psi(reference, pd.DataFrame({"other": [1.0]}))


# --------------------------------------------------- detector reference_
def test_profile_of_a_fitted_detector(fitted, frame):
    """The bins the detector stores at fit and the bins drift.py applies agree: its own training
    data shows no drift, a scaled column does, and only that column."""
    data = fitted.schema_.validate(frame)
    base = feature_psi(fitted.reference_, data).set_index("feature")["psi"]
    assert set(base.index) == set(fitted.reference_)
    assert base.max() < 0.05, base.to_dict()
    moved = feature_psi(fitted.reference_, fitted.schema_.validate(frame.assign(amount=frame["amount"] * 3)))
    moved = moved.set_index("feature")["psi"]
    assert moved["amount"] > 0.5
    assert moved.drop("amount").max() < 0.05


# ----------------------------------------------------------------- scores
def test_score_psi_same_vs_shifted_vs_nonfinite():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=5000)
    same = score_psi(ref, rng.normal(size=5000))
    shifted = score_psi(ref, rng.normal(loc=1.0, size=5000))
    assert same < 0.02 < 0.2 < shifted
    broken = rng.normal(size=5000)
    broken[:500] = np.nan
    assert score_psi(ref, broken) > same + 0.1                            # non-finite bin counts
    with pytest.raises(ValueError):
        score_psi([np.nan, np.inf], [1.0])


def test_drift_table_alerts_and_score_row():
    reference = {
        "x": {"kind": "numeric", "edges": [0.0], "fractions": [0.5, 0.5], "missing": 0.0},
        "y": {"kind": "numeric", "edges": [0.0], "fractions": [0.5, 0.5], "missing": 0.0},
    }
    df = pd.DataFrame({"x": [-1.0, 1.0] * 50, "y": [5.0] * 90 + [-1.0] * 10})
    rng = np.random.default_rng(1)
    table = drift_table(reference, df, reference_scores=rng.normal(size=1000),
                        new_scores=rng.normal(size=1000), alert=0.2)
    assert list(table.columns) == ["feature", "kind", "psi", "missing_new", "alert"]
    assert list(table["psi"]) == sorted(table["psi"], reverse=True)
    flags = table.set_index("feature")["alert"].to_dict()
    assert flags == {"y": True, "x": False, SCORE_ROW: False}
    assert table.set_index("feature").loc[SCORE_ROW, "kind"] == "score"
    assert len(drift_table(reference, df)) == 2                          # no scores, no score row


def test_psi_plot_bars_and_threshold_line():
    table = pd.DataFrame({"feature": ["a", "b", "anomaly_score"], "kind": ["numeric", "categorical", "score"],
                          "psi": [0.05, 0.4, 0.1], "missing_new": [0.0, 0.0, 0.0],
                          "alert": [False, True, False]})
    fig = psi_plot(table, alert=0.2)
    ax = fig.axes[0]
    assert len(ax.patches) == 3
    assert any(np.allclose(line.get_xdata(), [0.2, 0.2]) for line in ax.get_lines())
    red = [p for p in ax.patches if p.get_facecolor()[0] > 0.7 and p.get_facecolor()[2] < 0.3]
    assert len(red) == 1                                                 # only b is over the line
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
