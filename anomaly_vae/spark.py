"""Score a parquet dataset on Spark: `batch.score_batch` on the executors via `mapInArrow`.

Optional extra: ``pip install 'anomaly-vae[spark]'`` (pyspark; executors need this package and
torch installed in the same Python environment). The driver loads the model once (a model
directory or an MLflow URI, resolved with the registry like the CLI), and ships its files
(JSON + safetensors, a few MB) to the executors as a broadcast; each Python worker rebuilds the
detector from them (hash-checked) and scores the Arrow record batches Spark hands it. The same
`score_batch` runs in the CLI's streaming loop, so Spark's scores equal the CLI's.

Why mapInArrow and not `mlflow.pyfunc.spark_udf`: spark_udf converts each batch to pandas,
calls the pyfunc and converts back through a struct return type derived from the signature,
needs MLflow (and registry access) on every executor, and returns only the score columns;
mapInArrow passes Arrow batches straight into `score_batch` and out, keeps pass-through and
partition columns with their own types, and needs nothing but this package on the executors.

Run it with spark-submit (see README "Spark")::

    spark-submit --master yarn pipelines/spark_score.py --model models:/payments@champion \\
        s3a://lake/transactions/ s3a://lake/scored/ --partition-by dt

Spark writes through its commit protocol (task output under ``_temporary``, moved on job
commit, ``_SUCCESS`` last); on S3 use an S3A committer (magic or directory) so the commit does
not rely on renames.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import pyarrow as pa

from anomaly_vae import batch as B
from anomaly_vae.errors import AnomalyVAEError, ConfigError, DataError, SchemaMismatchError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from anomaly_vae.detector import VAEAnomalyDetector

log = logging.getLogger(__name__)
_FILE_COL = "__anomaly_vae_file"
_ERROR_LINE = re.compile(r"anomaly_vae\.errors\.(DataError|SchemaMismatchError|ConfigError): (.+)")


def _model_files(det: "VAEAnomalyDetector") -> dict[str, bytes]:
    """The files of `det` saved as a model directory: {relative path: bytes}."""
    with tempfile.TemporaryDirectory(prefix="anomaly-vae-spark-") as tmp:
        root = Path(det.save(Path(tmp) / "model"))
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@functools.lru_cache(maxsize=4)
def _detector_from_files(key: str, files: tuple[tuple[str, bytes], ...]) -> "VAEAnomalyDetector":
    """Rebuild the detector in a Python worker (once per worker process and model)."""
    from anomaly_vae.fitted import FittedDetector

    with tempfile.TemporaryDirectory(prefix=f"anomaly-vae-{key[:8]}-") as tmp:
        for rel, data in files:
            dst = Path(tmp) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
        return FittedDetector.load(tmp)


def score_dataframe(df: "DataFrame", det: "VAEAnomalyDetector", *, keep: str = "ids",
                    extra: Sequence[str] = ()) -> "DataFrame":
    """Spark DataFrame of scores: pass-through columns (the model's id columns present in `df`
    and `extra`, e.g. partition columns; every column with keep="all") + the score columns,
    one row per input row, computed by `batch.score_batch` on the executors.

    A feature column missing from `df` is a SchemaMismatchError before any work starts; bad
    values surface when an action runs (see `score_dataset`).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    if keep not in ("ids", "all"):
        raise DataError(f"keep must be 'ids' or 'all', got {keep!r}")
    features = [c.name for c in det.schema_.features]
    missing = [c for c in features if c not in df.columns]
    if missing:
        raise SchemaMismatchError(f"missing required column(s) {missing}; the model was trained on {features}")
    absent = [c for c in extra if c not in df.columns]
    if absent:
        raise DataError(f"column(s) {absent} to keep are not in the input (columns: {df.columns})")
    wanted = list(df.columns) if keep == "all" else [c for c in det.schema_.ids if c in df.columns]
    passthrough = [c for c in dict.fromkeys(wanted + list(extra)) if c not in B.SCORE_COLUMNS]
    read = list(dict.fromkeys(passthrough + features))
    in_schema = to_arrow_schema(df.select(*read).schema)
    out_schema = B.output_schema(in_schema, passthrough)
    files = tuple(_model_files(det).items())
    key = hashlib.sha256(b"".join(n.encode() + d for n, d in files)).hexdigest()
    shipped = df.sparkSession.sparkContext.broadcast(files)

    def score_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        torch.set_num_threads(1)                       # one Python worker per executor core
        model = _detector_from_files(key, shipped.value)
        for rb in batches:
            if rb.num_rows == 0:
                continue
            try:
                yield B.score_batch(model, rb, passthrough, schema=out_schema)
            except AnomalyVAEError as exc:
                where = rb.column(_FILE_COL)[0].as_py() if _FILE_COL in rb.schema.names else "input"
                raise type(exc)(f"{where}: {str(exc).removeprefix('input: ')}") from None

    source = df.select(*read, F.col("_metadata.file_path").alias(_FILE_COL)) if _has_metadata(df) else df.select(*read)
    return source.mapInArrow(score_partition, from_arrow_schema(out_schema))


