"""Batch scoring: a month of rides in, a predictions parquet out, evaluated in MLflow.

    python -m serve.batch --model-uri models:/duration@production \
        --input data/green_tripdata_2021-03.parquet --output out/
    python -m serve.batch --input 'data/green_tripdata_{month}.parquet' --output s3://b/p \
        --from 2021-01 --to 2021-12           # backfill, skips months already done

Input: a local path, ``s3://``, an ``https://`` TLC URL, or a PostgreSQL table
``postgresql+psycopg2://user:pw@host/db?table=rides&month=2021-03``. It is read
in chunks (parquet row batches, a server-side cursor for PostgreSQL), each chunk
is validated (:func:`serve.features.check_rides`), scored with the model's
vectorized path and appended to the output, so memory does not grow with the
month.

Output (one file per month)::

    OUT/taxi_type=<t>/year=<yyyy>/month=<mm>/predictions.parquet
    OUT/_rejects/taxi_type=<t>/year=<yyyy>/month=<mm>/rejects.parquet

``ride_id`` is ``f"{yyyy}/{mm}_{row}"`` with ``row`` the 0-based position of
the ride in the input (the course's id): stable across re-runs of the same
input. Every row with valid ride fields is scored, whatever its actual
duration; rows with bad ride fields go to the rejects file with the reason.
Both files are written under a hidden temporary name (``.``-prefixed, which
parquet readers and Spark ignore) and moved into place only when complete, so a
crash leaves no output file and a re-run replaces the month.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import click
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field

from serve.config import Settings
from serve.errors import InvalidInput
from serve.features import RIDE_COLUMNS, Rides, check_rides, duration_mask

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"
REJECTS_FILE = "rejects.parquet"
REJECTS_DIR = "_rejects"
ENGINES = ("local", "spark")
TAXI_TYPES = ("green", "yellow", "fhv", "fhvhv")
# Normalized chunk columns: every reader yields these, whatever the source calls them.
PICKUP, DROPOFF = "pickup_datetime", "dropoff_datetime"
CHUNK_COLUMNS = (PICKUP, DROPOFF, *RIDE_COLUMNS)

OUTPUT_SCHEMA = pa.schema([
    ("ride_id", pa.string()),
    ("pickup_datetime", pa.timestamp("us")),
    ("PULocationID", pa.int64()),
    ("DOLocationID", pa.int64()),
    ("actual_duration", pa.float64()),
    ("predicted_duration", pa.float64()),
    ("diff", pa.float64()),
    ("model_version", pa.string()),
])
REJECTS_SCHEMA = pa.schema([
    ("ride_id", pa.string()),
    ("pickup_datetime", pa.timestamp("us")),
    ("PULocationID", pa.float64()),
    ("DOLocationID", pa.float64()),
    ("trip_distance", pa.float64()),
    ("reason", pa.string()),
])
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
# A TLC file name, or a backfill template of one (`yellow_tripdata_{month}.parquet`).
_TLC_NAME = re.compile(
    r"(?P<taxi>green|yellow|fhvhv|fhv)_tripdata_(?P<month>\d{4}-\d{2}|\{month\})")


class BatchSettings(Settings):
    """Batch-mode settings (env: ``BATCH_EXPERIMENT``, ``BATCH_ROWS``) on top of the shared ones."""

    batch_experiment: str = Field("duration-batch",
                                  description="MLflow experiment of the evaluation runs.")
    batch_rows: int = Field(262_144, description="Rows per chunk read, scored and written.")


# -- months and locations -----------------------------------------------------------------
def parse_month(month: str, option: str = "--month") -> tuple[int, int]:
    """``"2021-03"`` -> ``(2021, 3)``; raises InvalidInput naming the option."""
    m = _MONTH.match(month or "")
    if not m or not 1 <= int(m[2]) <= 12:
        raise InvalidInput(f"{option} must be YYYY-MM, got {month!r}", field=option)
    return int(m[1]), int(m[2])


def month_range(first: str, last: str) -> list[str]:
    """Months from ``first`` to ``last`` inclusive, e.g. ``2021-11..2022-01``."""
    (y0, m0), (y1, m1) = parse_month(first, "--from"), parse_month(last, "--to")
    start, end = y0 * 12 + m0 - 1, y1 * 12 + m1 - 1
    if end < start:
        raise InvalidInput(f"--to {last} is before --from {first}", field="--to")
    return [f"{i // 12:04d}-{i % 12 + 1:02d}" for i in range(start, end + 1)]


def infer_from_name(uri: str) -> tuple[str | None, str | None]:
    """Taxi type and month from a TLC-style name (``green_tripdata_2021-03``) or a DB URL."""
    m = _TLC_NAME.search(uri)
    taxi, month = (m["taxi"], m["month"]) if m else (None, None)
    if month == "{month}":  # a backfill template names the taxi type, not the month
        month = None
    if is_database(uri):
        month = dict(parse_qsl(urlparse(uri).query)).get("month", month)
    return taxi, month


def is_database(uri: str) -> bool:
    """Whether ``uri`` is a SQLAlchemy PostgreSQL URL (a table input)."""
    return urlparse(uri).scheme.startswith("postgresql")


def join_uri(root: str, *parts: str) -> str:
    """``root/part/...`` for a local folder or an ``s3://`` prefix."""
    return "/".join([root.rstrip("/"), *parts])


