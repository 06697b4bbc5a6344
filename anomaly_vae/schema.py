"""Column kinds, schema inference at fit time and validation at score time (pure; no torch)."""
from __future__ import annotations

import datetime
import json
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .errors import DataError, InputTypeError, SchemaMismatchError

log = logging.getLogger(__name__)

KINDS = ("numeric", "categorical", "boolean", "datetime", "id")
FEATURE_KINDS = ("numeric", "categorical", "boolean", "datetime")
_ID_NAME = re.compile(r"(^id$|_id$|^id_|Id$|ID$|uuid|guid)")
_NOT_NUMBERS = (bool, np.bool_, complex, np.complexfloating, datetime.date, datetime.timedelta,
                np.datetime64, np.timedelta64)      # datetime.datetime and pd.Timestamp are dates
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


@dataclass(frozen=True)
class Column:
    name: str
    kind: str
    dtype: str = ""


@dataclass(frozen=True)
class Schema:
    """The columns a model was trained on. Built once at fit; travels with the model."""

    columns: tuple[Column, ...]
    label: str | None = None
    version: int = 1

    @property
    def features(self) -> list[Column]:
        return [c for c in self.columns if c.kind in FEATURE_KINDS]

    @property
    def ids(self) -> list[str]:
        return [c.name for c in self.columns if c.kind == "id"]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "label": self.label,
                "columns": [asdict(c) for c in self.columns]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schema":
        cols = tuple(Column(**c) for c in d["columns"])
        for c in cols:
            if c.kind not in KINDS:
                raise SchemaMismatchError(f"column '{c.name}': unknown kind '{c.kind}' in schema")
        return cls(columns=cols, label=d.get("label"), version=int(d.get("version", 1)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def validate(self, df: pd.DataFrame, *, source: str = "input") -> pd.DataFrame:
        """Check `df` against the schema and cast each feature column to its kind.

        Missing feature columns or values that cannot be cast raise SchemaMismatchError
        naming the column; extra columns are ignored. Returns a new frame of the features
        (and whichever id columns are present) in schema order.
        """
        missing = [c.name for c in self.features if c.name not in df.columns]
        if missing:
            raise SchemaMismatchError(
                f"{source}: missing required column(s) {missing}; the model was trained on "
                f"{[c.name for c in self.features]}")
        out = {}
        for col in self.columns:
            if col.name not in df.columns:
                continue
            out[col.name] = df[col.name] if col.kind == "id" else cast_column(df[col.name], col, source)
        return pd.DataFrame(out, index=df.index)


def validate_arrow(schema: Schema, data: Any, *, source: str = "input") -> dict[str, Any]:
    """`Schema.validate` for an Arrow table or record batch, without a pandas copy.

    Returns {feature name: pyarrow Array} in schema order, each in the form
    `Preprocessor.encode` reads: numeric -> float64, boolean -> bool, datetime -> timestamp,
    categorical -> string (or dictionary of strings). Columns of other types go through
    `cast_column` (so bad values raise the same SchemaMismatchError naming the column).
    """
    names = data.schema.names
    missing = [c.name for c in schema.features if c.name not in names]
    if missing:
        raise SchemaMismatchError(
            f"{source}: missing required column(s) {missing}; the model was trained on "
            f"{[c.name for c in schema.features]}")
    return {c.name: cast_arrow_column(data.column(c.name), c, source) for c in schema.features}


def cast_arrow_column(arr: Any, col: Column, source: str = "input") -> Any:
    """One Arrow column in the form its kind is encoded from (see `validate_arrow`)."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if col.kind == "numeric" and (pa.types.is_integer(t) or pa.types.is_floating(t)
                                  or pa.types.is_decimal(t) or pa.types.is_null(t)):
        return arr.cast(pa.float64(), safe=False)     # ints beyond 2**53 round, as in pandas
    if col.kind == "boolean" and (pa.types.is_boolean(t) or pa.types.is_null(t)):
        return arr.cast(pa.bool_())
    if col.kind == "datetime" and (pa.types.is_timestamp(t) or pa.types.is_null(t)):
        return arr if pa.types.is_timestamp(t) else arr.cast(pa.timestamp("ns"))
    if col.kind == "categorical":
        if pa.types.is_dictionary(t) and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
            return arr
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t):
            return arr.cast(pa.string())          # ints print as pandas does: 4 -> "4"
    # anything else (text numbers, text booleans, dates, float categories, ...): the pandas rules
    out = cast_column(arr.to_pandas(), col, source)
    return pa.array(out, from_pandas=True)


def as_frame(X: Any) -> pd.DataFrame:
    """Accept a DataFrame, a pyarrow Table/RecordBatch or a 2-D array (columns x0, x1, ...)."""
    if hasattr(X, "to_pandas") and hasattr(X, "schema"):
        try:
            X = X.to_pandas()
        except (TypeError, ValueError, OverflowError, NotImplementedError) as exc:    # ArrowInvalid is a ValueError
            raise DataError(f"cannot convert the Arrow data to a table: {exc}") from exc
    if isinstance(X, pd.DataFrame):
        dups = sorted({str(c) for c in X.columns[X.columns.duplicated()]})
        if dups:
            raise DataError(f"duplicate column name(s) {dups}: every column needs its own name")
        if X.shape[1] == 0:
            raise DataError(f"0 feature(s) (shape={X.shape}) while a minimum of 1 is required")
        if not all(isinstance(c, str) for c in X.columns):
            X = X.rename(columns=str)
        return X
    if X is None or (isinstance(X, (dict, str, bytes, pd.Series)) and not hasattr(X, "tocsr")):  # dok: a dict
        hint = {dict: "; pass pd.DataFrame(d)",
                pd.Series: "; pass series.to_frame() for one column or series.to_frame().T for one row"}
        raise InputTypeError(f"expected a DataFrame, an Arrow table or a 2-D numeric array, got "
                             f"{type(X).__name__}{hint.get(type(X), '')}")
    from sklearn.utils import check_array
    # arrays are numeric-only; sklearn's checks give the standard messages (sparse, 1-D, empty),
    # raised as our errors (a TypeError stays a TypeError)
    try:
        arr = check_array(X, accept_sparse=False, dtype="numeric", ensure_all_finite="allow-nan")
    except TypeError as exc:
        raise InputTypeError(str(exc)) from exc
    except ValueError as exc:
        hint = ("; arrays must be numeric (pass a DataFrame for text, boolean or timestamp columns)"
                if "convert" in str(exc) else "")
        raise DataError(f"{exc}{hint}") from exc
    return pd.DataFrame(arr, columns=[f"x{i}" for i in range(arr.shape[1])])


def infer_schema(df: pd.DataFrame, *, categorical: Iterable[str] = (), exclude: Iterable[str] = (),
                 id_cols: Iterable[str] = (), label: str | None = None) -> Schema:
    """Infer each column's kind; user lists override inference.

    Rules: bool -> boolean; datetime64 -> datetime; strings/categories -> categorical, or
    id when every value is distinct (e.g. a transaction id); numbers -> numeric, or id when
    integer, distinct per row and named like an id. Id columns are passed through, not modelled.
    """
    categorical, exclude, id_cols = set(categorical), set(exclude), set(id_cols)
    for name in categorical | exclude | id_cols:
        if name not in df.columns:
            raise SchemaMismatchError(f"column '{name}' named in the options is not in the data; "
                                      f"columns are {list(df.columns)}")
    if len(df) == 0:
        raise DataError("cannot infer a schema from an empty table")
    cols = []
    for name in df.columns:
        if name == label or name in exclude:
            continue
        s = df[name]
        dtype = str(s.dtype)
        if name in id_cols:
            kind = "id"
        elif name in categorical:
            kind = "categorical"
        else:
            kind = _infer_kind(str(name), s)
        if kind != "id" and s.isna().all():
            raise DataError(f"column '{name}': every value is null; leave it out (exclude=['{name}'] in "
                            f"Python, --exclude {name} on the command line)")
        if kind == "categorical" and name not in categorical:
            _warn_if_numbers_as_text(str(name), s)
        cols.append(Column(name=str(name), kind=kind, dtype=dtype))
    if not any(c.kind in FEATURE_KINDS for c in cols):
        raise DataError(f"no feature columns left to model among {list(df.columns)}")
    return Schema(columns=tuple(cols), label=label)


def _infer_kind(name: str, s: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(s):
        return "boolean"
    if pd.api.types.is_datetime64_any_dtype(s):
        return "datetime"
    n = int(s.notna().sum())
    distinct_per_row = n >= 20 and s.nunique(dropna=True) == n
    if pd.api.types.is_numeric_dtype(s):
        if pd.api.types.is_integer_dtype(s) and distinct_per_row and _ID_NAME.search(name):
            return "id"
        return "numeric"
    if distinct_per_row:
        return "id"
    return "categorical"


def _warn_if_numbers_as_text(name: str, s: pd.Series) -> None:
    """A text column whose values are nearly all numbers is probably a number column read as text."""
    values = s.dropna()
    if pd.api.types.is_numeric_dtype(s) or values.nunique() <= 50:
        return
    parsed = pd.to_numeric(values.astype("string").str.strip(), errors="coerce")
    share = float(parsed.notna().mean())
    if share >= 0.9:
        bad = list(pd.unique(values[parsed.isna()].astype(str)))[:3]
        log.warning("column '%s' holds text of which %.1f%% parses as numbers (others e.g. %s); it is "
                    "modelled as categorical: clean and cast it to a number if it is an amount or a "
                    "measurement", name, 100 * share, bad)


def category_text(s: pd.Series) -> pd.Series:
    """Categories as text; integral floats print as integers, so 4 and 4.0 are one category
    (an int column becomes float in a partition that has nulls)."""
    if pd.api.types.is_float_dtype(s):
        v = s.to_numpy(dtype="float64", na_value=np.nan)
        v = v[~np.isnan(v)]
        if np.isfinite(v).all() and (np.abs(v) < 2 ** 53).all() and (v == np.round(v)).all():
            return s.astype("Int64").astype("string")
    return s.astype("string")


def cast_column(s: pd.Series, col: Column, source: str = "input") -> pd.Series:
    """Cast one column to its schema kind or raise SchemaMismatchError naming it."""
    was_null = s.isna()
    if col.kind == "numeric":
        _refuse_non_numbers(s, col, source)
        try:
            out = pd.to_numeric(s, errors="coerce").astype("float64")
        except (TypeError, ValueError, OverflowError) as exc:     # e.g. lists or dicts as values
            raise SchemaMismatchError(f"{source}: column '{col.name}': expected a number, found values "
                                      f"that cannot be cast ({exc}); fix the data or retrain") from exc
        _check_cast(s, out, was_null, col, "a number", source)
        return out
    if col.kind == "boolean":
        if pd.api.types.is_bool_dtype(s):
            return s.astype("boolean")
        text = s.astype("string").str.strip().str.lower()
        out = pd.Series(pd.NA, index=s.index, dtype="boolean")
        out[text.isin(_TRUE).fillna(False)] = True
        out[text.isin(_FALSE).fillna(False)] = False
        _check_cast(s, out, was_null, col, "a boolean (true/false/1/0)", source)
        return out
    if col.kind == "datetime":
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s) and s.notna().any():
            raise SchemaMismatchError(
                f"{source}: column '{col.name}': expected a timestamp, found {s.dtype} numbers; epoch "
                f"numbers are ambiguous (seconds? milliseconds?): convert them first, e.g. "
                f"pd.to_datetime(df['{col.name}'], unit='s')")
        if pd.api.types.is_datetime64_any_dtype(s):
            out = s
        else:
            # utc=True: text with different offsets (+01:00, Z, -05:00) is one instant each, in
            # UTC, as the CSV reader gives it; text without an offset is taken as UTC
            try:
                out = pd.to_datetime(s, errors="coerce", utc=True, format="mixed")
            except (TypeError, ValueError, OverflowError) as exc:
                raise SchemaMismatchError(f"{source}: column '{col.name}': expected a timestamp, found "
                                          f"values that cannot be cast ({exc}); fix the data or retrain") from exc
        if getattr(out.dt, "tz", None) is not None:
            out = out.dt.tz_convert("UTC").dt.tz_localize(None)
        _check_cast(s, out, was_null, col, "a timestamp", source)
        return out
    # categorical: any value is a category; nulls stay null
    return category_text(s)


def _refuse_non_numbers(s: pd.Series, col: Column, source: str) -> None:
    """SchemaMismatchError for booleans, timestamps, durations and complex numbers in a numeric
    column: pandas would silently turn them into 0/1, nanoseconds or the real part."""
    dtype = s.dtype
    what = ("booleans" if pd.api.types.is_bool_dtype(dtype)
            else "timestamps" if pd.api.types.is_datetime64_any_dtype(dtype)
            else "durations" if pd.api.types.is_timedelta64_dtype(dtype)
            else "complex numbers" if pd.api.types.is_complex_dtype(dtype) else None)
    if what is None and dtype == object:
        kinds = {type(v).__name__ for v in s.dropna().tolist() if isinstance(v, _NOT_NUMBERS)}
        what = f"values of type {sorted(kinds)}" if kinds else None
    if what is not None:
        raise SchemaMismatchError(f"{source}: column '{col.name}': expected a number, found {what} "
                                  f"({dtype}); cast the column to a number or retrain")


def _check_cast(raw: pd.Series, out: pd.Series, was_null: pd.Series, col: Column, expected: str,
                source: str) -> None:
    bad = out.isna().to_numpy() & ~was_null.to_numpy()
    if bad.any():
        examples = list(pd.unique(raw[bad].astype(str)))[:3]
        raise SchemaMismatchError(
            f"{source}: column '{col.name}': expected {expected}, found {bad.sum():,} of {len(raw):,} "
            f"values that cannot be cast (e.g. {examples}); fix the data or retrain")
