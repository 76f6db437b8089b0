"""A Prefect flow (the course's scheduler) around the same function the CLI calls.

Prefect is not a dependency of this project: ``pip install prefect`` where the
flow runs. Nothing here imports it until the flow is built.

    python -m ops.flows.batch_flow --output s3://bucket/predictions \
        --input 's3://bucket/tlc/green_tripdata_{month}.parquet'      # serve, monthly
    python -m ops.flows.batch_flow --once --month 2021-03 ...           # one run, now
    python -m ops.flows.batch_flow --once --from 2021-01 --to 2021-03 ...

Each run scores the previous month (or ``--month``, or ``--from/--to``), skipping
months already done, exactly like ``python -m serve.batch --from .. --to ..``. The
model, the tracking server and a database password come from the environment or
``.env`` (``MODEL_URI``, ``MLFLOW_TRACKING_URI``, ``PGPASSWORD``), as for the CLI.
"""

from __future__ import annotations

import datetime as dt

import click

from serve.cli import Command

MONTHLY = "0 3 2 * *"  # 03:00 on the 2nd: the previous month is complete by then
NO_PREFECT = ("prefect is not installed (it is not a dependency of this project): "
              "`pip install prefect` where the flow runs")


def previous_month(today: dt.date | None = None) -> str:
    """The month before ``today`` as YYYY-MM (what a monthly schedule scores)."""
    today = today or dt.date.today()
    first = today.replace(day=1) - dt.timedelta(days=1)
    return f"{first.year:04d}-{first.month:02d}"


def flow_months(month: str | None = None, first: str | None = None, last: str | None = None,
                today: dt.date | None = None) -> list[str]:
    """The months one flow run scores: ``first..last``, else ``month``, else the previous."""
    from serve.batch.months import month_range, parse_month
    from serve.errors import InvalidInput

    if first or last:
        if not (first and last):
            raise InvalidInput("--from and --to go together", field="--from")
        return month_range(first, last)
    if month:
        parse_month(month)
        return [month]
    return [previous_month(today)]


def plan(output: str, input_template: str | None = None, model_uri: str | None = None,
         taxi_type: str = "green", month: str | None = None, first: str | None = None,
         last: str | None = None, force: bool = False) -> list[dict]:
    """The arguments of each month's task in one flow run; the model is ``model_uri``, else
    ``MODEL_URI`` from the environment or ``.env``, like the CLI. Points MLflow at the
    tracking server the same way."""
    from serve.batch.run import BatchSettings
    from serve.config import use_tracking_server

    settings = BatchSettings()  # the environment, then .env, then the defaults
    use_tracking_server(settings)
    return [{"model_uri": model_uri or settings.model_uri, "input_template": input_template,
             "output": output, "taxi_type": taxi_type, "month": m, "force": force}
            for m in flow_months(month, first, last)]


def build_flow():
    """The Prefect flow ``duration-batch``: one task per month, retried on failure.

    Raises ImportError with the install command when Prefect is missing.
    """
    try:
        from prefect import flow, task
    except ImportError as e:
        raise ImportError(NO_PREFECT) from e

    from serve.batch.run import backfill
    from serve.config import require_tracking_server

    @task(retries=2, retry_delay_seconds=300)
    def score(model_uri: str, input_template: str | None, output: str, taxi_type: str,
              month: str, force: bool) -> dict:
        [result] = backfill(model_uri, input_template, output, taxi_type, [month], force=force)
        if result.error:  # failed task: retried (a month's file may land late), then reported
            raise RuntimeError(f"{taxi_type} {month}: {result.error}")
        return {"month": month, "skipped": result.skipped, **result.metrics}

    @flow(name="duration-batch")
    def batch_flow(output: str, input_template: str | None = None,
                   model_uri: str | None = None, taxi_type: str = "green",
                   month: str | None = None, first: str | None = None,
                   last: str | None = None, force: bool = False) -> list[dict]:
        tasks = plan(output, input_template, model_uri, taxi_type, month, first, last, force)
        require_tracking_server()  # the one plan() chose: fails in seconds without one
        states = [score(**kwargs, return_state=True) for kwargs in tasks]
        failed = [s for s in states if s.is_failed()]
        if failed:  # every month was tried; the run fails naming the ones not scored
            raise RuntimeError("; ".join(str(s.result(raise_on_failure=False))
                                         for s in failed))
        return [s.result() for s in states]

    return batch_flow


@click.command(cls=Command)
@click.option("--output", required=True, help="Output root: local folder or s3:// prefix.")
@click.option("--input", "input_template", default=None,
              help="Input with '{month}' (and '{taxi}'), or a PostgreSQL table URL without "
                   "password (PGPASSWORD, ~/.pgpass) [default: the TLC URL].")
@click.option("--model-uri", default=None,
              help="Model to score with [default: MODEL_URI or models:/duration@production].")
@click.option("--taxi-type", default=None,
              help="green or yellow [default: from the input name; required for a table].")
@click.option("--month", default=None, help="With --once: the month [default: previous].")
@click.option("--from", "first", default=None, help="With --once: first month YYYY-MM.")
@click.option("--to", "last", default=None, help="With --once: last month YYYY-MM.")
@click.option("--force", is_flag=True, help="Re-score months already done.")
@click.option("--cron", default=MONTHLY, show_default=True, help="Schedule when serving.")
@click.option("--once", is_flag=True, help="Run the flow once now instead of serving it.")
def main(output, input_template, model_uri, taxi_type, month, first, last, force, cron,
         once) -> None:
    """Run or serve the duration-batch Prefect flow."""
    from serve.batch.cli import check_input, taxi_type_for
    from serve.errors import InvalidInput

    try:
        check_input(input_template)
        taxi_type = taxi_type_for(taxi_type, input_template)
        if not once and (month or first or last):
            raise InvalidInput("--month/--from/--to go with --once (a served flow scores "
                               "the previous month on each run)", field="--once")
        flow_months(month, first, last)  # checked now, not in the first scheduled run
    except InvalidInput as e:
        raise click.UsageError(e.message) from e
    try:
        batch_flow = build_flow()
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    params = {"output": output, "input_template": input_template, "model_uri": model_uri,
              "taxi_type": taxi_type, "force": force}
    if once:
        print(batch_flow(**params, month=month, first=first, last=last))
    else:
        batch_flow.serve(name="duration-batch-monthly", cron=cron, parameters=params)


if __name__ == "__main__":
    main()
