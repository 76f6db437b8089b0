"""Kinesis record codec, pure: ride events in, prediction events and dead letters out.

Everything a record must satisfy to be read or written lives here: what a ride
event is, what makes a ``ride_id`` a key, Kinesis's record limits, and the
dead-letter shape with its size cap. No boto3, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from serve.errors import InvalidInput
from serve.features import Rides, parse_ride, rides_from_rows

MODEL_NAME = "ride_duration_prediction_model"
# Kinesis limits: a partition key is 1..256 Unicode characters; a record (data + partition key)
# is at most 1 MiB.
MAX_PARTITION_KEY = 256
MAX_RECORD_BYTES = 1024 * 1024
# A dead letter is at most this many bytes of JSON, whatever the record it describes: it fits
# every destination (a Kinesis record, one CloudWatch log event, an S3 line). A bigger record's
# data is cut and marked (dataTruncated, dataLength, dataSha256); the record itself stays in
# the input stream at its sequence number for the stream's retention period.
MAX_DEAD_LETTER_BYTES = 64 * 1024
MAX_REASON_CHARS = 1000


class OutRecord(NamedTuple):
    """One record to write to a stream: its partition key and payload bytes."""

    partition_key: str
    data: bytes


class PoisonRecord(InvalidInput):
    """A Kinesis record that can never be predicted, whatever the retries."""


@dataclass(frozen=True)
class DecodedBatch:
    """A batch split into valid rides (with their record positions) and poison records."""

    positions: list[int]  # index in Records of each valid ride
    ride_ids: list
    rides: Rides
    poison: list[tuple[int, str]]  # (index in Records, reason)


# -- keys and limits ----------------------------------------------------------------------
def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a Kinesis partition key (and so a ride id), or None."""
    if not key or not key.strip():
        return "is empty or only whitespace"
    if len(key) > MAX_PARTITION_KEY:
        return f"is {len(key)} characters, over the {MAX_PARTITION_KEY} of a partition key"
    if key != key.strip():
        return "starts or ends with whitespace"
    if not key.isprintable():  # control, format (zero-width) and lone surrogate characters
        bad = next(c for c in key if not c.isprintable())
        return f"holds the unprintable character U+{ord(bad):04X}"
    return None


def record_problem(record: OutRecord) -> str | None:
    """Why Kinesis would refuse ``record`` on every try (key, size); None if it can be written."""
    problem = key_problem(record.partition_key)
    if problem:
        return f"partition key {problem}"
    size = len(record.data) + len(record.partition_key.encode())
    if size > MAX_RECORD_BYTES:
        return f"record is {size:,} bytes, over Kinesis's {MAX_RECORD_BYTES:,}"
    return None


# -- decoding -----------------------------------------------------------------------------
def _ride_id(value) -> int | str:
    """A ride id is a key: an integer, or a string that can be a partition key as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PoisonRecord(f"ride_id must be an integer or a non-empty string, got "
                           f"{_clip(repr(value), 80)}", field="ride_id")
    problem = key_problem(str(value))
    if problem:
        raise PoisonRecord(f"ride_id {problem} (it is the partition key); got "
                           f"{_clip(ascii(value), 80)}", field="ride_id")
    return value


def decode_data(data: str) -> tuple[int | str, tuple[int, int, float]]:
    """Base64 Kinesis ``data`` -> (ride_id, (PU, DO, distance)); raises PoisonRecord."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise PoisonRecord(f"data is not base64: {e}", field="data") from e
    try:
        text = raw.decode("utf-8")  # json.loads(bytes) would also guess UTF-16/32 from a BOM
    except UnicodeDecodeError as e:
        raise PoisonRecord(f"data is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                           f"{e.start}); a ride event is UTF-8 JSON", field="data") from e
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError) as e:  # not JSON, too deep, too many digits
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
        raise PoisonRecord(f"ride: {_clip(e.message, 300)}", field=e.field) from e
    return ride_id, ride


def _kinesis(record) -> Mapping:
    k = record.get("kinesis") if isinstance(record, Mapping) else None
    return k if isinstance(k, Mapping) else {}


def sequence_number(record) -> str | None:
    """The record's sequence number if it has a usable one (a decimal string), else None:
    a record without one cannot be reported for re-delivery, only dead-lettered."""
    seq = _kinesis(record).get("sequenceNumber")
    return seq if isinstance(seq, str) and seq.isascii() and seq.isdigit() else None


