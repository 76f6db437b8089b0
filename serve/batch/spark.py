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
``s3a://``. PostgreSQL tables are read by the local engine only, and so are text
columns (ids or timestamps stored as strings): Spark takes numeric ride columns
(integer, float, decimal) and timestamp or date pickups. Validation is the local
engine's (:func:`serve.batch.core.check_table` on :func:`serve.batch.coerce.coerce_table`),
and so are the publish checks (:func:`serve.batch.core.refusal`).
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

from serve.batch.core import PICKUP, MonthRefused, Totals, month_window, refusal
from serve.batch.months import ride_id_prefix
from serve.batch.output import publish_file
from serve.errors import InvalidInput
from serve.features import LOCATION_COLUMNS, MAX_MINUTES, MIN_MINUTES, RIDE_COLUMNS
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
                     master: str = "local[*]", spark=None, max_reject_ratio: float = 0.5):
    """Score ``input_uri`` on Spark into the two output files; returns (Totals, input shown).

    Without ``spark``, a session is started for this call and stopped at its end (unless
    one was already active in this process: that one is used and left running).
    """
    args = (loaded, input_uri, month, pred_uri, rej_uri, max_reject_ratio)
    if spark is not None:
        return _score(spark, *args)
    with scoped_session(master) as spark:
        return _score(spark, *args)


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


def _check_types(raw, pickup: str, dropoff: str, source: str) -> bool:
    """Refuse column types the Spark engine does not convert; whether a timestamp is a date
    without a time of day (then durations are unknown)."""
    from pyspark.sql.types import DateType, NumericType, TimestampNTZType, TimestampType

    types = {f.name: f.dataType for f in raw.schema.fields}
    for c in RIDE_COLUMNS:
        if not isinstance(types[c], NumericType):
            raise InvalidInput(f"{source}: column {c} is {types[c].simpleString()}: "
                               f"--engine spark reads numeric ride columns; use --engine "
                               f"local, which converts text", field=c)
    for c in (pickup, dropoff):
        if not isinstance(types[c], (TimestampType, TimestampNTZType, DateType)):
            raise InvalidInput(f"{source}: column {c} is {types[c].simpleString()}: "
                               f"--engine spark reads timestamp columns; use --engine local, "
                               f"which parses text", field=c)
    return any(isinstance(types[c], DateType) for c in (pickup, dropoff))


def _reject_id(c: str):
    """A location id of a rejected row as the local engine writes it: long, null if not an
    integer id."""
    from pyspark.sql import functions as F

    d = F.col(c).cast("double")
    integral = ~F.isnan(d) & (F.abs(d) < F.lit(2.0 ** 62)) & (d == F.floor(d))
    return F.when(integral, d.cast("long")).alias(c)