def partition(taxi: str, month: str) -> str:
    """The hive-style partition folder of one month."""
    year, mm = parse_month(month)
    return f"taxi_type={taxi}/year={year:04d}/month={mm:02d}"


def predictions_uri(output: str, taxi: str, month: str) -> str:
    """Where the predictions of one month land."""
    return join_uri(output, partition(taxi, month), PREDICTIONS_FILE)


def rejects_uri(output: str, taxi: str, month: str) -> str:
    """Where the rejected rows of one month land (``_`` keeps them out of dataset reads)."""
    return join_uri(output, REJECTS_DIR, partition(taxi, month), REJECTS_FILE)


def ride_id_prefix(month: str) -> str:
    """The course's ride id prefix, ``"2021/03_"``."""
    year, mm = parse_month(month)
    return f"{year:04d}/{mm:02d}_"


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    from serve.tlc import resolve

    return resolve(uri)


def exists(uri: str) -> bool:
    """Whether a file exists at a local path or ``s3://`` URI."""
    fs, path = _resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


# -- the pure part: one chunk of rides -> predictions, rejects, running totals ------------
@dataclass
class Totals:
    """Running counts and error sums of one month (evaluation on 1 <= actual <= 60 minutes)."""

    rows: int = 0
    scored: int = 0
    rejected: int = 0
    evaluated: int = 0
    sq_err: float = 0.0
    abs_err: float = 0.0
    pred_sum: float = 0.0

    def add(self, other: Totals) -> None:
        """Accumulate another chunk's totals."""
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def metrics(self) -> dict[str, float]:
        """The numbers logged to MLflow; RMSE/MAE only when some rows could be evaluated."""
        out = {"rows": self.rows, "rows_scored": self.scored, "rows_rejected": self.rejected,
               "rows_evaluated": self.evaluated,
               "mean_predicted_duration": self.pred_sum / self.scored if self.scored else 0.0}
        if self.evaluated:
            out["rmse"] = float(np.sqrt(self.sq_err / self.evaluated))
            out["mae"] = self.abs_err / self.evaluated
        return out


@dataclass
class ScoredChunk:
    """Predictions and rejects of one chunk, as Arrow tables in the output schemas."""

    predictions: pa.Table
    rejects: pa.Table
    totals: Totals


def _numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column as numpy; integer columns with nulls become float with NaN."""
    return col.to_numpy(zero_copy_only=False)


def _micros(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A timestamp column as ``timestamp("us")`` (as is when it already is)."""
    return col if col.type == pa.timestamp("us") else pc.cast(col, pa.timestamp("us"),
                                                               safe=False)