def _has_metadata(df: "DataFrame") -> bool:
    """True when `df` reads files (the hidden _metadata column names each row's file)."""
    try:
        df.select("_metadata.file_path").schema
        return True
    except Exception:  # noqa: BLE001 - not a file source (e.g. a DataFrame built in memory)
        return False


def score_dataset(spark: "SparkSession", model: str | os.PathLike, source: str, output: str, *,
                  keep: str = "ids", partition_by: Sequence[str] = (), mode: str = "errorifexists"
                  ) -> dict[str, Any]:
    """Score the parquet dataset at `source` (a file, folder or hive-partitioned folder; any
    Hadoop filesystem URI) with `model` (model directory, models:/NAME@ALIAS, models:/NAME/N or
    runs:/ID/model) and write parquet to `output`, partitioned by `partition_by` (kept as
    columns of the input, e.g. the hive partition dt). Hive partition folders of the input are
    read as columns by Spark; they are not model features.

    `mode` is Spark's save mode (errorifexists, overwrite, ...). Bad data (a value the model
    cannot read, a missing column) raises the library's error naming the file and column, and
    Spark's commit protocol leaves no `_SUCCESS` and no committed output. Returns
    {"rows", "flagged", "output"}.
    """
    from anomaly_vae.fitted import FittedDetector
    from anomaly_vae.registry import load_detector

    det, info = load_detector(model, FittedDetector)
    try:
        df = spark.read.parquet(source)
    except Exception as exc:  # noqa: BLE001 - AnalysisException: path does not exist, not parquet
        raise DataError(f"{source}: cannot read as parquet: {_first_line(exc)}") from exc
    try:
        scores = score_dataframe(df, det, keep=keep, extra=partition_by)
    except AnomalyVAEError as exc:
        raise type(exc)(f"{source}: {exc}") from exc
    try:
        scores.write.mode(mode).partitionBy(*partition_by).parquet(output)
    except Exception as exc:  # noqa: BLE001 - executor errors arrive wrapped by Py4J / Spark
        raise _library_error(exc) from exc
    from pyspark.sql import functions as F

    counted = spark.read.parquet(output).agg(F.count(F.lit(1)).alias("rows"),
                                            F.count(F.when(F.col("is_anomaly"), 1)).alias("flagged")).first()
    rows, flagged = counted["rows"], counted["flagged"]
    log.info("scored %d rows with %s into %s", rows, info["uri"], output)
    return {"rows": int(rows), "flagged": int(flagged), "output": output, "model": info}


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).strip().splitlines()[:1]) or type(exc).__name__


def _library_error(exc: BaseException) -> BaseException:
    """The AnomalyVAEError an executor raised, rebuilt from Spark's wrapped traceback text
    (or `exc` itself when it is not one of ours)."""
    found = _ERROR_LINE.findall(str(exc))
    if not found:
        return exc
    kind, message = found[-1]
    return {"SchemaMismatchError": SchemaMismatchError, "ConfigError": ConfigError}.get(kind, DataError)(message.strip())
