"""``python -m serve.batch``: click options -> :func:`~serve.batch.run.score_month` or
:func:`~serve.batch.run.backfill`; one JSON line per month on stdout."""

from __future__ import annotations

import logging
import os

import click

from serve.batch.months import TAXI_TYPES, infer_from_name, is_database, month_input, month_range
from serve.batch.run import ENGINES, BatchSettings, backfill, score_month
from serve.cli import Command
from serve.config import require_tracking_server, use_tracking_server
from serve.errors import InvalidInput
from serve.logs import setup_logging


@click.command(cls=Command, context_settings={"show_default": True})
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
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and the traceback of an error.")
def main(model_uri, input_uri, output, taxi_type, month, first, last, force, engine,
         spark_master, evaluate, batch_rows, verbose) -> None:
    """Score a month of rides (or a range of months) into predictions parquet."""
    setup_logging(logging.DEBUG if verbose else logging.INFO)
    # stdout carries one JSON line per month (run ids included), not MLflow's "View run" lines.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    settings = BatchSettings()
    if batch_rows:
        settings.batch_rows = batch_rows
    require_tracking_server(use_tracking_server(settings))
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

