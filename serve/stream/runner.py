"""Local runner: plays Lambda's Kinesis event source mapping on one machine.

For every shard of the input stream it reads from the consumer's checkpoint
(``TRIM_HORIZON`` the first time), builds events shaped exactly as AWS delivers
them, calls the same handler the Lambda runs, honours ``batchItemFailures``
(re-delivers from the lowest failed sequence number, bounded retries) and
checkpoints after each handled batch with an atomic file write.

At-least-once: a batch whose predictions were written but whose checkpoint was
not (a crash in between) is handled again after a restart, so at most one batch
per shard (``--batch-size`` records) may be predicted twice. Consumers dedupe on
the partition key ``ride_id``.
"""

from __future__ import annotations

import base64
import logging
import signal
import threading
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import click
from botocore.exceptions import ClientError

from serve.cli import Command
from serve.logs import setup_logging
from serve.stream.app import Handler
from serve.stream.checkpoints import Checkpoints, DryRunCheckpoints, consumer_checkpoints

log = logging.getLogger(__name__)

LOCAL_ROLE_ARN = "arn:aws:iam::000000000000:role/duration-local-runner"


class RetriesExhausted(RuntimeError):
    """A batch kept failing: the shard stops at its checkpoint instead of skipping records."""


# -- events -------------------------------------------------------------------------------
def kinesis_event(records: list[Mapping], shard_id: str, stream_arn: str, region: str) -> dict:
    """A Lambda Kinesis event from ``GetRecords`` records, shaped as AWS delivers it."""
    out = []
    for r in records:
        seq = r["SequenceNumber"]
        arrival = r.get("ApproximateArrivalTimestamp")
        out.append({
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": r["PartitionKey"],
                "sequenceNumber": seq,
                "data": base64.b64encode(r["Data"]).decode("ascii"),
                "approximateArrivalTimestamp": arrival.timestamp() if arrival else time.time(),
            },
            "eventSource": "aws:kinesis",
            "eventVersion": "1.0",
            "eventID": f"{shard_id}:{seq}",
            "eventName": "aws:kinesis:record",
            "invokeIdentityArn": LOCAL_ROLE_ARN,
            "awsRegion": region,
            "eventSourceARN": stream_arn,
        })
    return {"Records": out}


def lowest_failure(response, first: str | None = None) -> str | None:
    """The lowest failed sequence number of a handler response (where Lambda resumes).

    As in Lambda, a response that is not a valid partial-batch response (an
    identifier that is missing or not a sequence number) fails the whole batch:
    ``first`` is returned then.
    """
    items = response.get("batchItemFailures") if isinstance(response, Mapping) else None
    if not items:
        return None
    try:
        return min((str(i["itemIdentifier"]) for i in items), key=int)
    except (KeyError, TypeError, ValueError):
        log.error("invalid batchItemFailures %r: the whole batch is retried", items)
        return first


# -- the loop -----------------------------------------------------------------------------
@dataclass
class ShardState:
    """Where the runner is in one shard."""

    shard_id: str
    iterator: str | None = None
    retries: int = 0
    closed: bool = False


@dataclass
class RunStats:
    """Totals of one run, logged at the end and returned to callers (tests, bench)."""

    batches: int = 0
    records: int = 0
    failures: int = 0
    per_shard: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, shard_id: str, handled: int, failed: bool) -> None:
        """Count one handler call (shard threads call this concurrently)."""
        with self.lock:
            self.batches += 1
            self.records += handled
            self.failures += failed
            self.per_shard[shard_id] = self.per_shard.get(shard_id, 0) + handled


