"""Sinks that write stream records: Kinesis ``PutRecords`` and S3 objects (dead letters).

Clients are passed in (boto3 clients, or anything with the same methods), so the
endpoints — real AWS, moto_server, LocalStack — are the caller's choice.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence

from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from serve.stream.codec import OutRecord, record_problem

log = logging.getLogger(__name__)

# PutRecords limits: 500 records and 5 MiB per call (data + partition key bytes).
MAX_RECORDS = 500
MAX_BYTES = 5 * 1024 * 1024


def record_size(record: OutRecord) -> int:
    """Bytes a record counts against the PutRecords size limit."""
    return len(record.data) + len(record.partition_key.encode())


def chunks(records: Sequence[OutRecord], max_records: int = MAX_RECORDS,
           max_bytes: int = MAX_BYTES) -> Iterator[list[int]]:
    """Indices of ``records`` grouped into PutRecords calls within both limits, in order."""
    chunk: list[int] = []
    size = 0
    for i, r in enumerate(records):
        n = record_size(r)
        if chunk and (len(chunk) == max_records or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(i)
        size += n
    if chunk:
        yield chunk


# A whole PutRecords call failing with one of these fails the same way on every try.
NON_RETRYABLE = {"ValidationException", "InvalidArgumentException", "ResourceNotFoundException",
                 "AccessDeniedException", "UnrecognizedClientException", "KMSAccessDeniedException",
                 "KMSDisabledException", "KMSNotFoundException", "KMSInvalidStateException"}


def error_code(error: BaseException) -> str | None:
    """The AWS error code of a ``ClientError`` (None for anything else)."""
    return error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else None


def retryable(error: BaseException) -> bool:
    """Whether a failed call may succeed when tried again (throttling, endpoint down, 5xx)."""
    if isinstance(error, ParamValidationError):
        return False
    return error_code(error) not in NON_RETRYABLE


def backoff(attempt: int, base: float, cap: float) -> float:
    """Full-jitter exponential backoff before retry ``attempt`` (1, 2, ...)."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


class KinesisSink:
    """``PutRecords`` in chunks; retries only the entries that failed, a bounded number of times."""

    def __init__(self, client, stream_name: str, max_attempts: int = 5, base_delay: float = 0.05,
                 max_delay: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        self.client = client
        self.stream_name = stream_name
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.sleep = sleep

    def put(self, records: Sequence[OutRecord]) -> list[int]:
        """Write ``records``; returns the indices still failed after the last attempt.

        A record Kinesis would refuse on every try (size, partition key) is never sent, so it
        cannot fail the others of its call; it is returned failed at once.
        """
        failed, sendable = [], []
        for i, r in enumerate(records):
            problem = record_problem(r)
            if problem:
                log.error("record %d for %s not written (never writable): %s", i,
                          self.stream_name, problem)
                failed.append(i)
            else:
                sendable.append(i)
        todo = [records[i] for i in sendable]
        for chunk in chunks(todo):
            failed.extend(sendable[j] for j in self._put_chunk(todo, chunk))
        return sorted(failed)

    def _put_chunk(self, records: Sequence[OutRecord], pending: list[int]) -> list[int]:
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                self.sleep(backoff(attempt - 1, self.base_delay, self.max_delay))
            entries = [{"Data": records[i].data, "PartitionKey": records[i].partition_key}
                       for i in pending]
            last = attempt == self.max_attempts
            try:
                resp = self.client.put_records(StreamName=self.stream_name, Records=entries)
            except (ClientError, BotoCoreError) as e:
                # The whole call failed (throttled, endpoint down, stream missing).
                again = retryable(e) and not last
                log.warning("PutRecords of %d records to %s failed (attempt %d/%d), %s: %s",
                            len(pending), self.stream_name, attempt, self.max_attempts,
                            "retrying" if again else "giving up" if last else "not retried", e)
                if not again:
                    return pending
                continue
            # Entries come back in request order; failed ones carry an ErrorCode.
            pending = [i for i, r in zip(pending, resp["Records"], strict=True)
                       if r.get("ErrorCode")]
            if not pending:
                return []
            log.warning("PutRecords to %s: %d entries failed (attempt %d/%d), %s",
                        self.stream_name, len(pending), attempt, self.max_attempts,
                        "giving up on them" if last else "retrying them")
        return pending


class S3Sink:
    """Writes a batch of records as one JSON-lines object under ``s3://bucket/prefix/``.

    The key is the hash of the content, so a re-delivered batch overwrites its own
    object instead of adding a copy.
    """

    def __init__(self, client, bucket: str, prefix: str):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def key(self, body: bytes) -> str:
        """Object key of a batch: content-addressed, so writes are idempotent."""
        name = hashlib.sha256(body).hexdigest()[:32] + ".jsonl"
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, records: Sequence[OutRecord]) -> list[int]:
        """One object for the batch; on failure every record is reported failed."""
        if not records:
            return []
        body = b"".join(r.data + b"\n" for r in records)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(body), Body=body,
                                   ContentType="application/x-ndjson")
        except (ClientError, BotoCoreError) as e:
            log.warning("dead letters to s3://%s/%s failed: %s", self.bucket, self.prefix, e)
            return list(range(len(records)))
        return []


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix); raises ValueError naming the problem."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise ValueError(f"not an s3://bucket/prefix URI: {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix
