"""``python -m serve.stream``: the local runner's command line (see :mod:`serve.stream.runner`).

Streams and checkpoints are checked before the model loads, so a typo in a stream name
or a re-created stream costs a second and one line, not a model download and a traceback.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import click

from serve.cli import Command
from serve.config import stack_home
from serve.logs import setup_logging
from serve.stream.checkpoints import DryRunCheckpoints, consumer_checkpoints
from serve.stream.pacing import EndpointUnavailable
from serve.stream.runner import ON_RECREATED, RetriesExhausted, Runner, StreamRecreated
from serve.stream.streams import ENDPOINT_HELP, StreamUnavailable, require_stream

log = logging.getLogger(__name__)

def default_checkpoint_dir() -> Path:
    """``$STACK_HOME/stream-checkpoints`` (STACK_HOME defaults to .stack at the project root)."""
    return stack_home() / "stream-checkpoints"


def check_streams(client, input_stream: str, output_stream: str, dead_letter: str | None,
                  test_run: bool) -> None:
    """Every stream the run reads or writes exists; else one line naming it and the fix."""
    require_stream(client, input_stream, "input stream (--input-stream)")
    if test_run:
        return
    require_stream(client, output_stream, "output stream (--output-stream)")
    if dead_letter and not dead_letter.startswith("s3://"):
        require_stream(client, dead_letter, "dead-letter stream (--dead-letter)")


@click.command(cls=Command)
@click.option("--input-stream", required=True, help="Kinesis stream of ride events.")
@click.option("--output-stream", required=True, help="Kinesis stream for prediction events.")
@click.option("--endpoint-url", default=None, envvar="KINESIS_ENDPOINT_URL", help=ENDPOINT_HELP)
@click.option("--consumer", default=None,
              help="Consumer name: each consumer keeps its own checkpoints (1-to-many). "
                   "Default: the output stream's name, so each output has its own position.")
@click.option("--model-uri", default=None,
              help="Model to serve (default: MODEL_URI, models:/duration@production).")
@click.option("--model-location", default=None,
              help="Local MLflow model folder instead of --model-uri.")
@click.option("--model-version", default=None,
              help="Registered version of --model-location, reported in the events.")
@click.option("--dead-letter", "dead_letter", default=None,
              help="Dead-letter destination: a stream name or s3://bucket/prefix "
                   "(default: DEAD_LETTER_DESTINATION, else logged only).")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1, 10_000),
              help="Records per handler call (Lambda BatchSize).")
@click.option("--checkpoint-dir", default=None, type=click.Path(file_okay=False),
              help="Folder of the per-consumer, per-shard checkpoints "
                   "(default: $STACK_HOME/stream-checkpoints; STACK_HOME defaults to .stack "
                   "at the project root).")
@click.option("--on-recreated-stream", type=click.Choice(ON_RECREATED), default="stop",
              show_default=True,
              help="When the input stream was deleted and created again under its name (its "
                   "sequence numbers start over): stop with a message, or read it from its "
                   "start (TRIM_HORIZON).")
@click.option("--max-retries", default=3, show_default=True, type=click.IntRange(0),
              help="Re-deliveries of a failing batch before the runner stops.")
@click.option("--max-outage", default=300.0, show_default=True, type=click.FloatRange(0),
              help="Seconds the Kinesis endpoint (or the stream) may stay unreachable before "
                   "the runner stops; reads are retried with backoff until then.")
@click.option("--poll-interval", default=0.2, show_default=True, type=click.FloatRange(0.01),
              help="Seconds to wait after a read that found the shard's end; doubles while "
                   "the shard stays idle, up to 1 s (real Kinesis allows 5 reads/s per shard, "
                   "shared by all consumers).")
@click.option("--idle-exit", default=None, type=float,
              help="Exit after this many seconds without records (default: run until SIGTERM).")
@click.option("--parallel-shards/--serial-shards", default=False, show_default=True,
              help="Call the handler for several shards at once, as Lambda does (real Kinesis);"
                   " serial is required on moto_server, whose PutRecords is not thread-safe.")
@click.option("--test-run", is_flag=True, help="Dry run: predict, write nothing.")
def cli(input_stream, output_stream, endpoint_url, consumer, model_uri, model_location,
        model_version, dead_letter, batch_size, checkpoint_dir, on_recreated_stream,
        max_retries, max_outage, poll_interval, idle_exit, parallel_shards, test_run) -> None:
    """Run the streaming handler locally over every shard of INPUT_STREAM."""
    from serve.stream.app import StreamSettings, build_handler, kinesis_client

    setup_logging("INFO")
    overrides = {"predictions_stream_name": output_stream, "kinesis_endpoint_url": endpoint_url,
                 "model_uri": model_uri, "model_location": model_location,
                 "model_version": model_version, "dead_letter_destination": dead_letter,
                 "test_run": test_run or None}
    settings = StreamSettings(**{k: v for k, v in overrides.items() if v is not None})
    try:
        checkpoints = consumer_checkpoints(checkpoint_dir or default_checkpoint_dir(),
                                           consumer or output_stream, input_stream)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if settings.test_run:
        checkpoints = DryRunCheckpoints(checkpoints)
    # The reading client uses the same endpoint as the sinks (option, env or .env).
    client = kinesis_client(settings)
    runner = Runner(client=client, handler=None, stream=input_stream, checkpoints=checkpoints,
                    batch_size=batch_size, poll_interval=poll_interval,
                    max_retries=max_retries, idle_exit=idle_exit, parallel=parallel_shards,
                    max_outage=max_outage, on_recreated=on_recreated_stream)
    try:
        check_streams(client, input_stream, output_stream,
                      settings.dead_letter_destination, settings.test_run)
        runner.prepare()  # the checkpoints belong to this stream (or trim-horizon was asked)
    except (StreamUnavailable, StreamRecreated) as e:
        raise click.ClickException(str(e)) from e
    runner.handler = build_handler(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Finish the batch in hand, checkpoint it, then leave.
        signal.signal(sig, lambda signum, frame: runner.stop.set())
    try:
        runner.run()
    except (RetriesExhausted, StreamRecreated, EndpointUnavailable) as e:
        raise click.ClickException(str(e)) from e