def minutes_between(pickup: pa.ChunkedArray, dropoff: pa.ChunkedArray) -> np.ndarray:
    """Duration in minutes; NaN where a timestamp is missing."""
    return (_numpy(_micros(dropoff)) - _numpy(_micros(pickup))) / np.timedelta64(60, "s")


def score_chunk(chunk: pa.Table, first_row: int, model, version: str,
                id_prefix: str) -> ScoredChunk:
    """Validate, score and split one chunk (columns :data:`CHUNK_COLUMNS`).

    ``first_row`` is the chunk's offset in the input, so ride ids are positions in the input.
    ``model`` is a ``RideDurationModel`` (anything with ``predict_rides``).
    """
    n = chunk.num_rows
    frame = pd.DataFrame({c: _numpy(chunk.column(c)) for c in RIDE_COLUMNS})
    rides, reasons = check_rides(frame)
    ok = reasons == ""
    ids = pc.binary_join_element_wise(
        id_prefix, pc.cast(pa.array(np.arange(first_row, first_row + n)), pa.string()), "")
    pickup = _micros(chunk.column(PICKUP))
    actual = minutes_between(pickup, chunk.column(DROPOFF))

    valid = Rides(rides.pu[ok], rides.do[ok], rides.distance[ok])
    pred = np.asarray(model.predict_rides(valid), dtype=np.float64)
    act = actual[ok]
    keep = pa.array(ok)
    predictions = pa.table([
        ids.filter(keep), pickup.filter(keep), pa.array(valid.pu), pa.array(valid.do),
        pa.array(act, from_pandas=True), pa.array(pred), pa.array(act - pred, from_pandas=True),
        pa.repeat(pa.scalar(version, pa.string()), len(pred)),
    ], schema=OUTPUT_SCHEMA)

    if ok.all():
        rejects = REJECTS_SCHEMA.empty_table()
    else:  # only the rejected rows are converted
        bad = pa.array(~ok)
        rejects = pa.table([
            ids.filter(bad), pickup.filter(bad),
            *(pa.array(pd.to_numeric(frame[c].to_numpy()[~ok], errors="coerce")
                       .astype(np.float64), from_pandas=True) for c in RIDE_COLUMNS),
            pa.array(reasons[~ok].astype(str), pa.string()),
        ], schema=REJECTS_SCHEMA)

    m = duration_mask(act)
    err = pred[m] - act[m]
    totals = Totals(rows=n, scored=len(pred), rejected=n - len(pred), evaluated=int(m.sum()),
                    sq_err=float(err @ err), abs_err=float(np.abs(err).sum()),
                    pred_sum=float(pred.sum()))
    return ScoredChunk(predictions, rejects, totals)


# -- readers: every source yields Arrow tables with CHUNK_COLUMNS -------------------------
@dataclass
class Source:
    """An opened input: its total row count (for progress) and a chunk iterator factory."""

    uri: str
    rows: int | None
    chunks: Callable[[], Iterator[pa.Table]]


def _normalize(table: pa.Table, pickup: str, dropoff: str) -> pa.Table:
    return table.rename_columns(
        [PICKUP if c == pickup else DROPOFF if c == dropoff else c for c in table.column_names]
    ).select(list(CHUNK_COLUMNS))


def parquet_source(uri: str, batch_rows: int) -> Source:
    """A TLC parquet month (local, s3://, https://) read ``batch_rows`` at a time."""
    from serve.tlc import open_parquet, trip_columns

    with open_parquet(uri) as pf:
        pickup, dropoff = trip_columns(pf.schema_arrow.names, uri)
        rows = pf.metadata.num_rows
    columns = [pickup, dropoff, *RIDE_COLUMNS]

    def chunks() -> Iterator[pa.Table]:
        # Opened per call and closed when the chunks stop, early or not (https is cached).
        with open_parquet(uri) as f:
            for batch in f.iter_batches(batch_size=batch_rows, columns=columns):
                yield _normalize(pa.Table.from_batches([batch]), pickup, dropoff)

    return Source(uri, rows, chunks)


