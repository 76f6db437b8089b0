"""A Prefect flow (the course's scheduler) around the same function the CLI calls.

Prefect is not a dependency of this project: ``pip install prefect`` where the
flow runs. Nothing here imports it until the flow is built.

    python -m ops.flows.batch_flow --output s3://bucket/predictions \
        --input 's3://bucket/tlc/green_tripdata_{month}.parquet'      # serve, monthly
    python -m ops.flows.batch_flow --once --month 2021-03 ...           # one run, now

Each run scores the previous month (or ``--month``, or ``--from/--to``), skipping
months already done, exactly like ``python -m serve.batch --from .. --to ..``.
"""

from __future__ import annotations

import datetime as dt

import click

from serve.cli import Command
from serve.config import DEFAULT_MODEL_URI, require_tracking_server, use_tracking_server

MONTHLY = "0 3 2 * *"  # 03:00 on the 2nd: the previous month is complete by then


def previous_month(today: dt.date | None = None) -> str:
    """The month before ``today`` as YYYY-MM (what a monthly schedule scores)."""
    today = today or dt.date.today()
    first = today.replace(day=1) - dt.timedelta(days=1)
    return f"{first.year:04d}-{first.month:02d}"


def build_flow():
    """The Prefect flow ``duration-batch``: one task per month, retried on failure."""
    from prefect import flow, task

    from serve.batch.months import month_range
    from serve.batch.run import backfill

    @task(retries=2, retry_delay_seconds=300)
    def score(model_uri: str, input_template: str | None, output: str, taxi_type: str,
              month: str, force: bool) -> dict:
        [result] = backfill(model_uri, input_template, output, taxi_type, [month], force=force)
        return {"month": month, "skipped": result.skipped, **result.metrics}

    @flow(name="duration-batch")
    def batch_flow(output: str, input_template: str | None = None,
                   model_uri: str = DEFAULT_MODEL_URI, taxi_type: str = "green",
                   month: str | None = None, first: str | None = None,
                   last: str | None = None, force: bool = False) -> list[dict]:
        # The environment, then .env, then the default, like the CLI; fails fast without one.
        require_tracking_server(use_tracking_server())
        months = month_range(first, last) if first and last else [month or previous_month()]
        return [score(model_uri, input_template, output, taxi_type, m, force) for m in months]

    return batch_flow


@click.command(cls=Command)
@click.option("--output", required=True, help="Output root: local folder or s3:// prefix.")
@click.option("--input", "input_template", default=None,
              help="Input with '{month}' (and '{taxi}'), or a PostgreSQL table URL "
                   "[default: the TLC URL].")
@click.option("--model-uri", default=DEFAULT_MODEL_URI, show_default=True,
              help="Model to score with.")
@click.option("--taxi-type", default="green", show_default=True, help="Partition taxi_type.")
@click.option("--month", default=None, help="With --once: the month [default: previous].")
@click.option("--cron", default=MONTHLY, show_default=True, help="Schedule when serving.")
@click.option("--once", is_flag=True, help="Run the flow once now instead of serving it.")
def main(output, input_template, model_uri, taxi_type, month, cron, once) -> None:
    """Run or serve the duration-batch Prefect flow."""
    batch_flow = build_flow()
    params = {"output": output, "input_template": input_template, "model_uri": model_uri,
              "taxi_type": taxi_type}
    if once:
        print(batch_flow(**params, month=month))
    else:
        batch_flow.serve(name="duration-batch-monthly", cron=cron, parameters=params)


if __name__ == "__main__":
    main()
