import re

import numpy as np
import pandas as pd
import pytest

from anomaly_vae import DataError, Schema, SchemaMismatchError, infer_schema
from anomaly_vae.schema import as_frame


def kinds(schema):
    return {c.name: c.kind for c in schema.columns}


def test_infers_every_kind(frame):
    s = infer_schema(frame.assign(account_id=np.arange(len(frame))))
    assert kinds(s) == {"row_id": "id", "amount": "numeric", "x": "numeric", "y": "numeric",
                        "cat": "categorical", "flag": "boolean", "ts": "datetime", "account_id": "id"}
    assert s.ids == ["row_id", "account_id"]


def test_overrides_and_label(frame):
    df = frame.assign(code=np.arange(len(frame)) % 7, label=0)
    s = infer_schema(df, categorical=["code"], exclude=["y"], id_cols=["amount"], label="label")
    k = kinds(s)
    assert k["code"] == "categorical" and "y" not in k and k["amount"] == "id" and "label" not in k
    with pytest.raises(SchemaMismatchError, match="nope"):
        infer_schema(df, exclude=["nope"])


def test_json_roundtrip(frame):
    s = infer_schema(frame)
    assert Schema.from_dict(s.to_dict()) == s


def test_validate_names_missing_and_bad_columns(frame):
    s = infer_schema(frame)
    with pytest.raises(SchemaMismatchError, match=r"missing required column\(s\) \['amount'\]"):
        s.validate(frame.drop(columns=["amount"]))
    bad = frame.head(10).assign(amount=["12.5"] * 9 + ["twelve"])
    with pytest.raises(SchemaMismatchError, match=r"column 'amount'.*1 of 10.*twelve"):
        s.validate(bad)
    # castable strings and extra columns are fine
    ok = s.validate(frame.head(5).assign(amount=frame.amount.head(5).astype(str), extra=1))
    assert ok["amount"].dtype == "float64" and "extra" not in ok


def test_boolean_and_datetime_casts(frame):
    s = infer_schema(frame)
    df = frame.head(4).assign(flag=["true", "0", None, "yes"], ts=["2026-01-01 10:00"] * 4)
    out = s.validate(df)
    assert out["flag"].tolist()[:2] == [True, False] and pd.isna(out["flag"].iloc[2])
    assert pd.api.types.is_datetime64_any_dtype(out["ts"])
    with pytest.raises(SchemaMismatchError, match="'flag'"):
        s.validate(frame.head(2).assign(flag=["maybe", "true"]))


def test_all_null_and_empty_are_data_errors():
    with pytest.raises(DataError, match="'b'"):
        infer_schema(pd.DataFrame({"a": [1.0, 2.0], "b": [np.nan, np.nan]}))
    with pytest.raises(DataError, match="empty"):
        infer_schema(pd.DataFrame({"a": []}))


def test_as_frame_accepts_arrays_and_arrow():
    import pyarrow as pa
    assert list(as_frame(np.zeros((3, 2))).columns) == ["x0", "x1"]
    assert as_frame(pa.table({"a": [1, 2]})).shape == (2, 1)
    with pytest.raises(ValueError, match="Reshape"):
        as_frame(np.zeros(3))


def test_integer_categories_survive_a_float_partition(frame):
    # an int column read from a partition with nulls arrives as float: 4.0 must stay category "4"
    df = frame.assign(code=np.arange(len(frame)) % 4)
    s = infer_schema(df, categorical=["code"])
    as_float = s.validate(df.head(6).assign(code=[0.0, 1.0, np.nan, 3.0, 2.0, 1.0]))
    assert as_float["code"].tolist()[:2] == ["0", "1"] and pd.isna(as_float["code"].iloc[2])
    assert s.validate(df.head(2))["code"].tolist() == ["0", "1"]
    assert s.validate(df.head(2).assign(code=[0.5, 1.0]))["code"].tolist() == ["0.5", "1.0"]


def test_epoch_numbers_in_a_timestamp_column_are_refused(frame):
    s = infer_schema(frame)
    epoch = frame.head(3).assign(ts=[1_767_225_600, 1_767_229_200, 1_767_232_800])
    with pytest.raises(SchemaMismatchError, match=r"column 'ts': expected a timestamp, found int64.*unit='s'"):
        s.validate(epoch, source="x.parquet")
    assert s.validate(frame.head(3).assign(ts=[np.nan] * 3))["ts"].isna().all()   # all-null is fine