def _score(spark, loaded, input_uri: str, month: str, pred_uri: str, rej_uri: str,
           max_reject_ratio: float):
    import mlflow.pyfunc
    import pandas as pd
    import pyarrow as pa
    from pyspark.sql import functions as F

    from serve.batch.coerce import coerce_table
    from serve.batch.core import check_table
    from serve.urls import masked

    path = spark_input(input_uri)
    if "://" not in path:  # a local file: one line for a missing, empty or cut one
        from serve.tlc import open_parquet

        open_parquet(path).close()
    raw = spark.read.parquet(path)
    pickup, dropoff = trip_columns(raw.columns, masked(input_uri))
    date_only = _check_types(raw, pickup, dropoff, masked(input_uri))

    @F.pandas_udf("string")
    def reason(pu: pd.Series, do: pd.Series, dist: pd.Series) -> pd.Series:
        table = coerce_table(pa.table({c: pa.array(v, from_pandas=True) for c, v in
                                       zip(RIDE_COLUMNS, (pu, do, dist), strict=True)}))
        return pd.Series(check_table(table)[1].astype(str))

    def micros(col: str):
        return F.unix_micros(F.col(col).cast("timestamp"))

    actual = (F.lit(None).cast("double") if date_only else
              (micros(dropoff) - micros(pickup)) / F.lit(60_000_000.0))
    df = raw.select(
        F.col("_metadata.row_index").alias(ROW),
        F.concat(F.lit(ride_id_prefix(month)), F.col("_metadata.row_index").cast("string"))
        .alias("ride_id"),
        F.col(pickup).cast("timestamp_ntz").alias(PICKUP),
        actual.alias("actual_duration"),
        *(F.col(c) for c in RIDE_COLUMNS),
    ).withColumn("reason", reason(*(F.col(c) for c in RIDE_COLUMNS)))

    udf = mlflow.pyfunc.spark_udf(spark, loaded.ref.pinned_uri, env_manager="local",
                                  result_type="double")
    valid = df.where(F.col("reason") == "").select(
        ROW, "ride_id", PICKUP,
        *(F.col(c).cast("double").cast("long").alias(c) for c in LOCATION_COLUMNS),
        "actual_duration", F.col("trip_distance").cast("double").alias("trip_distance"))
    scored = valid.withColumn("predicted_duration", udf(F.struct(
        "PULocationID", "DOLocationID", "trip_distance")))
    predictions = scored.select(
        ROW, "ride_id", PICKUP, "PULocationID", "DOLocationID", "actual_duration",
        "predicted_duration", (F.col("actual_duration") - F.col("predicted_duration"))
        .alias("diff"), F.lit(loaded.version).cast("string").alias("model_version"))
    distance = F.col("trip_distance").cast("double")
    rejects = df.where(F.col("reason") != "").select(
        ROW, "ride_id", PICKUP, *(_reject_id(c) for c in LOCATION_COLUMNS),
        F.when(~F.isnan(distance), distance).alias("trip_distance"), "reason")

    staging = Path(tempfile.mkdtemp(prefix="duration-spark-"))
    try:
        files = {}
        for name, frame in (("predictions", predictions), ("rejects", rejects)):
            # Ordered by input row and one file per month, like the local engine.
            out = staging / name
            frame.orderBy(ROW).drop(ROW).coalesce(1).write.parquet(str(out))
            files[name] = out
        totals = Totals(**_totals(spark, str(files["predictions"]), str(files["rejects"]),
                                  MIN_MINUTES, MAX_MINUTES, month))
        if why := refusal(totals, month, max_reject_ratio):
            raise MonthRefused(f"{masked(input_uri)}: {why}; nothing was written, the "
                               f"month's output is left as it was")
        publish_file(_part_file(files["rejects"]), rej_uri)
        publish_file(_part_file(files["predictions"]), pred_uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return totals, masked(input_uri)


def _part_file(folder: Path) -> Path:
    parts = sorted(folder.glob("part-*.parquet"))
    if len(parts) != 1:
        raise RuntimeError(f"expected one part file in {folder}, found {len(parts)}")
    return parts[0]


def _totals(spark, predictions: str, rejects: str, lo: float, hi: float, month: str) -> dict:
    """Counts and error sums from the written files (so the UDF is not run twice), and what
    :func:`~serve.batch.core.refusal` needs: pickups in the month, a first reject reason."""
    from collections import Counter

    from pyspark.sql import functions as F

    from serve.batch.core import MIN_IN_MONTH

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
    r = spark.read.parquet(rejects)
    rejected = r.count()
    first = r.select("reason").head(1)
    start, end = (F.lit(str(t)).cast("timestamp_ntz") for t in month_window(month))
    pickups = p.select(PICKUP).unionByName(r.select(PICKUP))
    seen = pickups.agg(F.count(PICKUP).alias("dated"), F.sum(
        ((F.col(PICKUP) >= start) & (F.col(PICKUP) < end)).cast("long")).alias("in_month")
    ).first().asDict()
    dated, in_month = int(seen["dated"]), int(seen["in_month"] or 0)
    months = Counter()
    if in_month < MIN_IN_MONTH * dated:
        months.update({m[0]: m[1] for m in pickups.groupBy(F.date_format(PICKUP, "yyyy-MM"))
                       .count().collect()})
    scored = int(row["scored"])
    return {"rows": scored + rejected, "scored": scored, "rejected": rejected,
            "evaluated": int(row["evaluated"] or 0), "sq_err": float(row["sq_err"] or 0.0),
            "abs_err": float(row["abs_err"] or 0.0), "pred_sum": float(row["pred_sum"] or 0.0),
            "dated": dated, "in_month": in_month, "first_reject": first[0][0] if first else "",
            "other_months": months}
