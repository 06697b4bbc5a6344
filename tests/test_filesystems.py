"""Inputs and outputs on pyarrow filesystems: a real S3 API (moto's server on 127.0.0.1, started
and stopped here), file:// URIs and a local hive-partitioned dataset; the real CLI end to end."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from anomaly_vae import batch, io
from anomaly_vae.errors import DataError

ENTRY_POINT = Path(sys.executable).with_name("anomaly-vae")
DAYS = ("2026-01-01", "2026-01-02")
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (random port) with bucket 'lake'; AWS_* variables point
    pyarrow at it for this module. Yields the environment a CLI subprocess needs."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    io._remote.cache_clear()
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="lake")
        yield env
    finally:
        io._remote.cache_clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def rows():
    from conftest import mixed_frame
    return mixed_frame(n=300, seed=11)


def _put(uri: str, df: pd.DataFrame) -> None:
    fs, path = io.filesystem(uri)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, filesystem=fs)


def _keys(uri: str) -> list[str]:
    fs, path = io.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(os.path.relpath(i.path, path) for i in infos if i.type == pafs.FileType.File)


def _hive_on_s3(prefix: str, rows: pd.DataFrame) -> None:
    for i, day in enumerate(DAYS):
        _put(f"{prefix}/dt={day}/part-0.parquet", rows.iloc[i * 100:(i + 1) * 100])
    _put(f"{prefix}/_tmp/part-9.parquet", rows.head(5))           # '_' folders are not inputs
    io.write_bytes(f"{prefix}/dt={DAYS[0]}/_SUCCESS", b"")


def test_uri_helpers_keep_the_scheme():
    assert io.location("file:///tmp/x.parquet") == Path("/tmp/x.parquet")
    assert io.location("S3://lake/in/") == "s3://lake/in"
    assert io.join("s3://lake/out", "dt=1/../dt=2", "a.parquet") == "s3://lake/out/dt=2/a.parquet"
    assert io.parent("s3://lake/in/a.parquet") == "s3://lake/in"
    assert io.relative_dir("s3://lake/in/dt=1", "s3://lake/in") == "dt=1"
    assert io.basename("gs://b/k/part-0.parquet") == "part-0.parquet"
    assert not io.is_uri("data/x.parquet") and io.is_uri("hdfs://nn:8020/x")
    out = batch.output_paths(["s3://lake/in/dt=1/p.parquet"], "s3://lake/scored", ["s3://lake/in"])
    assert out == ["s3://lake/scored/dt=1/p.scored.parquet"]


def test_s3_listing_globs_and_bad_paths(s3, rows):
    _hive_on_s3("s3://lake/list", rows)
    files = io.expand_inputs(["s3://lake/list/"])
    assert files == [f"s3://lake/list/dt={d}/part-0.parquet" for d in DAYS]
    assert io.expand_inputs(["s3://lake/list/dt=*/*.parquet"]) == files
    assert io.expand_inputs(["s3://lake/list/**/part-0.parquet"]) == files
    pairs = io.expand_inputs_with_roots([files[1]])
    assert pairs == [(files[1], f"s3://lake/list/dt={DAYS[1]}")]
    assert io.read_table(files[0])["row_id"].tolist() == rows["row_id"].iloc[:100].tolist()
    assert io.count_rows(files[0]) == 100
    with pytest.raises(DataError, match=r"s3://lake/nothing: no such file or directory"):
        io.expand_inputs(["s3://lake/nothing"])
    with pytest.raises(DataError, match=r"s3://lake/list/dt=\*/\*\.csv: pattern matches no"):
        io.expand_inputs(["s3://lake/list/dt=*/*.csv"])


def test_score_files_s3_to_s3_publishes_success_last_and_resumes(s3, fitted, rows, tmp_path):
    _hive_on_s3("s3://lake/in", rows)
    pairs = io.expand_inputs_with_roots(["s3://lake/in"])
    inputs, roots = [f for f, _ in pairs], [r for _, r in pairs]
    res = batch.score_files(fitted, inputs, "s3://lake/scored", batch_size=64, roots=roots)
    assert res["summary"]["scored"] == 2 and res["summary"]["rows"] == 200
    assert _keys("s3://lake/scored") == ["_SUCCESS", "_manifest.json"] + [
        f"dt={d}/part-0.scored.parquet" for d in DAYS]
    # the same rows scored from a local copy give the same scores
    local = tmp_path / "local.parquet"
    rows.iloc[:100].to_parquet(local, index=False)
    batch.score_file(fitted, local, tmp_path / "local.scored.parquet")
    want = pd.read_parquet(tmp_path / "local.scored.parquet")
    got = io.read_table(f"s3://lake/scored/dt={DAYS[0]}/part-0.scored.parquet")
    pd.testing.assert_frame_equal(got, want)
    # the output prefix is a hive dataset: dt comes back as a column
    fs, path = io.filesystem("s3://lake/scored")
    table = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert sorted(set(table.column("dt").to_pylist())) == list(DAYS)
    # a killed run's temporary is removed; --resume skips the finished inputs
    stale = f"s3://lake/scored/dt={DAYS[1]}/.part-0.scored.parquet.tmp-0badc0de"
    io.write_bytes(stale, b"half")
    manifest = batch.read_manifest("s3://lake/scored")
    assert manifest["files"][inputs[0]]["output"] == f"s3://lake/scored/dt={DAYS[0]}/part-0.scored.parquet"
    res = batch.score_files(fitted, inputs, "s3://lake/scored", resume=True, roots=roots)
    assert (res["summary"]["scored"], res["summary"]["skipped"]) == (0, 2)
    assert not io.is_file(stale) and io.is_file("s3://lake/scored/_SUCCESS")
    # a changed input is rescored on --resume (size/mtime fingerprint from the object store)
    _put(inputs[1], rows.iloc[100:150])
    res = batch.score_files(fitted, inputs, "s3://lake/scored", resume=True, roots=roots)
    assert (res["summary"]["scored"], res["summary"]["skipped"]) == (1, 1)
    assert io.count_rows(f"s3://lake/scored/dt={DAYS[1]}/part-0.scored.parquet") == 50


def test_failed_s3_write_leaves_no_object_and_no_success(s3, fitted, rows):
    _put("s3://lake/bad/a.parquet", rows.head(50))
    io.write_bytes("s3://lake/bad/b.parquet", b"PAR1 not really parquet")
    inputs = io.expand_inputs(["s3://lake/bad"])
    with pytest.raises(DataError, match=r"s3://lake/bad/b\.parquet: cannot read as parquet"):
        batch.score_files(fitted, inputs, "s3://lake/bad-out", roots=["s3://lake/bad"] * 2)
    assert _keys("s3://lake/bad-out") == ["_manifest.json", "a.scored.parquet"]   # no _SUCCESS
    manifest = batch.read_manifest("s3://lake/bad-out")
    assert manifest["files"]["s3://lake/bad/b.parquet"]["status"] == "failed"

    def broken():
        yield pa.record_batch({"x": [1.0]})
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        io.write_stream("s3://lake/bad-out/c.parquet", pa.schema([("x", pa.float64())]), broken())
    assert "c.parquet" not in _keys("s3://lake/bad-out")
    assert not any(".tmp-" in k for k in _keys("s3://lake/bad-out"))


def test_local_hive_dataset_and_file_uri(fitted, rows, tmp_path):
    hive = tmp_path / "hive"
    for i, day in enumerate(DAYS):
        (hive / f"dt={day}").mkdir(parents=True)
        rows.iloc[i * 100:(i + 1) * 100].to_parquet(hive / f"dt={day}" / "part-0.parquet", index=False)
    pairs = io.expand_inputs_with_roots([f"file://{hive}"])
    assert [f for f, _ in pairs] == [hive / f"dt={d}" / "part-0.parquet" for d in DAYS]
    out = tmp_path / "out"
    batch.score_files(fitted, [f for f, _ in pairs], f"file://{out}", roots=[r for _, r in pairs])
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert sorted(set(table.column("dt").to_pylist())) == list(DAYS)
    assert (out / "_SUCCESS").is_file()
    # partition values are folders, not columns: the model's input is the file's own columns
    assert "dt" not in io.input_schema(pairs[0][0]).names
    ids = table.sort_by("row_id").column("row_id").to_pylist()
    assert ids == sorted(rows["row_id"].iloc[:200].tolist())


def test_cli_scores_s3_end_to_end(s3, fitted, rows, tmp_path):
    """The installed console script reads s3:// inputs and writes s3:// outputs; a bad input is
    one line naming the object, exit 2, and no output object for it."""
    model = tmp_path / "model"
    fitted.save(model)
    _hive_on_s3("s3://lake/cli-in", rows)
    env = {**os.environ, **s3, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    cmd = [str(ENTRY_POINT), "-q", "score", "--no-mlflow", "-m", str(model), "s3://lake/cli-in/", "-o", "s3://lake/cli-out"]
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _keys("s3://lake/cli-out") == ["_SUCCESS", "_manifest.json"] + [
        f"dt={d}/part-0.scored.parquet" for d in DAYS]
    io.write_bytes("s3://lake/cli-in/dt=2026-01-03/part-0.parquet", b"garbage")
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "s3://lake/cli-in/dt=2026-01-03/part-0.parquet" in lines[0], r.stderr
    keys = _keys("s3://lake/cli-out")
    assert "_SUCCESS" not in keys and not any(k.startswith("dt=2026-01-03") for k in keys)
    np.testing.assert_array_equal(io.read_table(f"s3://lake/cli-out/dt={DAYS[0]}/part-0.scored.parquet")
                                  ["row_id"].to_numpy(), rows["row_id"].iloc[:100].to_numpy())
