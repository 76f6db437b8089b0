"""How the local runner paces its reads of a shard: real Kinesis allows 5 ``GetRecords`` calls
per second per shard, shared by every consumer, so an idle shard is read less and less often,
a throttled read backs off with jitter (never fatal), and an unreachable endpoint or a missing
stream is waited out with backoff for a bounded time."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from serve.stream.sinks import backoff, error_code

log = logging.getLogger(__name__)

THROTTLED = {"ProvisionedThroughputExceededException", "LimitExceededException"}
MAX_IDLE_WAIT = 1.0  # an idle shard is read once a second, as Lambda polls
MAX_THROTTLE_WAIT = 5.0
MAX_OUTAGE_WAIT = 5.0


class EndpointUnavailable(RuntimeError):
    """Kinesis (or the stream) stayed unreachable for longer than the runner's bound."""


def transient(error: BaseException) -> bool:
    """A read error worth waiting out: endpoint down, 5xx, or the stream (briefly) missing."""
    if isinstance(error, (BotoConnectionError, HTTPClientError)):
        return True
    if not isinstance(error, ClientError):
        return False
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return error_code(error) == "ResourceNotFoundException" or status >= 500


@dataclass
class ShardState:
    """Where the runner is in one shard, and how its reads are going."""

    shard_id: str
    iterator: str | None = None
    resume_at: str | None = None  # re-deliver from this failed record (AT_SEQUENCE_NUMBER)
    retries: int = 0  # failed deliveries in a row
    closed: bool = False
    idle: bool = False  # the last read worked and found nothing new
    empty_reads: int = 0
    throttles: int = 0
    outage_since: float | None = None
    outage_errors: int = 0
    verify: bool = False  # check the stream's identity before the next iterator


@dataclass
class RunStats:
    """Totals of one run, logged at the end and returned to callers (tests, bench)."""

    batches: int = 0
    records: int = 0
    failures: int = 0
    reads: int = 0  # GetRecords calls that answered
    throttled: int = 0  # GetRecords/GetShardIterator calls refused for throughput
    per_shard: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, shard_id: str, handled: int, failed: bool) -> None:
        """Count one handler call (shard threads call this concurrently)."""
        with self.lock:
            self.batches += 1
            self.records += handled
            self.failures += failed
            self.per_shard[shard_id] = self.per_shard.get(shard_id, 0) + handled

    def count(self, throttled: bool) -> None:
        """Count one read call."""
        with self.lock:
            self.reads += not throttled
            self.throttled += throttled


def idle_wait(shard: ShardState, poll_interval: float) -> float:
    """After an empty read: ``poll_interval``, doubling with each empty read up to 1 s."""
    shard.idle, shard.empty_reads = True, shard.empty_reads + 1
    return min(poll_interval * 2 ** (shard.empty_reads - 1), max(MAX_IDLE_WAIT, poll_interval))


def recovered(shard: ShardState) -> None:
    """A read answered: end the shard's outage and throttling streaks."""
    if shard.outage_since is not None:
        log.info("%s: Kinesis is back after %.1f s", shard.shard_id,
                 time.monotonic() - shard.outage_since)
        shard.outage_since = None
    shard.throttles = 0


def read_failed(shard: ShardState, e: BaseException, stats: RunStats, poll_interval: float,
                max_outage: float, where: str) -> float:
    """Handle a failed read call of ``shard``; returns the seconds to wait before the next one.
    Raises ``e`` when it is not worth waiting out, EndpointUnavailable past ``max_outage``."""
    code = error_code(e)
    if code == "ExpiredIteratorException":  # iterators live 5 minutes
        shard.iterator, shard.verify = None, True
        return 0.0
    if code in THROTTLED:  # 5 reads/s per shard, shared by every consumer
        shard.throttles += 1
        stats.count(throttled=True)
        (log.warning if shard.throttles == 1 else log.debug)(
            "%s: read throttled (%s), backing off", shard.shard_id, code)
        return backoff(shard.throttles, max(poll_interval, 0.05), MAX_THROTTLE_WAIT)
    if not transient(e):
        raise e
    now = time.monotonic()
    shard.iterator, shard.verify = None, True  # then resume from the checkpoint
    if shard.outage_since is None:
        shard.outage_since, shard.outage_errors = now, 0
        log.warning("%s: Kinesis unavailable (%s); retrying for up to %.0f s", shard.shard_id,
                    e, max_outage)
    shard.outage_errors += 1
    down = now - shard.outage_since
    if down >= max_outage:
        raise EndpointUnavailable(
            f"{where} unavailable for {down:.0f} s (the bound, --max-outage): {e}; the "
            f"checkpoints are kept, start the runner again when it is back") from e
    log.debug("%s: still unavailable after %.1f s (%s)", shard.shard_id, down, e)
    return backoff(shard.outage_errors, 0.5, MAX_OUTAGE_WAIT)
