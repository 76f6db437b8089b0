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

Reads are paced for real Kinesis, where all consumers of a shard share 5
``GetRecords`` calls per second: an idle shard is read less and less often (down to
once a second), a throttled read backs off with jitter and is never fatal, and an
unreachable endpoint (or a missing stream) is retried with backoff for up to
``max_outage`` seconds. Checkpoints carry the stream's identity: a stream deleted and
created again under the same name is noticed (at start, after an outage, every
``verify_every`` seconds and before exiting) and stops the runner, or with
``on_recreated="trim-horizon"`` is read from its start; records are never skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError

from serve.stream.app import Handler
from serve.stream.checkpoints import Checkpoints, DryRunCheckpoints
from serve.stream.events import kinesis_event, lowest_failure
from serve.stream.pacing import RunStats, ShardState, idle_wait, read_failed, recovered
from serve.stream.sinks import error_code
from serve.stream.streams import StreamIdentity, describe_stream, endpoint_of

log = logging.getLogger(__name__)

ON_RECREATED = ("stop", "trim-horizon")


class RetriesExhausted(RuntimeError):
    """A batch kept failing: the shard stops at its checkpoint instead of skipping records."""


class StreamRecreated(RuntimeError):
    """The stream is not the one the checkpoints belong to (deleted and created again)."""

    def __init__(self, message: str, current: StreamIdentity | None):
        super().__init__(message)
        self.current = current


