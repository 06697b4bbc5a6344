"""anomaly_vae.spark on a real SparkSession (local[2], 127.0.0.1): Spark's scores equal the
library's on the same rows, for a model directory and a registered MLflow model; bad input is
the library's one-line error; spark-submit's entry point end to end."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anomaly_vae import batch, io
from anomaly_vae.errors import DataError, SchemaMismatchError

pyspark = pytest.importorskip("pyspark", reason="pyspark is in the dev and spark extras")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("Spark needs Java (17 is installed on the project's machines)", allow_module_level=True)

from anomaly_vae import spark as S  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DAYS = ("2026-01-01", "2026-01-02", "2026-01-03")
LOCAL_CONF = {"spark.master": "local[2]", "spark.driver.host": "127.0.0.1",
              "spark.driver.bindAddress": "127.0.0.1", "spark.ui.enabled": "false",
              "spark.sql.shuffle.partitions": "2", "spark.sql.session.timeZone": "UTC",
              "spark.sql.execution.arrow.maxRecordsPerBatch": "128"}


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("anomaly-vae tests")
    for k, v in LOCAL_CONF.items():
        builder = builder.config(k, v)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """A hive-partitioned parquet dataset (dt=.../part-0.parquet), 3 days x 200 rows, and its rows."""
    from conftest import mixed_frame

    rows = mixed_frame(n=600, seed=5)
    root = tmp_path_factory.mktemp("lake") / "transactions"
    for i, day in enumerate(DAYS):
        (root / f"dt={day}").mkdir(parents=True)
        # Spark reads microsecond timestamps (parquet TIMESTAMP(NANOS) needs a legacy flag)
        pq.write_table(pa.Table.from_pandas(rows.iloc[200 * i:200 * (i + 1)], preserve_index=False),
                       root / f"dt={day}" / "part-0.parquet", coerce_timestamps="us")
    return root, rows


@pytest.fixture(scope="module")
def model_dir(fitted, tmp_path_factory):
    return Path(fitted.save(tmp_path_factory.mktemp("spark-model") / "model"))


def _library_scores(det, rows: pd.DataFrame) -> pd.DataFrame:
    table = pa.Table.from_pandas(rows, preserve_index=False)
    rb = table.combine_chunks().to_batches()[0]
    return batch.score_batch(det, rb, ["row_id"]).to_pandas()


def _assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    got = got.sort_values("row_id").reset_index(drop=True)
    want = want.sort_values("row_id").reset_index(drop=True)
    assert got["row_id"].tolist() == want["row_id"].tolist()
    # the same bits: a row's scores do not depend on the Arrow batch Spark puts it in (model.pad_rows)
    for c in ("anomaly_score", "recon_nll", "kl", "p_value", "is_anomaly", "top_features"):
        assert got[c].tolist() == want[c].tolist(), c
    assert [list(e) for e in got["explanation"]] == [list(e) for e in want["explanation"]]


def test_spark_scores_equal_the_library(spark, lake, fitted, model_dir, tmp_path):
    root, rows = lake
    out = tmp_path / "scored"
    res = S.score_dataset(spark, model_dir, str(root), str(out), partition_by=["dt"])
    assert res["rows"] == 600 and (out / "_SUCCESS").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"dt={d}" for d in DAYS]
    got = pd.read_parquet(out)                      # dt back as a column from the partition folders
    assert list(got.columns[:1 + len(batch.SCORE_COLUMNS)]) == ["row_id", *batch.SCORE_COLUMNS]
    assert sorted(got["dt"].astype(str).unique()) == list(DAYS)
    assert res["flagged"] == int(got["is_anomaly"].sum())
    _assert_same(got, _library_scores(fitted, rows))
    # the scores of one day sit in that day's folder
    day = pd.read_parquet(out / f"dt={DAYS[1]}")
    assert sorted(day["row_id"]) == sorted(rows["row_id"].iloc[200:400])


def test_spark_with_a_registered_mlflow_model(spark, lake, tmp_path, new_mlflow_store, monkeypatch):
    from anomaly_vae import registry
    from conftest import log_demo_model

    uri, det, train, test, run = log_demo_model(new_mlflow_store(tmp_path), n_rows=1200, n_train=900,
                                                seed=2, name="spark-demo", dataset_name="demo")
    test = test.assign(timestamp=test["timestamp"].dt.floor("us"))     # what Spark reads
    src = tmp_path / "demo"
    src.mkdir()
    pq.write_table(pa.Table.from_pandas(test, preserve_index=False), src / "part-0.parquet",
                   coerce_timestamps="us")
    out = tmp_path / "scored-mlflow"
    res = S.score_dataset(spark, "models:/spark-demo/1", str(src), str(out), keep="all")
    assert res["rows"] == len(test) and res["model"]["version"] == 1
    got = pd.read_parquet(out)
    assert set(test.columns) <= set(got.columns)
    want = det.explain(test)
    got = got.set_index(test.columns[0]).loc[test[test.columns[0]]]
    for c in ("anomaly_score", "recon_nll", "kl"):
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-5)


def test_spark_bad_input_is_the_library_error(spark, lake, model_dir, tmp_path):
    root, rows = lake
    bad = tmp_path / "bad"
    bad.mkdir()
    broken = rows.head(50).assign(amount=["x"] * 50)            # strings in a numeric feature
    broken.to_parquet(bad / "part-0.parquet", index=False, coerce_timestamps="us")
    with pytest.raises(SchemaMismatchError, match=r"bad/part-0\.parquet: column 'amount': expected a number") as info:
        S.score_dataset(spark, model_dir, str(bad), str(tmp_path / "bad-out"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "bad-out" / "_SUCCESS").exists()
    rows.head(20).drop(columns=["amount"]).to_parquet(bad / "part-0.parquet", index=False,
                                                       coerce_timestamps="us")
    with pytest.raises(SchemaMismatchError, match=r"missing required column\(s\) \['amount'\]"):
        S.score_dataset(spark, model_dir, str(bad), str(tmp_path / "bad-out2"))
    with pytest.raises(DataError, match="nowhere: cannot read as parquet"):
        S.score_dataset(spark, model_dir, str(tmp_path / "nowhere"), str(tmp_path / "o"))


@pytest.mark.slow
def test_spark_submit_entry_point(lake, model_dir, tmp_path):
    """`spark-submit pipelines/spark_score.py` end to end (a second JVM: slow)."""
    root, _ = lake
    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    conf = [a for k, v in LOCAL_CONF.items() if k != "spark.master" for a in ("--conf", f"{k}={v}")]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    r = subprocess.run([str(submit), "--master", "local[2]", *conf, str(REPO / "pipelines" / "spark_score.py"),
                        "--model", str(model_dir), str(root), str(tmp_path / "out"), "--partition-by", "dt"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rows: 600 scored" in r.stdout and (tmp_path / "out" / "_SUCCESS").is_file()
