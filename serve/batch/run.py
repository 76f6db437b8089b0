"""One month (or a range of months) end to end: read, score, publish, evaluate in MLflow."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import cache

from pydantic import Field, SecretStr

from serve.batch.core import (
    OUTPUT_SCHEMA,
    REJECTS_SCHEMA,
    MonthRefused,
    Totals,
    month_window,
    refusal,
    score_chunk,
)
from serve.batch.months import (
    check_taxi_type,
    month_input,
    parse_month,
    predictions_uri,
    rejects_uri,
    ride_id_prefix,
)
from serve.batch.output import atomic_parquet, clean_stale, exists, month_lock
from serve.batch.sources import Source, open_source
from serve.batch.spark import scoped_session, score_with_spark
from serve.config import Settings
from serve.errors import DurationError, InvalidInput, ModelNotReady
from serve.tlc import first_line
from serve.urls import masked

log = logging.getLogger(__name__)

ENGINES = ("local", "spark")


class BatchSettings(Settings):
    """Batch-mode settings (env: ``BATCH_*``, ``PGPASSWORD``) on top of the shared ones."""

    batch_experiment: str = Field("duration-batch",
                                  description="MLflow experiment of the evaluation runs.")
    batch_rows: int = Field(262_144, description="Rows per chunk read, scored and written.")
    batch_max_reject_ratio: float = Field(
        0.5, ge=0.0, le=1.0,
        description="A month rejecting more than this share of its rows is not published.")
    pgpassword: SecretStr | None = Field(
        None, description="Password of database inputs (libpq reads PGPASSWORD and "
                          "~/.pgpass itself; this adds PGPASSWORD from .env).")


@dataclass
class MonthResult:
    """What one month's run did: counts, metrics, where it wrote, the evaluation run; or
    why it did not (``error``: the month's output was left as it was)."""

    taxi_type: str
    month: str
    input: str  # as shown: no password
    predictions: str
    rejects: str
    model_version: str
    engine: str = "local"
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    run_id: str | None = None
    skipped: bool = False
    error: str | None = None

    def line(self) -> str:
        """One JSON line for logs and scripts."""
        return json.dumps(asdict(self), default=str)


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    # On a terminal: rows done, rows/s and ETA; in logs (no tty): silent.
    return tqdm(total=total, unit="rows", unit_scale=True, desc=desc,
                disable=not sys.stderr.isatty())


def score_source(source: Source, model, version: str, month: str, pred_uri: str,
                 rej_uri: str, desc: str = "", max_reject_ratio: float = 0.5) -> Totals:
    """Score every chunk of ``source`` into the two output files; returns the totals.

    Nothing is published (the month's files stay as they were) when :func:`refusal` objects:
    nothing scored, too many rejects, pickups of another month. Call it holding the
    month's :func:`~serve.batch.output.month_lock`: it removes temporary files it finds.
    """
    totals, prefix, window = Totals(), ride_id_prefix(month), month_window(month)
    for uri in (pred_uri, rej_uri):
        if n := clean_stale(uri):
            log.info("removed %d stale temporary file(s) next to %s", n, uri)
    with atomic_parquet(pred_uri, OUTPUT_SCHEMA) as out, \
            atomic_parquet(rej_uri, REJECTS_SCHEMA) as rej, \
            _progress(source.rows, desc) as bar:
        for chunk in source.chunks():
            scored = score_chunk(chunk, totals.rows, model, version, prefix, window)
            out.write_table(scored.predictions)
            if scored.rejects.num_rows:
                rej.write_table(scored.rejects)
            totals.add(scored.totals)
            bar.update(chunk.num_rows)
        if reason := refusal(totals, month, max_reject_ratio):  # raising discards both files
            raise MonthRefused(f"{source.uri}: {reason}; nothing was written, the month's "
                               f"output is left as it was")
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
                spark=None, load: Callable | None = None,
                max_reject_ratio: float | None = None) -> MonthResult:
    """Score one month of ``input_uri`` into ``output``; log the evaluation run.

    Holds the month's lock throughout (:class:`~serve.batch.output.MonthLocked` when
    another run has it). ``loaded`` (a :class:`serve.registry.LoadedModel`), or ``load``
    (a function returning one, called under the lock), saves re-loading in a backfill.
    ``max_reject_ratio`` defaults to ``BATCH_MAX_REJECT_RATIO`` (0.5).
    """
    from serve.registry import load_model

    settings = settings or BatchSettings()
    ratio = settings.batch_max_reject_ratio if max_reject_ratio is None else max_reject_ratio
    parse_month(month)
    check_taxi_type(taxi_type)
    if engine not in ENGINES:
        raise InvalidInput(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}",
                           field="--engine")
    t0 = time.perf_counter()
    pred_uri = predictions_uri(output, taxi_type, month)
    rej_uri = rejects_uri(output, taxi_type, month)
    load = load or (lambda: load_model(model_uri))
    with month_lock(pred_uri):
        if engine == "spark":
            loaded = loaded or load()
            totals, shown_input = score_with_spark(loaded, input_uri, month, pred_uri,
                                                   rej_uri, master=spark_master, spark=spark,
                                                   max_reject_ratio=ratio)
        else:
            password = settings.pgpassword.get_secret_value() if settings.pgpassword else None
            # Opened first: a missing or broken input fails before the model is loaded.
            source = open_source(input_uri, month, settings.batch_rows, password)
            shown_input = source.uri
            loaded = loaded or load()
            totals = score_source(source, loaded.python_model, loaded.version, month,
                                  pred_uri, rej_uri, desc=f"{taxi_type} {month}",
                                  max_reject_ratio=ratio)
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
    months whose predictions file exists unless ``force``.

    A month that cannot be scored (no such file, a refused output, another run holding
    it) does not stop the others: its result carries the ``error`` and its output is left
    as it was. Only a model that cannot be loaded stops the backfill (ModelNotReady).
    """
    from serve.registry import load_model

    check_taxi_type(taxi_type)
    loaded = kwargs.pop("loaded", None)
    load = cache(lambda: loaded or load_model(model_uri))  # once, if some month needs it
    results = []
    with ExitStack() as stack:
        for month in months:
            pred_uri = predictions_uri(output, taxi_type, month)
            rej_uri = rejects_uri(output, taxi_type, month)
            input_uri = month_input(input_template, taxi_type, month)
            try:
                if not force and exists(pred_uri):
                    log.info("%s %s already done (%s): skipped; --force re-scores it",
                             taxi_type, month, pred_uri)
                    results.append(MonthResult(taxi_type, month, masked(input_uri), pred_uri,
                                               rej_uri, "", skipped=True))
                    continue
                if kwargs.get("engine") == "spark" and kwargs.get("spark") is None:
                    # One Spark session for every month, stopped after the last one.
                    kwargs["spark"] = stack.enter_context(
                        scoped_session(kwargs.get("spark_master", "local[*]")))
                results.append(score_month(model_uri, input_uri, output, taxi_type, month,
                                           load=load, **kwargs))
            except ModelNotReady:
                raise
            except DurationError as e:  # the result line and the CLI's last line say it
                results.append(MonthResult(taxi_type, month, masked(input_uri), pred_uri,
                                           rej_uri, "", error=e.message))
            except OSError as e:  # storage unreachable or refused: one line (trace at -v)
                log.debug("%s %s: not scored", taxi_type, month, exc_info=True)
                results.append(MonthResult(taxi_type, month, masked(input_uri), pred_uri,
                                           rej_uri, "", error=f"{type(e).__name__}: "
                                                             f"{first_line(e)}"))
            except Exception as e:  # a bug or an outage: the other months still run
                log.exception("%s %s: not scored", taxi_type, month)
                results.append(MonthResult(taxi_type, month, masked(input_uri), pred_uri,
                                           rej_uri, "", error=f"{type(e).__name__}: {e}"))
    return results