@dataclass
class Runner:
    """Reads every shard of ``stream`` and feeds ``handler`` until ``stop`` is set."""

    client: object  # a boto3 Kinesis client
    handler: Handler
    stream: str
    checkpoints: Checkpoints | DryRunCheckpoints
    batch_size: int = 100
    poll_interval: float = 0.2
    max_retries: int = 3
    retry_delay: float = 0.5
    idle_exit: float | None = None  # stop after this many seconds without records
    stop: threading.Event = field(default_factory=threading.Event)
    stream_arn: str = ""  # looked up by run()
    report_every: float = 30.0  # seconds between progress lines in the log
    # Lambda runs one invocation per shard concurrently. moto_server's PutRecords is not
    # thread-safe (concurrent writes to one shard can take the same sequence number and
    # overwrite each other), so handler calls are serialized unless asked otherwise.
    parallel: bool = False
    _handler_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def shards(self) -> list[str]:
        """Shard ids of the stream (all pages)."""
        ids, kwargs = [], {"StreamName": self.stream}
        while True:
            resp = self.client.list_shards(**kwargs)
            ids += [s["ShardId"] for s in resp["Shards"]]
            if not resp.get("NextToken"):
                return ids
            kwargs = {"NextToken": resp["NextToken"]}

    def _iterator(self, shard_id: str, after: str | None = None, at: str | None = None) -> str:
        kw = {"StreamName": self.stream, "ShardId": shard_id}
        if at is not None:
            kw.update(ShardIteratorType="AT_SEQUENCE_NUMBER", StartingSequenceNumber=at)
        elif after is not None:
            kw.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=after)
        else:
            kw.update(ShardIteratorType="TRIM_HORIZON")
        return self.client.get_shard_iterator(**kw)["ShardIterator"]

    def step(self, shard: ShardState, region: str, stats: RunStats) -> int:
        """Read and handle one batch of ``shard``; returns how many records it read."""
        if shard.iterator is None:
            shard.iterator = self._iterator(shard.shard_id,
                                            after=self.checkpoints.load(shard.shard_id))
        try:
            resp = self.client.get_records(ShardIterator=shard.iterator, Limit=self.batch_size)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code == "ExpiredIteratorException":  # iterators live 5 minutes
                shard.iterator = None  # resume from the checkpoint
                return 0
            if code == "ProvisionedThroughputExceededException":  # 5 reads/s per shard
                log.warning("%s: read throttled, backing off", shard.shard_id)
                self.stop.wait(1.0)
                return 0
            raise
        records = resp["Records"]
        if not records:
            shard.iterator = resp.get("NextShardIterator")
            shard.closed = shard.iterator is None  # a closed (resharded) shard is done
            return 0
        event = kinesis_event(records, shard.shard_id, self.stream_arn, region)
        with nullcontext() if self.parallel else self._handler_lock:
            try:
                failed = lowest_failure(self.handler(event, None),
                                        first=records[0]["SequenceNumber"])
            except Exception:  # noqa: BLE001 - a function error: Lambda retries the whole batch
                log.exception("%s: handler failed on a batch of %d", shard.shard_id,
                              len(records))
                failed = records[0]["SequenceNumber"]
        if failed is None:
            self.checkpoints.save(shard.shard_id, records[-1]["SequenceNumber"])
            shard.iterator, shard.retries = resp.get("NextShardIterator"), 0
            shard.closed = shard.iterator is None
            stats.add(shard.shard_id, len(records), failed=False)
            return len(records)
        done = [r for r in records if int(r["SequenceNumber"]) < int(failed)]
        if done:  # the records before the failure are handled: do not re-deliver them
            self.checkpoints.save(shard.shard_id, done[-1]["SequenceNumber"])
            shard.retries = 0
        stats.add(shard.shard_id, len(done), failed=True)
        shard.retries += 1
        if shard.retries > self.max_retries:
            raise RetriesExhausted(
                f"{shard.shard_id}: record {failed} failed {shard.retries} times in a row; "
                f"stopped at the checkpoint, fix the cause and restart")
        log.warning("%s: batch failed from %s (retry %d/%d)", shard.shard_id, failed,
                    shard.retries, self.max_retries)
        self.stop.wait(self.retry_delay * shard.retries)
        shard.iterator = self._iterator(shard.shard_id, at=failed)
        return len(records)

    def _poll(self, shard: ShardState, region: str, stats: RunStats,
              errors: list[BaseException]) -> None:
        """One shard's loop: Lambda also runs one invocation per shard at a time, in order."""
        idle_since = time.monotonic()
        try:
            while not self.stop.is_set() and not shard.closed:
                if self.step(shard, region, stats):
                    idle_since = time.monotonic()
                elif self.idle_exit is not None and (
                        time.monotonic() - idle_since >= self.idle_exit):
                    return
                else:
                    self.stop.wait(self.poll_interval)
        except BaseException as e:  # noqa: BLE001 - handed to run(), which re-raises it
            errors.append(e)
            self.stop.set()

    def run(self) -> RunStats:
        """Poll every shard (one thread each) until stopped (SIGTERM, ``stop`` or idle exit)."""
        summary = self.client.describe_stream_summary(StreamName=self.stream)
        self.stream_arn = summary["StreamDescriptionSummary"]["StreamARN"]
        region = self.client.meta.region_name
        shards = [ShardState(s) for s in self.shards()]
        stats, errors = RunStats(), []
        log.info("reading %s (%d shards) into the handler, checkpoints in %s", self.stream,
                 len(shards), self.checkpoints.root)
        threads = [threading.Thread(target=self._poll, args=(s, region, stats, errors),
                                    name=s.shard_id, daemon=True) for s in shards]
        for t in threads:
            t.start()
        last_report = time.monotonic()
        for t in threads:
            while t.is_alive():  # short joins keep the main thread responsive to signals
                t.join(0.2)
                if time.monotonic() - last_report >= self.report_every:
                    last_report = time.monotonic()
                    log.info("progress: %d records in %d batches (%d failed batches)",
                             stats.records, stats.batches, stats.failures)
        log.info("stopped: %d records in %d batches (%d failed batches)", stats.records,
                 stats.batches, stats.failures)
        if errors:
            raise errors[0]
        return stats


