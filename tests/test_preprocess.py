import json

import numpy as np
import pytest

from anomaly_vae.preprocess import NULL, UNK, Preprocessor
from anomaly_vae.schema import infer_schema


@pytest.fixture()
def fitted_pre(frame):
    schema = infer_schema(frame)
    return schema, Preprocessor().fit(schema.validate(frame), schema)


def test_layout_and_shapes(frame, fitted_pre):
    schema, pre = fitted_pre
    X = pre.encode(schema.validate(frame))
    assert X.dtype == np.float32 and X.shape == (len(frame), pre.n_dims)
    spans = {s.column: s for s in pre.spans}
    assert spans["x"].indicator >= 0 and spans["amount"].indicator >= 0      # every numeric column
    assert pre.params["x"]["has_missing"] and not pre.params["amount"]["has_missing"]
    assert X[:, spans["amount"].indicator].sum() == 0 and X[:, spans["x"].indicator].sum() > 0
    assert pre.n_varying_dims == pre.n_dims - 3                              # amount's, y's, ts's
    assert spans["ts"].stop - spans["ts"].start == 4                         # hour + weekday sin/cos
    one_hot = X[:, spans["cat"].start:spans["cat"].stop]
    assert np.all(one_hot.sum(1) == 1)
    assert np.isfinite(X).all()
    num = X[:, pre.numeric_dims]
    assert abs(num[:, 0].mean()) < 0.1 and abs(num[:, 0].std() - 1) < 0.1


def test_fitted_on_training_rows_only(frame):
    schema = infer_schema(frame)
    data = schema.validate(frame)
    a = Preprocessor().fit(data.iloc[:500], schema).params["amount"]
    b = Preprocessor().fit(data, schema).params["amount"]
    assert a["mean"] != b["mean"] or a["median"] != b["median"]


def test_unseen_and_null_categories_map_to_unk_and_null(frame, fitted_pre):
    schema, pre = fitted_pre
    vocab = pre.params["cat"]["vocab"]
    assert vocab[-1] == UNK and NULL not in vocab      # no nulls in training
    df = frame.head(3).copy()
    df["cat"] = ["zzz", None, "a"]
    X = pre.encode(schema.validate(df))
    s = next(s for s in pre.spans if s.column == "cat")
    assert X[0, s.start + vocab.index(UNK)] == 1 and X[1, s.start + vocab.index(UNK)] == 1
    assert X[2, s.start + vocab.index("a")] == 1


def test_rare_categories_fold_into_unk(frame):
    df = frame.copy()
    df.loc[:2, "cat"] = "rare"
    schema = infer_schema(df)
    pre = Preprocessor(min_category_count=5).fit(schema.validate(df), schema)
    assert "rare" not in pre.params["cat"]["vocab"]


@pytest.mark.parametrize("transform", ["yeo-johnson", "standard", "robust", "signed-log", "quantile"])
def test_transforms_json_roundtrip_and_invert(frame, transform):
    schema = infer_schema(frame)
    data = schema.validate(frame)
    pre = Preprocessor(numeric_transform=transform).fit(data, schema)
    again = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    X = pre.encode(data)
    np.testing.assert_array_equal(X, again.encode(data))
    back = pre.decode(X)
    np.testing.assert_allclose(back["amount"], data["amount"], rtol=1e-3)
    assert back["cat"].tolist() == data["cat"].tolist()


def test_extreme_values_stay_finite(frame, fitted_pre):
    schema, pre = fitted_pre
    df = frame.head(3).assign(amount=[1e300, -1e300, np.inf])
    X = pre.encode(schema.validate(df))
    assert np.isfinite(X).all()


@pytest.mark.parametrize("transform", ["standard", "yeo-johnson", "quantile", "signed-log"])
@pytest.mark.parametrize("huge", [1e308, 1.7e308, -1.7e308])
def test_one_absurd_training_value_neither_overflows_nor_disables_the_column(frame, transform, huge, caplog):
    schema = infer_schema(frame)
    bad = frame.copy()
    bad.loc[3, "amount"] = huge
    with caplog.at_level("WARNING", logger="anomaly_vae.preprocess"):
        pre = Preprocessor(transform).fit(schema.validate(bad), schema)
    p = pre.params["amount"]
    assert all(np.isfinite(p[k]) for k in ("median", "scale", "mean", "std", "min", "max"))
    json.loads(json.dumps(p, allow_nan=False))                  # no Infinity in preprocess.json
    assert "column 'amount': 1 training value(s)" in caplog.text and "check the data" in caplog.text
    clean = Preprocessor(transform).fit(schema.validate(frame), schema).params["amount"]
    assert p["std"] == pytest.approx(clean["std"], rel=0.05)     # the other rows set the scale
    X = pre.encode(schema.validate(frame))
    col = pre.spans[[s.column for s in pre.spans].index("amount")].start
    assert 0.5 < X[:, col].std() < 2                             # the column still varies
    assert abs(pre.encode(schema.validate(bad))[3, col]) > 10       # the absurd row is extreme