def decode_records(records: Sequence) -> DecodedBatch:
    """Decode the ``Records`` of a Kinesis event; one bad record never fails the others.

    ``ride_id`` is a key: a later record of the batch with the same id and another ride is
    poison (the same ride again is predicted again, like any at-least-once repeat).
    """
    positions, ids, rows, poison = [], [], [], []
    first: dict[str, tuple[tuple, str]] = {}  # str(ride_id) -> (ride, sequence number)
    for i, record in enumerate(records):
        try:
            seq = sequence_number(record)
            if seq is None:
                raise PoisonRecord("record has no kinesis.sequenceNumber (a decimal string), so "
                                   "it cannot be reported for retry", field="sequenceNumber")
            data = _kinesis(record).get("data")
            if not isinstance(data, str):
                raise PoisonRecord("record has no kinesis.data", field="data")
            ride_id, ride = decode_data(data)
            seen = first.setdefault(str(ride_id), (ride, seq))
            if seen[0] != ride:
                raise PoisonRecord(f"ride_id {ride_id!r} already names another ride in this "
                                   f"batch (record {seen[1]}); a ride_id must identify one ride",
                                   field="ride_id")
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


def encode(obj) -> bytes:
    """Compact JSON bytes, the payload of every record we write."""
    return json.dumps(obj, separators=(",", ":")).encode()


def event_record(event: dict) -> OutRecord:
    """A prediction event as a stream record, partition key ``str(ride_id)``."""
    return OutRecord(str(event["prediction"]["ride_id"]), encode(event))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _text(value, limit: int) -> str | None:
    return None if value is None else _clip(value if isinstance(value, str) else repr(value),
                                            limit)


def _json_text(value) -> str:
    try:
        return json.dumps(value, default=repr)
    except (ValueError, RecursionError):  # nested too deep
        return f"<unprintable {type(value).__name__}>"


def dead_letter(record, reason: str) -> dict:
    """A poison record with its reason and enough of its origin to find and replay it.

    Never raises, whatever ``record`` is, and never exceeds ``MAX_DEAD_LETTER_BYTES`` once
    encoded: ``data`` (the original base64) is cut when it would, and the cut is marked. A
    record with no ``kinesis`` object is kept whole (as JSON text) in ``record``, cut alike.
    """
    k = _kinesis(record)
    arrival = k.get("approximateArrivalTimestamp")
    meta = record if isinstance(record, Mapping) else {}
    letter = {"reason": _clip(str(reason), MAX_REASON_CHARS),
              "sequenceNumber": sequence_number(record),
              "partitionKey": _text(k.get("partitionKey"), MAX_PARTITION_KEY),
              "data": k.get("data") if isinstance(k.get("data"), str) else _text(k.get("data"),
                                                                                   1000),
              "approximateArrivalTimestamp": arrival if isinstance(arrival, (int, float))
              and not isinstance(arrival, bool) else None,
              "eventID": _text(meta.get("eventID"), 300),
              "eventSourceARN": _text(meta.get("eventSourceARN"), 2048)}
    field = "data" if k else "record"
    if not k:  # nothing Kinesis-shaped: keep what there is
        letter["record"] = _json_text(record)
    original = letter[field]
    if len(encode(letter)) <= MAX_DEAD_LETTER_BYTES or not isinstance(original, str):
        return letter
    letter.update(dataTruncated=True, dataLength=len(original),
                  dataSha256=hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest())
    keep = max(0, len(original) - (len(encode(letter)) - MAX_DEAD_LETTER_BYTES) - 64)
    while True:  # non-ASCII text grows when escaped: halve until it fits
        letter[field] = original[:keep]
        if len(encode(letter)) <= MAX_DEAD_LETTER_BYTES or keep == 0:
            return letter
        keep //= 2


def dead_letter_record(letter: dict) -> OutRecord:
    """A dead letter as a stream record, keyed like the record it came from when it can be."""
    for key in (letter.get("partitionKey"), letter.get("sequenceNumber")):
        if isinstance(key, str) and key_problem(key) is None:
            return OutRecord(key, encode(letter))
    return OutRecord("dead-letter", encode(letter))
