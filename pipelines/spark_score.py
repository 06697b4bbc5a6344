"""spark-submit entry point: score a parquet dataset with an anomaly-vae model on Spark.

    spark-submit --master local[2] pipelines/spark_score.py --model models:/payments@champion \\
        data/incoming/ scored/spark/ --partition-by dt

Exit codes: 0 ok, 2 bad input or model (one line on stderr naming the file/column), 1 other
errors. The work is `anomaly_vae.spark.score_dataset` (mapInArrow over `batch.score_batch`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spark_score.py", description="Score a parquet dataset on Spark.")
    p.add_argument("source", help="parquet file or folder (hive partitions are read as columns)")
    p.add_argument("output", help="output folder (parquet via Spark's commit protocol, _SUCCESS last)")
    p.add_argument("--model", "-m", required=True,
                   help="model directory, models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model")
    p.add_argument("--keep", choices=("ids", "all"), default="ids", help="pass-through columns")
    p.add_argument("--partition-by", action="append", default=[], metavar="COL",
                   help="partition the output by this input column (repeatable), e.g. dt")
    p.add_argument("--mode", default="errorifexists", help="Spark save mode (default: errorifexists)")
    args = p.parse_args(argv)

    from pyspark.sql import SparkSession

    from anomaly_vae.errors import AnomalyVAEError
    from anomaly_vae.spark import score_dataset

    spark = SparkSession.builder.appName("anomaly-vae score").getOrCreate()
    try:
        res = score_dataset(spark, args.model, args.source, args.output, keep=args.keep,
                            partition_by=args.partition_by, mode=args.mode)
    except AnomalyVAEError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    finally:
        spark.stop()
    print(f"rows: {res['rows']:,} scored, {res['flagged']:,} flagged; output: {res['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