def test_huge_but_consistent_values_are_standardised_without_overflow(frame):
    schema = infer_schema(frame)
    big = frame.copy()
    big["amount"] = big["amount"] * 1e300                       # squares overflow; moments must not
    pre = Preprocessor().fit(schema.validate(big), schema)
    p = pre.params["amount"]
    assert np.isfinite(p["std"]) and p["std"] > 1e300
    X = pre.encode(schema.validate(big))
    col = pre.spans[[s.column for s in pre.spans].index("amount")].start
    assert abs(X[:, col].std() - 1) < 0.05


def test_arrow_columns_encode_like_the_pandas_path(frame):
    """The scoring path reads Arrow columns (validate_arrow + encode) and must give the same X
    as the pandas path: nulls, unseen/null categories, int categories, tz-aware and other-unit
    timestamps, dictionary-encoded strings, text that needs the pandas casting rules."""
    import pandas as pd
    import pyarrow as pa

    from anomaly_vae.errors import SchemaMismatchError
    from anomaly_vae.schema import validate_arrow

    df = frame.assign(code=np.arange(len(frame)) % 3)
    schema = infer_schema(df, categorical=["code"])
    pre = Preprocessor().fit(schema.validate(df), schema)
    test = df.head(400).copy()
    test.loc[test.index[:5], "cat"] = ["zzz", None, "a", "<unk>", None]
    test["flag"] = test["flag"].astype("boolean")
    test.loc[test.index[5:8], "flag"] = [None, True, False]
    test.loc[test.index[8:10], "ts"] = pd.NaT
    test.loc[test.index[10], "amount"] = np.inf
    ref = pre.encode(schema.validate(test))
    table = pa.Table.from_pandas(test, preserve_index=False)
    np.testing.assert_array_equal(pre.encode(validate_arrow(schema, table)), ref)
    compact = pre.encode_compact(validate_arrow(schema, table))     # what batch scoring reads
    np.testing.assert_array_equal(compact.head, ref[:, :pre.cat_start])
    np.testing.assert_array_equal(compact.codes, np.stack([a + np.argmax(ref[:, a:b], axis=1)
                                                           for a, b in pre.categorical_spans], 1))
    np.testing.assert_array_equal(compact.dense(), ref)
    np.testing.assert_array_equal(compact.dense(np.array([3, 0])), ref[[3, 0]])
    variants = {
        "ts": pa.array(test["ts"].dt.tz_localize("UTC").dt.tz_convert("Asia/Tokyo")),   # same instants
        "cat": pa.array(test["cat"]).dictionary_encode(),
        "amount": pa.array(test["amount"].astype(str)),                               # text numbers
    }
    for name, arr in variants.items():
        t = table.set_column(table.schema.get_field_index(name), name, arr)
        np.testing.assert_array_equal(pre.encode(validate_arrow(schema, t.to_batches()[0])), ref, err_msg=name)
    t = pa.Table.from_pandas(test, preserve_index=False).cast(
        pa.schema([pa.field(f.name, pa.timestamp("s") if f.name == "ts" else f.type) for f in table.schema]))
    np.testing.assert_array_equal(pre.encode(validate_arrow(schema, t)), ref)
    bad = table.set_column(table.schema.get_field_index("amount"), "amount",
                           pa.array(["12.5", "twelve"] + ["1"] * (len(test) - 2)))
    with pytest.raises(SchemaMismatchError, match="column 'amount'.*twelve"):
        validate_arrow(schema, bad)
    with pytest.raises(SchemaMismatchError, match=r"missing required column\(s\) \['x'\]"):
        validate_arrow(schema, table.drop_columns(["x"]))
