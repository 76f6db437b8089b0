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

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from serve.stream.codec import (
    OutRecord,
    dead_letter,
    dead_letter_record,
    decode_records,
    event_record,
    prediction_event,
    record_problem,
    sequence_number,
)

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where records go; returns the indices of the records it could NOT write."""

    def put(self, records: Sequence[OutRecord]) -> list[int]: ...


class DeadLetterNotWritten(RuntimeError):
    """A record without a sequence number could not be dead-lettered: it cannot be reported
    in ``batchItemFailures``, so the whole batch fails (a function error) and is re-delivered."""


@dataclass
class BatchResult:
    """What one invocation did: the events written, the dead letters, the failures."""

    events: list[dict] = field(default_factory=list)
    dead_letters: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # sequence numbers, ascending

    def response(self) -> dict:
        """The Lambda return value for ``ReportBatchItemFailures``."""
        return {"batchItemFailures": [{"itemIdentifier": s} for s in self.failures]}


def event_records_of(event) -> tuple[list, str | None]:
    """The ``Records`` of a Lambda event, or ``([], reason)`` when the event is not one."""
    if not isinstance(event, Mapping):
        return [], f"event is not a JSON object but {type(event).__name__}"
    records = event.get("Records")
    if records is None:
        return [], None  # no records at all (a test invocation): nothing to do
    if not isinstance(records, list):
        return [], f"event Records is not a list but {type(records).__name__}"
    return records, None


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

    def handle(self, event) -> BatchResult:
        """Process one Kinesis event; never raises for its input (event, record or ride)."""
        records, problem = event_records_of(event)
        if problem:
            return BatchResult(dead_letters=self._dead_letter_whole(event, problem))
        batch = decode_records(records)
        poison = list(batch.poison)  # (position, reason); events that cannot be written join
        failed: set[int] = set()  # positions in records
        out: list[tuple[int, dict, OutRecord]] = []
        try:
            minutes = self.model.predict_rides(batch.rides)
        except Exception:  # noqa: BLE001 - a model failure is retried, not dropped
            log.exception("prediction failed for %d rides", len(batch.positions))
            failed.update(batch.positions)
        else:
            for pos, ride_id, m in zip(batch.positions, batch.ride_ids, minutes.tolist(),
                                       strict=True):
                ev = prediction_event(ride_id, m, self.version)
                try:  # whatever passed validation but cannot be written is a dead letter
                    rec = event_record(ev)
                    why = record_problem(rec)
                except (ValueError, TypeError, UnicodeError) as e:
                    rec, why = None, f"{type(e).__name__}: {e}"
                if why:
                    poison.append((pos, f"prediction event cannot be written: {why}"))
                else:
                    out.append((pos, ev, rec))
            if out:
                for j in self.sink.put([rec for _, _, rec in out]):
                    failed.add(out[j][0])
        # Lambda re-delivers everything from the lowest failure on, so poison records past
        # it are left for that retry instead of being dead-lettered twice.
        cutoff = min(failed, default=len(records))
        poison = sorted((i, reason) for i, reason in poison if i < cutoff)
        letters = [dead_letter(records[i], reason) for i, reason in poison]
        failed.update(poison[j][0] for j in self._put_dead_letters(letters))
        failures = sorted((sequence_number(records[i]) for i in failed), key=int)
        written = [ev for pos, ev, _ in out if pos not in failed]
        return BatchResult(events=written, dead_letters=letters, failures=failures)

    def _put_dead_letters(self, letters: list[dict]) -> list[int]:
        """Write ``letters``, log each one's fate; returns the indices not written (each has
        a sequence number to report: one without raises DeadLetterNotWritten)."""
        if not letters:
            return []
        unwritten = set(self.dead_letters.put([dead_letter_record(d) for d in letters]))
        for j, d in enumerate(letters):
            seq = d["sequenceNumber"] or "without a sequence number"
            if j not in unwritten:
                log.warning("dead letter of record %s: %s", seq, d["reason"])
                continue
            log.error("dead letter of record %s NOT written, the record will be re-delivered: "
                      "%s", seq, d["reason"])
            if d["sequenceNumber"] is None:
                raise DeadLetterNotWritten(f"the dead letter of a record without a sequence "
                                           f"number could not be written: {d['reason']}")
        return sorted(unwritten)

    def _dead_letter_whole(self, event, problem: str) -> list[dict]:
        """An event that is not a Kinesis event: one dead letter holding it (cut to size)."""
        letters = [dead_letter(event, problem)]
        self._put_dead_letters(letters)
        return letters


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
