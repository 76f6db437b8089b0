"""``python -m serve.batch``: click options -> :func:`~serve.batch.run.backfill` (one month is
a backfill of one); one JSON line per month on stdout, scored or not.

Exit status: 0 when every month was scored (or skipped as done), 1 when some month was
not (each one's reason is in its JSON line and on stderr; the others were still scored),
2 for a usage mistake (nothing was run).
"""

from __future__ import annotations

import logging
import os

import click

from serve.batch.months import (
    NO_DISTANCE,
    TAXI_TYPES,
    check_taxi_type,
    infer_from_name,
    is_database,
    month_range,
    parse_month,
)
from serve.batch.run import ENGINES, BatchSettings, MonthResult, backfill
from serve.cli import Command
from serve.config import require_tracking_server, use_tracking_server
from serve.errors import DurationError, InvalidInput
from serve.logs import setup_logging
from serve.urls import has_password


def taxi_type_for(taxi_type: str | None, input_uri: str | None) -> str:
    """The partition's taxi type: the option, else the input's TLC name, else green (parquet
    and TLC URLs); a database table must be told."""
    name_taxi, _ = infer_from_name(input_uri or "")
    if taxi_type or name_taxi:
        return check_taxi_type(taxi_type or name_taxi,
                               "--taxi-type" if taxi_type else "--input's taxi type")
    if input_uri and is_database(input_uri):
        raise InvalidInput("a database input does not say which taxi type it holds: pass "
                           f"--taxi-type {' or '.join(TAXI_TYPES)}", field="--taxi-type")
    return "green"


def check_input(input_uri: str | None) -> None:
    """Refuse a database password in ``--input``: a command line shows in ``ps`` and shell
    history. (A pre-signed https link is a credential meant to be passed around: allowed.)"""
    if input_uri and is_database(input_uri) and has_password(input_uri):
        raise InvalidInput("--input must not carry a password (a command line is visible in "
                           "`ps` and shell history): leave it out of the URL and set "
                           "PGPASSWORD (environment or .env) or use ~/.pgpass",
                           field="--input")


def report(results: list[MonthResult]) -> None:
    """Print one JSON line per month; fail (exit 1) naming the months that were not scored."""
    for r in results:
        click.echo(r.line())
    failed = [r for r in results if r.error]
    if len(failed) == 1 and len(results) == 1:
        raise click.ClickException(f"{failed[0].taxi_type} {failed[0].month}: "
                                   f"{failed[0].error}")
    if failed:
        raise click.ClickException(
            f"{len(failed)} of {len(results)} months not scored (their output is left as it "
            f"was): " + "; ".join(f"{r.month}: {r.error}" for r in failed))


@click.command(cls=Command, context_settings={"show_default": True})
@click.option("--model-uri", default=None,
              help="Model to score with [default: MODEL_URI or models:/duration@production].")
@click.option("--input", "input_uri", default=None,
              help="Local path, s3:// URI, https:// URL or postgresql+psycopg2://user@host/db"
                   "?table=T (password from PGPASSWORD or ~/.pgpass, never in the URL); "
                   "'{month}' and '{taxi}' are filled in a backfill [default: the TLC URL].")
@click.option("--output", required=True, help="Output root: a local folder or an s3:// prefix.")
@click.option("--taxi-type", type=click.Choice((*TAXI_TYPES, *NO_DISTANCE)), default=None,
              help="Partition taxi_type: green or yellow (fhv/fhvhv records have no "
                   "trip_distance) [default: from the input name; required for a table].")
@click.option("--month", default=None,
              help="Month YYYY-MM of the partition path [default: from the input name]; "
                   "the input's pickups must be in it.")
@click.option("--from", "first", default=None, help="Backfill: first month YYYY-MM.")
@click.option("--to", "last", default=None, help="Backfill: last month YYYY-MM (inclusive).")
@click.option("--force", is_flag=True, help="Backfill: re-score months already done.")
@click.option("--max-reject-ratio", type=click.FloatRange(0.0, 1.0), default=None,
              help="Publish nothing for a month rejecting more than this share of its rows "
                   "(its output is left as it was) [default: BATCH_MAX_REJECT_RATIO or 0.5].")
@click.option("--engine", type=click.Choice(ENGINES), default="local",
              help="local (vectorized, chunked) or spark (mlflow.pyfunc.spark_udf).")
@click.option("--spark-master", default="local[*]", help="Spark master for --engine spark.")
@click.option("--evaluate/--no-evaluate", default=True,
              help="Log the month's evaluation run to MLflow (experiment duration-batch).")
@click.option("--batch-rows", type=click.IntRange(min=1), default=None,
              help="Rows per chunk [default: BATCH_ROWS or 262144].")
@click.option("-v", "--verbose", is_flag=True,
              help="Debug logging, and the traceback of an error.")
def main(model_uri, input_uri, output, taxi_type, month, first, last, force, max_reject_ratio,
         engine, spark_master, evaluate, batch_rows, verbose) -> None:
    """Score a month of rides (or a range of months) into predictions parquet."""
    setup_logging(logging.DEBUG if verbose else logging.INFO)
    # stdout carries one JSON line per month (run ids included), not MLflow's "View run" lines.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    settings = BatchSettings()
    if batch_rows:
        settings.batch_rows = batch_rows
    model_uri = model_uri or settings.model_uri
    common = dict(engine=engine, evaluate=evaluate, settings=settings, spark_master=spark_master,
                  max_reject_ratio=max_reject_ratio)
    try:
        check_input(input_uri)
        taxi_type = taxi_type_for(taxi_type, input_uri)
        if first or last:
            if not (first and last):
                raise InvalidInput("a backfill needs both --from and --to", field="--from")
            if input_uri and "{month}" not in input_uri and not is_database(input_uri):
                raise InvalidInput("--input must contain '{month}' in a backfill", field="--input")
            months, force_months = month_range(first, last), force
        else:
            month = month or infer_from_name(input_uri or "")[1]
            if not month:
                raise InvalidInput("--month is required when the input name does not say it",
                                   field="--month")
            parse_month(month)
            months, force_months = [month], True  # one month is re-scored
    except InvalidInput as e:
        raise click.UsageError(e.message) from e
    require_tracking_server(use_tracking_server(settings))
    try:
        results = backfill(model_uri, input_uri, output, taxi_type, months, force=force_months,
                           **common)
    except DurationError as e:  # the model cannot be loaded: no month can run
        raise click.ClickException(e.message) from e
    report(results)
