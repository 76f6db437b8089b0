"""Streaming core, pure: Kinesis records in -> prediction events and dead letters out.

A Kinesis-fed Lambda (or the local runner, ``python -m serve.stream``) hands
:meth:`StreamService.handle` an event exactly as AWS delivers it. Each record's
``data`` is base64 of ``{"ride": {...}, "ride_id": 256}``. Records that cannot
be decoded or validated ("poison") become dead letters with a reason and count
as handled, so they are never retried forever; the valid rides are predicted
with one vectorized call; prediction events go to an injected sink. Records
whose prediction or write failed are reported in ``batchItemFailures`` so the
event source mapping re-delivers from the lowest of them.

No boto3 here: sinks are injected (see :mod:`serve.stream.sinks`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from serve.errors import InvalidInput
from serve.features import Rides, parse_ride, rides_from_rows

log = logging.getLogger(__name__)

MODEL_NAME = "ride_duration_prediction_model"


class OutRecord(NamedTuple):
    """One record to write to a stream: its partition key and payload bytes."""

    partition_key: str
    data: bytes


class Sink(Protocol):
    """Where records go; returns the indices of the records it could NOT write."""

    def put(self, records: Sequence[OutRecord]) -> list[int]: ...


class PoisonRecord(InvalidInput):
    """A Kinesis record that can never be predicted, whatever the retries."""


@dataclass(frozen=True)
class DecodedBatch:
    """A batch split into valid rides (with their record positions) and poison records."""

    positions: list[int]  # index in Records of each valid ride
    ride_ids: list
    rides: Rides
    poison: list[tuple[int, str]]  # (index in Records, reason)


@dataclass
class BatchResult:
    """What one invocation did: the events written, the dead letters, the failures."""

    events: list[dict] = field(default_factory=list)
    dead_letters: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # sequence numbers, ascending

    def response(self) -> dict:
        """The Lambda return value for ``ReportBatchItemFailures``."""
        return {"batchItemFailures": [{"itemIdentifier": s} for s in self.failures]}


# -- decoding -----------------------------------------------------------------------------
MAX_PARTITION_KEY = 256  # Kinesis partition keys are at most 256 characters
def _ride_id(value) -> int | str:
    """A ride id is an integer or a non-empty string (it becomes the partition key)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise PoisonRecord(f"ride_id must be an integer or a non-empty string, got {value!r}",
                           field="ride_id")
    if len(str(value)) > MAX_PARTITION_KEY:  # PutRecords would refuse it on every retry
        raise PoisonRecord(f"ride_id must be at most {MAX_PARTITION_KEY} characters (it is the "
                           f"partition key), got {len(str(value))}", field="ride_id")
    return value


