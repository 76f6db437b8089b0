"""``--engine spark``: the same month scored on Spark with ``mlflow.pyfunc.spark_udf``.

Built on :mod:`serve.batch.core` and :mod:`serve.batch.output` (they never import it).

Same input rows, same validation (:func:`serve.features.check_rides` in a pandas
UDF), same ride ids (Spark's ``_metadata.row_index``: the row's position in the
parquet file), same columns and partition path as the local engine. Spark
writes one ordered file to a local staging folder, which is then published with
the same temporary-name-then-move as the local engine (so ``s3://`` output
works without hadoop-aws on the driver).

Input: parquet (local path, or ``https://`` downloaded once). On a cluster,
``s3a://`` paths work when the cluster has hadoop-aws; ``s3://`` is passed as
``s3a://``. PostgreSQL tables are read by the local engine only.
"""

# No `from __future__ import annotations`: the pandas UDF's type hints must be real types.
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from serve.batch.core import PICKUP, Totals
from serve.batch.months import ride_id_prefix
from serve.batch.output import publish_file
from serve.errors import InvalidInput
from serve.features import MAX_MINUTES, MIN_MINUTES, RIDE_COLUMNS, check_rides
from serve.tlc import trip_columns

log = logging.getLogger(__name__)

ROW = "_row"


def spark_session(master: str = "local[*]", app: str = "duration-batch"):
    """A SparkSession for scoring: UTC session time, no UI, workers on this Python."""
    from pyspark.sql import SparkSession

    # Python workers must be this interpreter (it has serve/ and the model's libraries).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    spark = (SparkSession.builder.master(master).appName(app)
             .config("spark.ui.enabled", "false")
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.sql.shuffle.partitions", "8")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def spark_input(uri: str) -> str:
    """The path Spark reads: https is downloaded once, s3:// becomes s3a://."""
    scheme = urlparse(uri).scheme
    if scheme.startswith("postgresql"):
        raise InvalidInput("--engine spark reads parquet files; use --engine local for a "
                           "PostgreSQL table", field="--input")
    if scheme in ("http", "https"):
        from serve.tlc import download

        return str(download(uri))
    if scheme == "s3":
        return "s3a" + uri[2:]
    return uri


def score_with_spark(loaded, input_uri: str, month: str, pred_uri: str, rej_uri: str,
                     master: str = "local[*]", spark=None):
    """Score ``input_uri`` on Spark into the two output files; returns (Totals, input shown).

    Without ``spark``, a session is started for this call and stopped at its end (unless
    one was already active in this process: that one is used and left running).
    """
    if spark is not None:
        return _score(spark, loaded, input_uri, month, pred_uri, rej_uri)
    with scoped_session(master) as spark:
        return _score(spark, loaded, input_uri, month, pred_uri, rej_uri)


@contextmanager
def scoped_session(master: str = "local[*]"):
    """A session for a block, stopped at its end unless it was already active before."""
    from pyspark.sql import SparkSession

    owned = SparkSession.getActiveSession() is None
    spark = spark_session(master)
    try:
        yield spark
    finally:
        if owned:
            spark.stop()


def _score(spark, loaded, input_uri: str, month: str, pred_uri: str, rej_uri: str):
    import mlflow.pyfunc
    import pandas as pd
    from pyspark.sql import functions as F


    path = spark_input(input_uri)
    raw = spark.read.parquet(path)
    pickup, dropoff = trip_columns(raw.columns, input_uri)

    @F.pandas_udf("string")
    def reason(pu: pd.Series, do: pd.Series, dist: pd.Series) -> pd.Series:
        _, reasons = check_rides(pd.DataFrame(dict(zip(RIDE_COLUMNS, (pu, do, dist),
                                                       strict=True))))
        return pd.Series(reasons.astype(str))

    def micros(col: str):
        return F.unix_micros(F.col(col).cast("timestamp"))

    df = raw.select(
        F.col("_metadata.row_index").alias(ROW),
        F.concat(F.lit(ride_id_prefix(month)), F.col("_metadata.row_index").cast("string"))
        .alias("ride_id"),
        F.col(pickup).cast("timestamp_ntz").alias(PICKUP),
        ((micros(dropoff) - micros(pickup)) / F.lit(60_000_000.0)).alias("actual_duration"),
        *(F.col(c) for c in RIDE_COLUMNS),
    ).withColumn("reason", reason(*(F.col(c) for c in RIDE_COLUMNS)))

    udf = mlflow.pyfunc.spark_udf(spark, loaded.ref.pinned_uri, env_manager="local",
                                  result_type="double")
    valid = df.where(F.col("reason") == "").select(
        ROW, "ride_id", PICKUP,
        F.col("PULocationID").cast("long").alias("PULocationID"),
        F.col("DOLocationID").cast("long").alias("DOLocationID"),
        "actual_duration", F.col("trip_distance").cast("double").alias("trip_distance"))
    scored = valid.withColumn("predicted_duration", udf(F.struct(
        "PULocationID", "DOLocationID", "trip_distance")))
    predictions = scored.select(
        ROW, "ride_id", PICKUP, "PULocationID", "DOLocationID", "actual_duration",
        "predicted_duration", (F.col("actual_duration") - F.col("predicted_duration"))
        .alias("diff"), F.lit(loaded.version).cast("string").alias("model_version"))
    rejects = df.where(F.col("reason") != "").select(
        ROW, "ride_id", PICKUP, *(F.col(c).cast("double").alias(c) for c in RIDE_COLUMNS),
        "reason")

    staging = Path(tempfile.mkdtemp(prefix="duration-spark-"))
    try:
        files = {}
        for name, frame in (("predictions", predictions), ("rejects", rejects)):
            # Ordered by input row and one file per month, like the local engine.
            out = staging / name
            frame.orderBy(ROW).drop(ROW).coalesce(1).write.parquet(str(out))
            files[name] = out
        totals = _totals(spark, str(files["predictions"]), str(files["rejects"]),
                         MIN_MINUTES, MAX_MINUTES)
        publish_file(_part_file(files["rejects"]), rej_uri)
        publish_file(_part_file(files["predictions"]), pred_uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Totals(**totals), input_uri


def _part_file(folder: Path) -> Path:
    parts = sorted(folder.glob("part-*.parquet"))
    if len(parts) != 1:
        raise RuntimeError(f"expected one part file in {folder}, found {len(parts)}")
    return parts[0]


def _totals(spark, predictions: str, rejects: str, lo: float, hi: float) -> dict:
    """Counts and error sums from the written files (so the UDF is not run twice)."""
    from pyspark.sql import functions as F

    p = spark.read.parquet(predictions)
    in_range = (F.col("actual_duration") >= lo) & (F.col("actual_duration") <= hi)
    err = F.col("predicted_duration") - F.col("actual_duration")
    row = p.agg(
        F.count("*").alias("scored"),
        F.sum(in_range.cast("long")).alias("evaluated"),
        F.sum(F.when(in_range, err * err)).alias("sq_err"),
        F.sum(F.when(in_range, F.abs(err))).alias("abs_err"),
        F.sum("predicted_duration").alias("pred_sum"),
    ).first().asDict()
    rejected = spark.read.parquet(rejects).count()
    scored = int(row["scored"])
    return {"rows": scored + rejected, "scored": scored, "rejected": rejected,
            "evaluated": int(row["evaluated"] or 0), "sq_err": float(row["sq_err"] or 0.0),
            "abs_err": float(row["abs_err"] or 0.0), "pred_sum": float(row["pred_sum"] or 0.0)}