# -- CLI ----------------------------------------------------------------------------------
@click.command(cls=Command)
@click.option("--input-stream", required=True, help="Kinesis stream of ride events.")
@click.option("--output-stream", required=True, help="Kinesis stream for prediction events.")
@click.option("--endpoint-url", default=None, envvar="KINESIS_ENDPOINT_URL",
              help="Kinesis endpoint (moto_server, LocalStack); default: real AWS.")
@click.option("--consumer", required=True,
              help="Consumer name: each consumer keeps its own checkpoints (1-to-many).")
@click.option("--model-uri", default=None,
              help="Model to serve (default: MODEL_URI, models:/duration@production).")
@click.option("--model-location", default=None,
              help="Local MLflow model folder instead of --model-uri.")
@click.option("--model-version", default=None,
              help="Registered version of --model-location, reported in the events.")
@click.option("--dead-letter", "dead_letter", default=None,
              help="Dead-letter destination: a stream name or s3://bucket/prefix.")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1, 10_000),
              help="Records per handler call (Lambda BatchSize).")
@click.option("--checkpoint-dir", default=".stack/stream-checkpoints", show_default=True,
              help="Folder of the per-consumer, per-shard checkpoints.")
@click.option("--max-retries", default=3, show_default=True, type=click.IntRange(0),
              help="Re-deliveries of a failing batch before the runner stops.")
@click.option("--poll-interval", default=0.2, show_default=True, type=float,
              help="Seconds to wait when no shard had records.")
@click.option("--idle-exit", default=None, type=float,
              help="Exit after this many seconds without records (default: run until SIGTERM).")
@click.option("--parallel-shards/--serial-shards", default=False, show_default=True,
              help="Call the handler for several shards at once, as Lambda does (real Kinesis);"
                   " serial is required on moto_server, whose PutRecords is not thread-safe.")
@click.option("--test-run", is_flag=True, help="Dry run: predict, write nothing.")
def cli(input_stream, output_stream, endpoint_url, consumer, model_uri, model_location,
        model_version, dead_letter, batch_size, checkpoint_dir, max_retries, poll_interval,
        idle_exit, parallel_shards, test_run) -> None:
    """Run the streaming handler locally over every shard of INPUT_STREAM."""
    import boto3

    from serve.stream.app import StreamSettings, build_handler

    setup_logging("INFO")
    overrides = {"predictions_stream_name": output_stream, "kinesis_endpoint_url": endpoint_url,
                 "model_uri": model_uri, "model_location": model_location,
                 "model_version": model_version, "dead_letter_destination": dead_letter,
                 "test_run": test_run or None}
    settings = StreamSettings(**{k: v for k, v in overrides.items() if v is not None})
    checkpoints = consumer_checkpoints(checkpoint_dir, consumer, input_stream)
    if settings.test_run:
        checkpoints = DryRunCheckpoints(checkpoints)
    # The reading client uses the same endpoint as the sinks (option, env or .env).
    client = boto3.client("kinesis", endpoint_url=settings.kinesis_endpoint_url)
    runner = Runner(client=client, handler=build_handler(settings), stream=input_stream,
                    checkpoints=checkpoints,
                    batch_size=batch_size, poll_interval=poll_interval,
                    max_retries=max_retries, idle_exit=idle_exit, parallel=parallel_shards)
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Finish the batch in hand, checkpoint it, then leave.
        signal.signal(sig, lambda signum, frame: runner.stop.set())
    try:
        runner.run()
    except RetriesExhausted as e:
        raise click.ClickException(str(e)) from e