# -- the loop -----------------------------------------------------------------------------
@dataclass
class Runner:
    """Reads every shard of ``stream`` and feeds ``handler`` until ``stop`` is set."""

    client: object  # a boto3 Kinesis client
    handler: Handler | None
    stream: str
    checkpoints: Checkpoints | DryRunCheckpoints
    batch_size: int = 100
    poll_interval: float = 0.2  # wait after a read that emptied the shard; doubles while idle
    max_retries: int = 3
    retry_delay: float = 0.5
    idle_exit: float | None = None  # stop after this many seconds without records
    stop: threading.Event = field(default_factory=threading.Event)
    stream_arn: str = ""  # looked up by prepare()
    report_every: float = 30.0  # seconds between progress lines in the log
    # Lambda runs one invocation per shard concurrently. moto_server's PutRecords is not
    # thread-safe (concurrent writes to one shard can take the same sequence number and
    # overwrite each other), so handler calls are serialized unless asked otherwise.
    parallel: bool = False
    max_outage: float = 300.0  # seconds of endpoint/stream errors before giving up
    verify_every: float = 10.0  # seconds between checks that the stream is still the same
    on_recreated: str = "stop"  # or "trim-horizon": read a re-created stream from its start
    identity: StreamIdentity | None = None
    _handler_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _halt: threading.Event = field(default_factory=threading.Event, repr=False)

    # -- the stream and its identity
    def prepare(self) -> StreamIdentity:
        """Look the stream up and check the checkpoints are of it (before a model is loaded)."""
        self.identity = describe_stream(self.client, self.stream)
        self.stream_arn = self.identity.arn
        foreign = self.checkpoints.foreign(self.identity)
        if foreign:
            self._recreated(StreamRecreated(self._recreated_message(
                next(iter(foreign.values())), self.identity), self.identity))
        return self.identity

    def _recreated_message(self, old: StreamIdentity | None, now: StreamIdentity | None,
                           why: str = "") -> str:
        belong = f"belong to the stream created {old.created}" if old else why
        return (f"stream {self.stream!r} was re-created: the checkpoints in "
                f"{self.checkpoints.root} {belong}, not to the stream there now (created "
                f"{now.created if now else 'unknown'}), whose sequence numbers start over. "
                f"Resuming would skip records, so the runner stops. To read the new stream "
                f"from its start, run again with --on-recreated-stream trim-horizon (any of "
                f"its records already predicted are predicted again)")

    def _check_identity(self) -> None:
        """Raise StreamRecreated if the stream is no longer the one being read.

        ``identity`` (what the checkpoints are saved with) never changes here: until the
        checkpoints are reset, every thread keeps stamping them with the old stream, so a
        batch some thread handles before it stops is still seen as foreign at the next start.
        """
        current = describe_stream(self.client, self.stream)
        if current != self.identity:
            raise StreamRecreated(self._recreated_message(self.identity, current), current)

    def _recreated(self, e: StreamRecreated) -> None:
        """Stop (the default), or forget the checkpoints and read the new stream from its start."""
        if self.on_recreated != "trim-horizon":
            raise e
        log.warning("%s; reading it from TRIM_HORIZON (--on-recreated-stream trim-horizon)",
                    str(e).split(", whose")[0])
        self.checkpoints.reset()
        self.identity = e.current or describe_stream(self.client, self.stream)
        self.stream_arn = self.identity.arn

    def shards(self) -> list[str]:
        """Shard ids of the stream (all pages)."""
        ids, kwargs = [], {"StreamName": self.stream}
        while True:
            resp = self.client.list_shards(**kwargs)
            ids += [s["ShardId"] for s in resp["Shards"]]
            if not resp.get("NextToken"):
                return ids
            kwargs = {"NextToken": resp["NextToken"]}

    # -- one shard
    def _iterator(self, shard: ShardState) -> str:
        if shard.verify:  # after an outage or an expired iterator: is it still our stream?
            self._check_identity()
            shard.verify = False
        kw = {"StreamName": self.stream, "ShardId": shard.shard_id}
        after = None if shard.resume_at else self.checkpoints.load(shard.shard_id)
        if shard.resume_at is not None:
            kw.update(ShardIteratorType="AT_SEQUENCE_NUMBER",
                      StartingSequenceNumber=shard.resume_at)
        elif after is not None:
            kw.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=after)
        else:
            kw.update(ShardIteratorType="TRIM_HORIZON")
        try:
            iterator = self.client.get_shard_iterator(**kw)["ShardIterator"]
        except ClientError as e:  # real Kinesis refuses a sequence number of another stream
            if error_code(e) != "InvalidArgumentException" or "StartingSequenceNumber" not in kw:
                raise
            raise StreamRecreated(self._recreated_message(
                None, None, f"belong to another stream: Kinesis refused sequence number "
                f"{kw['StartingSequenceNumber']} of shard {shard.shard_id} ({e})"), None) from e
        shard.resume_at = None
        return iterator

    def step(self, shard: ShardState, region: str, stats: RunStats) -> tuple[int, float]:
        """Read and handle one batch of ``shard``: (records read, seconds to wait before the
        next read of it)."""
        shard.idle = False
        try:
            if shard.iterator is None:
                shard.iterator = self._iterator(shard)
            resp = self.client.get_records(ShardIterator=shard.iterator, Limit=self.batch_size)
        except (ClientError, BotoCoreError) as e:
            return 0, read_failed(shard, e, stats, self.poll_interval, self.max_outage,
                                  f"Kinesis stream {self.stream!r} at {endpoint_of(self.client)}")
        stats.count(throttled=False)
        recovered(shard)
        records = resp["Records"]
        if not records:
            shard.iterator = resp.get("NextShardIterator")
            shard.closed = shard.iterator is None  # a closed (resharded) shard is done
            return 0, idle_wait(shard, self.poll_interval)
        shard.empty_reads = 0
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
            self.checkpoints.save(shard.shard_id, records[-1]["SequenceNumber"], self.identity)
            shard.iterator, shard.retries = resp.get("NextShardIterator"), 0
            shard.closed = shard.iterator is None
            stats.add(shard.shard_id, len(records), failed=False)
            # A full batch (or a reader behind the tip) has more waiting: read again at once.
            more = len(records) >= self.batch_size or resp.get("MillisBehindLatest", 0) > 0
            return len(records), 0.0 if more else self.poll_interval
        done = [r for r in records if int(r["SequenceNumber"]) < int(failed)]
        if done:  # the records before the failure are handled: do not re-deliver them
            self.checkpoints.save(shard.shard_id, done[-1]["SequenceNumber"], self.identity)
            shard.retries = 0
        stats.add(shard.shard_id, len(done), failed=True)
        shard.retries += 1
        if shard.retries > self.max_retries:
            raise RetriesExhausted(
                f"{shard.shard_id}: record {failed} failed {shard.retries} times in a row; "
                f"stopped at the checkpoint, fix the cause and restart")
        log.warning("%s: batch failed from %s (retry %d/%d)", shard.shard_id, failed,
                    shard.retries, self.max_retries)
        shard.iterator, shard.resume_at = None, failed
        return len(records), self.retry_delay * shard.retries

    def _poll(self, shard: ShardState, region: str, stats: RunStats,
              errors: list[BaseException]) -> None:
        """One shard's loop: Lambda also runs one invocation per shard at a time, in order."""
        idle_since = time.monotonic()
        try:
            while not self._halt.is_set() and not shard.closed:
                n, wait = self.step(shard, region, stats)
                now = time.monotonic()
                if n or not shard.idle:  # throttled or unreachable is not idle
                    idle_since = now
                elif self.idle_exit is not None and now - idle_since >= self.idle_exit:
                    return
                if wait:
                    self._halt.wait(wait)
        except BaseException as e:  # noqa: BLE001 - handed to run(), which re-raises it
            errors.append(e)
            self._halt.set()

    # -- every shard
    def _round(self, stats: RunStats) -> None:
        """Poll every shard (one thread each) until stopped, idle, or an error."""
        self._halt.clear()
        region = self.client.meta.region_name
        shards = [ShardState(s) for s in self.shards()]
        errors: list[BaseException] = []
        log.info("reading %s (%d shards) into the handler, checkpoints in %s", self.stream,
                 len(shards), self.checkpoints.root)
        threads = [threading.Thread(target=self._poll, args=(s, region, stats, errors),
                                    name=s.shard_id, daemon=True) for s in shards]
        for t in threads:
            t.start()
        last_report = last_verify = time.monotonic()
        for t in threads:
            while t.is_alive():  # short joins keep the main thread responsive to signals
                t.join(0.2)
                if self.stop.is_set():
                    self._halt.set()
                now = time.monotonic()
                if now - last_report >= self.report_every:
                    last_report = now
                    log.info("progress: %d records in %d batches (%d failed batches)",
                             stats.records, stats.batches, stats.failures)
                if now - last_verify >= self.verify_every and not self._halt.is_set():
                    last_verify = now
                    try:
                        self._check_identity()
                    except StreamRecreated as e:
                        errors.insert(0, e)
                        self._halt.set()
                    except (ClientError, BotoCoreError):
                        pass  # an outage: the shard threads wait it out themselves
        if errors:
            raise errors[0]
        try:  # idle or stopped: a last check, so that no exit hides a re-created stream
            self._check_identity()
        except (ClientError, BotoCoreError) as e:
            log.warning("could not check that %s is still the stream of the checkpoints (%s); "
                        "the next start checks it", self.stream, e)

    def run(self) -> RunStats:
        """Poll every shard until stopped (SIGTERM, ``stop`` or idle exit); raises
        RetriesExhausted, EndpointUnavailable or StreamRecreated instead of skipping records."""
        if self.identity is None:
            self.prepare()
        stats = RunStats()
        while True:
            try:
                self._round(stats)
                break
            except StreamRecreated as e:
                self._recreated(e)  # raises unless reading the new stream from its start
                if self.stop.is_set():
                    break
        log.info("stopped: %d records in %d batches (%d failed batches)", stats.records,
                 stats.batches, stats.failures)
        return stats