def test_duplicate_column_names_are_a_data_error():
    df = pd.DataFrame([[1.0, 2.0, 3.0]], columns=["a", "b", "a"])
    with pytest.raises(DataError, match=r"duplicate column name\(s\) \['a'\]"):
        as_frame(df)


def test_numbers_stored_as_text_are_flagged(caplog):
    values = [f"{v:.0f}" for v in np.linspace(1, 200, 300)] + ["abc"]   # repeats: not an id
    with caplog.at_level("WARNING", logger="anomaly_vae.schema"):
        s = infer_schema(pd.DataFrame({"amount": values, "n": np.arange(301.0)}))
    assert kinds(s)["amount"] == "categorical"
    assert "column 'amount' holds text of which 99.7% parses as numbers" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="anomaly_vae.schema"):
        infer_schema(pd.DataFrame({"country": ["DE", "FR", "US"] * 100, "n": np.arange(300.0)}))
    assert caplog.text == ""


def test_timestamp_text_with_mixed_offsets_is_converted_to_utc(frame):
    s = infer_schema(frame)
    text = ["2026-01-05T10:00:00+01:00", "2026-01-05T10:00:00-05:00", "2026-01-05T10:00:00Z",
            "2026-01-05 10:00:00", None]
    df = frame.head(5).assign(ts=text)
    out = s.validate(df)["ts"]
    assert str(out.dtype) == "datetime64[ns]" or out.dt.tz is None
    assert out.iloc[:4].tolist() == [pd.Timestamp("2026-01-05 09:00"), pd.Timestamp("2026-01-05 15:00"),
                                     pd.Timestamp("2026-01-05 10:00"), pd.Timestamp("2026-01-05 10:00")]
    assert pd.isna(out.iloc[4])
    import pyarrow as pa
    from anomaly_vae.schema import validate_arrow
    arrow = validate_arrow(s, pa.Table.from_pandas(df, preserve_index=False))["ts"]
    assert arrow.to_pandas().iloc[:4].tolist() == out.iloc[:4].tolist()


@pytest.mark.parametrize("values, found", [
    ([True, False] * 3, "booleans"),
    (pd.to_timedelta(np.arange(6), unit="s"), "durations"),
    (pd.date_range("2026-01-01", periods=6), "timestamps"),
    (np.arange(6) + 1j, "complex numbers"),
    (pd.Series([1.5, True, 2.0, 3.0, 4.0, 5.0], dtype=object), "values of type ['bool']"),
    (pd.Series([1.5, pd.Timestamp("2026-01-01"), 2.0, 3.0, 4.0, 5.0], dtype=object), "values of type ['Timestamp']"),
])
def test_numeric_columns_refuse_booleans_durations_timestamps_and_complex(frame, values, found):
    s = infer_schema(frame)
    df = frame.head(6).assign(amount=values)
    with pytest.raises(SchemaMismatchError, match=rf"column 'amount': expected a number, found {re.escape(found)}"):
        s.validate(df)
    import pyarrow as pa
    from anomaly_vae.schema import validate_arrow
    if not isinstance(values, pd.Series) and np.asarray(values).dtype.kind != "c":   # Arrow has no complex
        with pytest.raises(SchemaMismatchError, match="column 'amount': expected a number"):
            validate_arrow(s, pa.Table.from_pandas(df, preserve_index=False))


@pytest.mark.parametrize("X, match", [
    (None, "got NoneType"), ({"a": [1.0]}, r"got dict; pass pd.DataFrame\(d\)"),
    (pd.Series([1.0, 2.0]), r"got Series; pass series.to_frame\(\)"), ("text", "got str"),
    (np.array([["a", "b"]] * 3, dtype=object), "arrays must be numeric"),
    (np.array([[{"k": 1}, 2.0]] * 3, dtype=object), ""),
    (np.array([1.0, 2.0]), "Expected 2D array"),
])
def test_unusable_inputs_raise_our_errors(X, match):
    from anomaly_vae import AnomalyVAEError
    with pytest.raises(AnomalyVAEError, match=match):
        as_frame(X)


def test_arrow_integers_beyond_2_53_in_a_numeric_column_round_like_pandas(frame):
    import pyarrow as pa
    from anomaly_vae.schema import validate_arrow
    s = infer_schema(frame)
    df = frame.head(3).assign(x=[0, 1, 2**53 + 1])            # found by the 1,000-example fuzz run
    got = validate_arrow(s, pa.Table.from_pandas(df, preserve_index=False))["x"].to_pylist()
    assert got == s.validate(df)["x"].tolist() == [0.0, 1.0, float(2**53)]
