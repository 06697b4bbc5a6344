"""Property tests: whatever frame, Arrow table or array the Python API is given, either it
works (one finite-or-missing score per row) or the error is one of ours (AnomalyVAEError).

Columns are drawn from a zoo of awkward types (NaN/inf/huge floats, bools, text with emoji and
NUL, numbers as text, naive and mixed-offset timestamps, durations, complex, mixed objects,
all-null, categoricals), columns are dropped, duplicated or added, and rows run from 0 to 25.
The default suite runs a few dozen examples; `-m slow` runs >= 1,000 for scoring and 300 for
fitting. Examples are derandomised (the same on every run) and nothing is stored on disk.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomaly_vae import AnomalyVAEError, VAEAnomalyDetector

FAST_N, SLOW_N = 40, 1000
FIT_FAST_N, FIT_SLOW_N = 10, 300
COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6) | st.sampled_from(
    ["a", "b", "c", "", " ", "\x00", "🙂", "NaN", "1e400", "-0", "true", "no", "2026-01-05"])
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e308, -1.7e308, 5e-324])
STAMPS = st.datetimes(min_value=pd.Timestamp("1700-01-01").to_pydatetime(),
                      max_value=pd.Timestamp("2250-01-01").to_pydatetime())
OFFSETS = st.sampled_from(["", "Z", "+01:00", "-05:00", "+14:00", "+05:45"])


def column(kind: str, n: int, draw) -> pd.Series | list:
    """n values of one awkward kind."""
    if kind == "float":
        return pd.Series(draw(st.lists(FLOATS, min_size=n, max_size=n)), dtype="float64")
    if kind == "int":
        return pd.Series(draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=n, max_size=n)), dtype="int64")
    if kind == "bool":
        return pd.Series(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    if kind == "nullable":
        return pd.Series(draw(st.lists(st.none() | st.integers(-5, 5), min_size=n, max_size=n)), dtype="Int64")
    if kind == "text":
        return pd.Series(draw(st.lists(st.none() | TEXT, min_size=n, max_size=n)), dtype=object)
    if kind == "numtext":
        return [draw(st.none() | FLOATS.map(repr) | TEXT) for _ in range(n)]
    if kind == "stamp":
        return pd.Series(draw(st.lists(STAMPS, min_size=n, max_size=n)), dtype="datetime64[ns]")
    if kind == "stamptext":
        return [None if draw(st.booleans()) and i % 3 == 0 else
                draw(STAMPS).isoformat(timespec="seconds") + draw(OFFSETS) for i in range(n)]
    if kind == "duration":
        return pd.to_timedelta(draw(st.lists(st.integers(-10**6, 10**6), min_size=n, max_size=n)), unit="s")
    if kind == "complex":
        return np.array(draw(st.lists(st.complex_numbers(allow_nan=True), min_size=n, max_size=n)), dtype=complex)
    if kind == "mixed":
        return pd.Series([draw(st.none() | st.booleans() | FLOATS | TEXT | STAMPS | st.integers())
                          for _ in range(n)], dtype=object)
    if kind == "null":
        return pd.Series([None] * n, dtype=object)
    if kind == "category":
        return pd.Categorical(draw(st.lists(st.sampled_from(["a", "b", "zz"]), min_size=n, max_size=n)))
    raise AssertionError(kind)


KINDS = ["float", "int", "bool", "nullable", "text", "numtext", "stamp", "stamptext", "duration",
         "complex", "mixed", "null", "category"]
NATURAL = {"amount": "float", "x": "float", "y": "float", "cat": "text", "flag": "bool", "ts": "stamp",
           "row_id": "text"}


@st.composite
def frames(draw, names: tuple[str, ...] = tuple(NATURAL), max_rows: int = 25) -> pd.DataFrame:
    """A frame shaped like the model's input, each column either its natural kind or any other."""
    n = draw(st.integers(0, max_rows))
    cols = {}
    for name in names:
        if draw(st.integers(0, 9)) == 0:
            continue                                          # dropped column
        kind = NATURAL.get(name, "float") if draw(st.booleans()) else draw(st.sampled_from(KINDS))
        cols[name] = column(kind, n, draw)
    if draw(st.integers(0, 5)) == 0:
        cols["extra"] = column(draw(st.sampled_from(KINDS)), n, draw)
    df = pd.DataFrame(cols, index=range(n)) if cols else pd.DataFrame(index=range(n))
    if len(df.columns) and draw(st.integers(0, 15)) == 0:
        df = pd.concat([df, df.iloc[:, :1]], axis=1)          # duplicate column name
    return df


def container(df: pd.DataFrame, how: str):
    """The same data as a DataFrame, an Arrow table or a numpy array (None when the conversion
    itself fails: that is pandas/pyarrow refusing, not our code)."""
    if how == "frame":
        return df
    try:
        if how == "arrow":
            return pa.Table.from_pandas(df, preserve_index=False)
        return df.to_numpy()
    except Exception:  # noqa: BLE001 - conversion refused upstream of our API
        return None


def check_scores(det: VAEAnomalyDetector, X, n: int) -> None:
    """Scores have one value per row, or the error is ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            s = det.anomaly_score(X)
            table = det.explain(X)
        except AnomalyVAEError:
            return
    assert s.shape == (n,) and len(table) == n
    assert not np.isnan(s).any() or n == 0     # a row always gets a score (missing -> indicator)


@pytest.fixture(scope="module")
def det(fitted):
    return fitted


def _score_property(det, df, how):
    X = container(df, how)
    if X is not None:
        check_scores(det, X, len(df))


@given(df=frames(), how=st.sampled_from(["frame", "arrow", "numpy"]))
@settings(max_examples=FAST_N, **COMMON)
def test_scoring_any_frame_raises_only_our_errors(det, df, how):
    _score_property(det, df, how)


@pytest.mark.slow
@given(df=frames(), how=st.sampled_from(["frame", "arrow", "numpy"]))
@settings(max_examples=SLOW_N, **COMMON)
def test_scoring_any_frame_raises_only_our_errors_1000(det, df, how):
    _score_property(det, df, how)


def _fit_property(df, how, y):
    X = container(df, how)
    if X is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = VAEAnomalyDetector(max_epochs=1, random_state=0, n_threads=1).fit(
                X, None if y is None else y[:len(df)])
        except AnomalyVAEError:
            return
    check_scores(model, X, len(df))


@given(df=frames(("a", "b", "c"), max_rows=30), how=st.sampled_from(["frame", "arrow", "numpy"]),
       y=st.none() | st.lists(st.sampled_from([0, 1, -1, 2, None, "yes", 0.5]), min_size=30, max_size=30))
@settings(max_examples=FIT_FAST_N, **COMMON)
def test_fitting_any_frame_raises_only_our_errors(df, how, y):
    _fit_property(df, how, y)


@pytest.mark.slow
@given(df=frames(("a", "b", "c"), max_rows=30), how=st.sampled_from(["frame", "arrow", "numpy"]),
       y=st.none() | st.lists(st.sampled_from([0, 1, -1, 2, None, "yes", 0.5]), min_size=30, max_size=30))
@settings(max_examples=FIT_SLOW_N, **COMMON)
def test_fitting_any_frame_raises_only_our_errors_300(df, how, y):
    _fit_property(df, how, y)