def decode_data(data: str) -> tuple[int | str, tuple[int, int, float]]:
    """Base64 Kinesis ``data`` -> (ride_id, (PU, DO, distance)); raises PoisonRecord."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise PoisonRecord(f"data is not base64: {e}", field="data") from e
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, too deep, too many digits
        raise PoisonRecord(f"data is not JSON we accept: {type(e).__name__}: "
                           f"{str(e)[:200]}", field="data") from e
    if not isinstance(payload, Mapping):
        raise PoisonRecord(f"event must be a JSON object with 'ride' and 'ride_id', got "
                           f"{type(payload).__name__}", field="data")
    for key in ("ride_id", "ride"):
        if key not in payload:
            raise PoisonRecord(f"missing field: {key!r}", field=key)
    ride_id = _ride_id(payload["ride_id"])
    try:
        ride = parse_ride(payload["ride"])
    except InvalidInput as e:
        raise PoisonRecord(f"ride: {e.message}", field=e.field) from e
    return ride_id, ride


def decode_records(records: Sequence[Mapping]) -> DecodedBatch:
    """Decode the ``Records`` of a Kinesis event; one bad record never fails the others."""
    positions, ids, rows, poison = [], [], [], []
    for i, record in enumerate(records):
        try:
            try:
                data = record["kinesis"]["data"]
            except (KeyError, TypeError) as e:
                raise PoisonRecord("record has no kinesis.data", field="data") from e
            ride_id, ride = decode_data(data)
        except PoisonRecord as e:
            poison.append((i, e.message))
            continue
        positions.append(i)
        ids.append(ride_id)
        rows.append(ride)
    return DecodedBatch(positions, ids, rides_from_rows(rows), poison)


# -- encoding -----------------------------------------------------------------------------
def prediction_event(ride_id, duration: float, version: str) -> dict:
    """The prediction event contract (ARCHITECTURE.md)."""
    return {"model": MODEL_NAME, "version": version,
            "prediction": {"ride_duration": float(duration), "ride_id": ride_id}}


def dead_letter(record: Mapping, reason: str) -> dict:
    """A poison record with its reason and enough of its origin to find and replay it."""
    k = record["kinesis"]
    return {"reason": reason, "sequenceNumber": k["sequenceNumber"],
            "partitionKey": k.get("partitionKey"), "data": k.get("data"),
            "approximateArrivalTimestamp": k.get("approximateArrivalTimestamp"),
            "eventID": record.get("eventID"), "eventSourceARN": record.get("eventSourceARN")}


def encode(obj: dict) -> bytes:
    """Compact JSON bytes, the payload of every record we write."""
    return json.dumps(obj, separators=(",", ":")).encode()


def event_records(events: Sequence[dict]) -> list[OutRecord]:
    """Prediction events as stream records, partition key ``str(ride_id)``."""
    return [OutRecord(str(e["prediction"]["ride_id"]), encode(e)) for e in events]


def dead_letter_records(letters: Sequence[dict]) -> list[OutRecord]:
    """Dead letters as stream records, keyed like the records they came from."""
    return [OutRecord(d["partitionKey"] or d["sequenceNumber"], encode(d)) for d in letters]


def _seq(record: Mapping) -> str:
    return record["kinesis"]["sequenceNumber"]


# -- the service --------------------------------------------------------------------------
class StreamService:
    """Kinesis batch -> one vectorized prediction -> events to ``sink``, poison to ``dead_letters``.

    ``model`` is a ``RideDurationModel`` (anything with ``predict_rides(Rides)``);
    ``version`` is the registered model version the events carry.
    """

    def __init__(self, model, version: str, sink: Sink, dead_letters: Sink):
        self.model = model
        self.version = str(version)
        self.sink = sink
        self.dead_letters = dead_letters

    def handle(self, event: Mapping) -> BatchResult:
        """Process one Kinesis event; never raises for a bad record."""
        records = event.get("Records") or []
        batch = decode_records(records)
        failed: set[int] = set()  # positions in records
        events: list[dict] = []
        try:
            minutes = self.model.predict_rides(batch.rides)
        except Exception:  # noqa: BLE001 - a model failure is retried, not dropped
            log.exception("prediction failed for %d rides", len(batch.positions))
            failed.update(batch.positions)
        else:
            events = [prediction_event(i, m, self.version)
                      for i, m in zip(batch.ride_ids, minutes.tolist(), strict=True)]
            if events:
                for j in self.sink.put(event_records(events)):
                    failed.add(batch.positions[j])
        # Lambda re-delivers everything from the lowest failure on, so poison records past
        # it are left for that retry instead of being dead-lettered twice.
        cutoff = min(failed, default=len(records))
        poison = [(i, reason) for i, reason in batch.poison if i < cutoff]
        letters = [dead_letter(records[i], reason) for i, reason in poison]
        if letters:
            for j in self.dead_letters.put(dead_letter_records(letters)):
                failed.add(poison[j][0])
        for i, reason in poison:
            log.warning("dead letter %s: %s", _seq(records[i]), reason)
        failures = sorted((_seq(records[i]) for i in failed), key=int)
        # events is empty when the prediction failed (every position is then in failed).
        written = [e for e, pos in zip(events, batch.positions, strict=False)
                   if pos not in failed]
        return BatchResult(events=written, dead_letters=letters, failures=failures)


class CollectingSink:
    """A sink that keeps what it is given (dry runs, tests)."""

    def __init__(self) -> None:
        self.records: list[OutRecord] = []

    def put(self, records: Sequence[OutRecord]) -> list[int]:
        """Keep every record; nothing fails."""
        self.records.extend(records)
        return []

    def payloads(self) -> list[dict]:
        """The JSON payloads collected so far."""
        return [json.loads(r.data) for r in self.records]


class LogSink:
    """A dead-letter sink for when no destination is configured: log, never fail."""

    def put(self, records: Sequence[OutRecord]) -> list[int]:
        """Log each record at ERROR so poison is visible even without a destination."""
        for r in records:
            log.error("dead letter (no destination configured): %s", r.data.decode())
        return []