def _database_parts(uri: str, month: str | None) -> tuple[str, str, str]:
    """Split a table URL into (SQLAlchemy URL without our parameters, table, month)."""
    parsed = urlparse(uri)
    query = dict(parse_qsl(parsed.query))
    table = query.pop("table", None)
    month = query.pop("month", None) or month
    if not table:
        raise InvalidInput(f"database input needs ?table=NAME: {parsed.scheme}://...",
                           field="table")
    if not month:
        raise InvalidInput("database input needs a month (?month=YYYY-MM or --month)",
                           field="month")
    parse_month(month)
    return urlunparse(parsed._replace(query=urlencode(query))), table, month


def _plain_number(arr: pa.Array) -> pa.Array:
    """NUMERIC columns arrive as Decimal: make them floats, as validation expects numbers."""
    return pc.cast(arr, pa.float64()) if pa.types.is_decimal(arr.type) else arr


def database_source(uri: str, month: str | None, batch_rows: int) -> Source:
    """Rides of one month from a PostgreSQL table, streamed through a server-side cursor.

    Rows are filtered on the pickup column (``pickup >= month start and < next month``) and
    ordered by all the columns read, so row positions (hence ride ids) are stable.
    """
    import sqlalchemy as sa

    from serve.tlc import trip_columns

    url, table_name, month = _database_parts(uri, month)
    schema, _, name = table_name.rpartition(".")
    engine = sa.create_engine(url)
    try:
        table = sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=engine)
        pickup, dropoff = trip_columns(table.columns.keys(), f"table {table_name!r}")
        year, mm = parse_month(month)
        start = pd.Timestamp(year=year, month=mm, day=1)
        end = start + pd.offsets.MonthBegin(1)
        cols = [table.c[pickup], table.c[dropoff], *(table.c[c] for c in RIDE_COLUMNS)]
        where = sa.and_(table.c[pickup] >= start.to_pydatetime(),
                        table.c[pickup] < end.to_pydatetime())
        rows = None
        if sys.stderr.isatty():  # the count only feeds the progress bar, shown on a terminal
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.select(sa.func.count()).select_from(table).where(where)).scalar()
    except BaseException:
        engine.dispose()
        raise

    def chunks() -> Iterator[pa.Table]:
        stmt = sa.select(*cols).where(where).order_by(*cols)
        try:
            with engine.connect() as conn:
                result = conn.execution_options(stream_results=True,
                                                max_row_buffer=batch_rows).execute(stmt)
                for part in result.partitions(batch_rows):
                    values = list(zip(*part, strict=True))
                    yield pa.table({
                        PICKUP: pa.array(values[0], pa.timestamp("us")),
                        DROPOFF: pa.array(values[1], pa.timestamp("us")),
                        **{c: _plain_number(pa.array(v))
                           for c, v in zip(RIDE_COLUMNS, values[2:], strict=True)},
                    })
        finally:  # also when the consumer stops early or fails (generator closed)
            engine.dispose()

    # Shown in logs and runs: no user or password.
    parsed = urlparse(url)
    host = f"{parsed.hostname}:{parsed.port}" if parsed.port else (parsed.hostname or "")
    shown = urlunparse(parsed._replace(netloc=host, query=""))
    return Source(f"{shown}?table={table_name}&month={month}", rows, chunks)


def open_source(uri: str, month: str | None, batch_rows: int) -> Source:
    """The reader for ``uri``: a PostgreSQL table or a parquet file."""
    if is_database(uri):
        return database_source(uri, month, batch_rows)
    return parquet_source(uri, batch_rows)


# -- atomic output ------------------------------------------------------------------------
@contextmanager
def atomic_parquet(uri: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A ParquetWriter on a hidden temporary file next to ``uri``, moved onto it on success.

    On an exception the temporary file is deleted; if the process is killed it stays
    hidden (``.``-prefixed), and :func:`clean_stale` removes it on the next run.
    """
    fs, path = _resolve(uri)
    folder, _, name = path.rpartition("/")
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    if fs.type_name == "local":
        fs.create_dir(folder, recursive=True)
    ok = False
    try:
        with fs.open_output_stream(tmp) as stream:
            writer = pq.ParquetWriter(stream, schema, use_dictionary=_dictionary_columns(schema))
            try:
                yield writer
            finally:
                writer.close()
        ok = True
    finally:
        if not ok:
            _delete_quietly(fs, tmp)
    # Local: rename (atomic, replaces). S3: server-side copy then delete (readers see the
    # old object or the complete new one, never a partial one).
    fs.move(tmp, path)


def publish_file(local: Path, uri: str) -> None:
    """Copy a finished local file to ``uri`` under a hidden temporary name, then move it."""
    fs, path = _resolve(uri)
    folder, _, name = path.rpartition("/")
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    clean_stale(uri)
    if fs.type_name == "local":
        fs.create_dir(folder, recursive=True)
    try:
        pafs.copy_files(str(local), tmp, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        fs.move(tmp, path)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: trying it on unique ids and floats triples the
    write time for the same file size."""
    return [n for n in ("PULocationID", "DOLocationID", "model_version", "reason")
            if n in schema.names]


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


def clean_stale(uri: str) -> int:
    """Delete temporary files a killed run left next to ``uri``; returns how many."""
    fs, path = _resolve(uri)
    folder, _, name = path.rpartition("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return 0
    stale = [i.path for i in infos
             if i.base_name.startswith(f".{name}.") and i.base_name.endswith(".tmp")]
    for p in stale:
        _delete_quietly(fs, p)
    return len(stale)


# -- one month ----------------------------------------------------------------------------
@dataclass
class MonthResult:
    """What one month's run did: counts, metrics, where it wrote, the evaluation run."""

    taxi_type: str
    month: str
    input: str
    predictions: str
    rejects: str
    model_version: str
    engine: str = "local"
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    run_id: str | None = None
    skipped: bool = False

    def line(self) -> str:
        """One JSON line for logs and scripts."""
        return json.dumps(asdict(self), default=str)


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    # On a terminal: rows done, rows/s and ETA; in logs (no tty): silent.
    return tqdm(total=total, unit="rows", unit_scale=True, desc=desc,
                disable=not sys.stderr.isatty())


def score_source(source: Source, model, version: str, month: str, pred_uri: str,
                 rej_uri: str, desc: str = "") -> Totals:
    """Score every chunk of ``source`` into the two output files; returns the totals."""
    totals, prefix = Totals(), ride_id_prefix(month)
    for uri in (pred_uri, rej_uri):
        if n := clean_stale(uri):
            log.info("removed %d stale temporary file(s) next to %s", n, uri)
    with atomic_parquet(pred_uri, OUTPUT_SCHEMA) as out, \
            atomic_parquet(rej_uri, REJECTS_SCHEMA) as rej, \
            _progress(source.rows, desc) as bar:
        for chunk in source.chunks():
            scored = score_chunk(chunk, totals.rows, model, version, prefix)
            out.write_table(scored.predictions)
            if scored.rejects.num_rows:
                rej.write_table(scored.rejects)
            totals.add(scored.totals)
            bar.update(chunk.num_rows)
    # The rejects file is moved into place first: a predictions file means the month is done.
    return totals


def log_evaluation(result: MonthResult, model_uri: str, experiment: str) -> str:
    """Log the month's monitoring record as an MLflow run; returns its run id."""
    import mlflow

    from serve.registry import experiment_id

    with mlflow.start_run(experiment_id=experiment_id(experiment),
                          run_name=f"{result.taxi_type}-{result.month}") as run:
        mlflow.log_params({"model_uri": model_uri, "model_version": result.model_version,
                           "input_uri": result.input, "output_uri": result.predictions,
                           "taxi_type": result.taxi_type, "month": result.month,
                           "engine": result.engine})
        mlflow.log_metrics({k: float(v) for k, v in result.metrics.items()})
        mlflow.set_tags({"mode": "batch", "evaluation_rows": "1 <= actual minutes <= 60"})
        return run.info.run_id


def score_month(model_uri: str, input_uri: str, output: str, taxi_type: str, month: str,
                loaded=None, engine: str = "local", evaluate: bool = True,
                settings: BatchSettings | None = None, spark_master: str = "local[*]",
                spark=None) -> MonthResult:
    """Score one month of ``input_uri`` into ``output``; log the evaluation run.

    ``loaded`` (a :class:`serve.registry.LoadedModel`) saves re-loading in a backfill.
    """
    from serve.registry import load_model

    settings = settings or BatchSettings()
    parse_month(month)
    if taxi_type not in TAXI_TYPES:
        raise InvalidInput(f"--taxi-type must be one of {', '.join(TAXI_TYPES)}, "
                           f"got {taxi_type!r}", field="--taxi-type")
    t0 = time.perf_counter()
    loaded = loaded or load_model(model_uri)
    pred_uri = predictions_uri(output, taxi_type, month)
    rej_uri = rejects_uri(output, taxi_type, month)
    if engine == "spark":
        from serve.batch_spark import score_with_spark

        totals, shown_input = score_with_spark(loaded, input_uri, month, pred_uri, rej_uri,
                                               master=spark_master, spark=spark)
    elif engine == "local":
        source = open_source(input_uri, month, settings.batch_rows)
        shown_input = source.uri
        totals = score_source(source, loaded.python_model, loaded.version, month, pred_uri,
                              rej_uri, desc=f"{taxi_type} {month}")
    else:
        raise InvalidInput(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}",
                           field="--engine")
    result = MonthResult(taxi_type=taxi_type, month=month, input=shown_input,
                         predictions=pred_uri, rejects=rej_uri, model_version=loaded.version,
                         engine=engine, metrics=totals.metrics())
    result.seconds = round(time.perf_counter() - t0, 3)
    if evaluate and totals.evaluated:
        result.run_id = log_evaluation(result, model_uri, settings.batch_experiment)
    log.info("%s %s: %d rows, %d scored, %d rejected, rmse %s in %.1f s -> %s", taxi_type,
             month, totals.rows, totals.scored, totals.rejected,
             f"{result.metrics['rmse']:.3f}" if "rmse" in result.metrics else "n/a",
             result.seconds, pred_uri)
    return result


def backfill(model_uri: str, input_template: str, output: str, taxi_type: str,
             months: list[str], force: bool = False, **kwargs) -> list[MonthResult]:
    """Score each month in turn (``{month}``/``{taxi}`` filled in the input), skipping
    months whose predictions file exists unless ``force``."""
    from serve.registry import load_model

    loaded = kwargs.pop("loaded", None)
    results = []
    with ExitStack() as stack:
        for month in months:
            pred_uri = predictions_uri(output, taxi_type, month)
            input_uri = month_input(input_template, taxi_type, month)
            if not force and exists(pred_uri):
                log.info("%s %s already done (%s): skipped; --force re-scores it", taxi_type,
                         month, pred_uri)
                results.append(MonthResult(taxi_type, month, input_uri, pred_uri,
                                           rejects_uri(output, taxi_type, month), "",
                                           skipped=True))
                continue
            loaded = loaded or load_model(model_uri)  # loaded once, if some month needs it
            if kwargs.get("engine") == "spark" and kwargs.get("spark") is None:
                # One Spark session for every month, stopped after the last one.
                from serve.batch_spark import scoped_session

                kwargs["spark"] = stack.enter_context(
                    scoped_session(kwargs.get("spark_master", "local[*]")))
            results.append(score_month(model_uri, input_uri, output, taxi_type, month,
                                       loaded=loaded, **kwargs))
    return results


def month_input(template: str | None, taxi_type: str, month: str) -> str:
    """The input of one month: the template with ``{month}``/``{taxi}``, or the TLC URL."""
    from serve.tlc import tlc_url

    if not template:
        return tlc_url(taxi_type, month)
    if is_database(template) and "{month}" not in template:
        # A table holds every month: select this one by the month parameter.
        parsed = urlparse(template)
        query = {**dict(parse_qsl(parsed.query)), "month": month}
        return urlunparse(parsed._replace(query=urlencode(query)))
    return template.replace("{month}", month).replace("{taxi}", taxi_type)


# -- CLI ----------------------------------------------------------------------------------
@click.command(context_settings={"show_default": True})
@click.option("--model-uri", default=None,
              help="Model to score with [default: MODEL_URI or models:/duration@production].")
@click.option("--input", "input_uri", default=None,
              help="Local path, s3:// URI, https:// URL or postgresql+psycopg2://...?table=T; "
                   "'{month}' and '{taxi}' are filled in a backfill [default: the TLC URL].")
@click.option("--output", required=True, help="Output root: a local folder or an s3:// prefix.")
@click.option("--taxi-type", type=click.Choice(TAXI_TYPES), default=None,
              help="Partition taxi_type [default: from the input name, else green].")
@click.option("--month", default=None,
              help="Month YYYY-MM of the partition path [default: from the input name].")
@click.option("--from", "first", default=None, help="Backfill: first month YYYY-MM.")
@click.option("--to", "last", default=None, help="Backfill: last month YYYY-MM (inclusive).")
@click.option("--force", is_flag=True, help="Backfill: re-score months already done.")
@click.option("--engine", type=click.Choice(ENGINES), default="local",
              help="local (vectorized, chunked) or spark (mlflow.pyfunc.spark_udf).")
@click.option("--spark-master", default="local[*]", help="Spark master for --engine spark.")
@click.option("--evaluate/--no-evaluate", default=True,
              help="Log the month's evaluation run to MLflow (experiment duration-batch).")
@click.option("--batch-rows", type=click.IntRange(min=1), default=None,
              help="Rows per chunk [default: BATCH_ROWS or 262144].")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(model_uri, input_uri, output, taxi_type, month, first, last, force, engine,
         spark_master, evaluate, batch_rows, verbose) -> None:
    """Score a month of rides (or a range of months) into predictions parquet."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    # stdout carries one JSON line per month (run ids included), not MLflow's "View run" lines.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    settings = BatchSettings()
    if batch_rows:
        settings.batch_rows = batch_rows
    import mlflow

    # Like every mode: the tracking server from the environment, `.env` or the default.
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    model_uri = model_uri or settings.model_uri
    name_taxi, name_month = infer_from_name(input_uri or "")
    taxi_type = taxi_type or name_taxi or "green"
    common = dict(engine=engine, evaluate=evaluate, settings=settings, spark_master=spark_master)
    try:
        if first or last:
            if not (first and last):
                raise InvalidInput("a backfill needs both --from and --to", field="--from")
            if input_uri and "{month}" not in input_uri and not is_database(input_uri):
                raise InvalidInput("--input must contain '{month}' in a backfill", field="--input")
            results = backfill(model_uri, input_uri, output, taxi_type,
                               month_range(first, last), force=force, **common)
        else:
            month = month or name_month
            if not month:
                raise InvalidInput("--month is required when the input name does not say it",
                                   field="--month")
            results = [score_month(model_uri, month_input(input_uri, taxi_type, month), output,
                                   taxi_type, month, **common)]
    except InvalidInput as e:
        raise click.UsageError(e.message) from e
    for r in results:
        click.echo(r.line())


if __name__ == "__main__":
    main()
