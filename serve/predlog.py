"""Optional prediction log: every prediction with time, model version, inputs and output.

Requests only append a reference to their arrays to a bounded queue (never
blocking, never failing: when the queue is full the batch is dropped and
counted); one writer thread drains it and writes batches to a sink: JSONL
file, a folder of parquet files, or a SQL table (``postgresql+psycopg2://``,
``sqlite://``), where monitoring and the batch evaluation read them later.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np

from serve.atomic import atomic_path
from serve.features import Rides

log = logging.getLogger(__name__)

COLUMNS = ("ts", "endpoint", "model_version", "PULocationID", "DOLocationID", "trip_distance",
           "duration")
TABLE = "predictions"


@dataclass(frozen=True)
class LoggedBatch:
    """The predictions of one request, as the request path hands them over."""

    ts: float  # unix seconds
    endpoint: str
    model_version: str
    rides: Rides
    minutes: np.ndarray


def to_columns(batches: list[LoggedBatch]) -> dict[str, list]:
    """Row-aligned columns of a list of batches (one row per prediction)."""
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for b in batches:
        n = len(b.minutes)
        ts = datetime.fromtimestamp(b.ts, tz=timezone.utc)
        cols["ts"] += [ts] * n
        cols["endpoint"] += [b.endpoint] * n
        cols["model_version"] += [b.model_version] * n
        cols["PULocationID"] += b.rides.pu.tolist()
        cols["DOLocationID"] += b.rides.do.tolist()
        cols["trip_distance"] += b.rides.distance.tolist()
        cols["duration"] += b.minutes.tolist()
    return cols


class Sink(Protocol):
    def write(self, columns: dict[str, list]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per prediction to a file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, columns: dict[str, list]) -> None:
        names = list(columns)
        with open(self.path, "a", encoding="utf-8") as out:
            for row in zip(*columns.values(), strict=True):
                rec = dict(zip(names, row, strict=True))
                rec["ts"] = rec["ts"].isoformat()
                out.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        pass


class ParquetSink:
    """Writes one parquet file per batch into a folder (readable as one dataset)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._seq = 0

    def write(self, columns: dict[str, list]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._seq += 1
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        # Readers never see half a file; a failed write leaves no temporary file behind.
        with atomic_path(self.folder / f"part-{stamp}-{self._seq:06d}.parquet") as tmp:
            pq.write_table(pa.table(columns), tmp)

    def close(self) -> None:
        pass


class SqlSink:
    """Inserts predictions into a table (created if missing) through SQLAlchemy."""

    def __init__(self, url: str, table: str = TABLE):
        import sqlalchemy as sa

        self.engine = sa.create_engine(url, pool_pre_ping=True)
        meta = sa.MetaData()
        self.table = sa.Table(
            table, meta,
            sa.Column("ts", sa.DateTime(timezone=True), nullable=False, index=True),
            sa.Column("endpoint", sa.String(32), nullable=False),
            sa.Column("model_version", sa.String(64), nullable=False),
            sa.Column("PULocationID", sa.Integer, nullable=False),
            sa.Column("DOLocationID", sa.Integer, nullable=False),
            sa.Column("trip_distance", sa.Float, nullable=False),
            sa.Column("duration", sa.Float, nullable=False),
        )
        meta.create_all(self.engine)

    def write(self, columns: dict[str, list]) -> None:
        names = list(columns)
        rows = [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]
        with self.engine.begin() as conn:
            conn.execute(self.table.insert(), rows)

    def close(self) -> None:
        self.engine.dispose()


def open_sink(target: str) -> Sink:
    """A sink for ``--log-predictions``: a SQLAlchemy URL, a ``.jsonl`` file or a folder."""
    scheme = target.split("://", 1)[0] if "://" in target else ""
    if scheme.startswith(("postgresql", "sqlite", "mysql")):
        return SqlSink(target)
    if scheme:
        raise ValueError(f"--log-predictions: unsupported scheme {scheme!r}; use a path "
                         f"(.jsonl file or parquet folder) or a postgresql+psycopg2:// URL")
    if target.endswith(".jsonl"):
        return JsonlSink(target)
    return ParquetSink(target)


class PredictionLog:
    """A bounded queue and one writer thread that flushes batches to a sink."""

    def __init__(self, sink: Sink, flush_rows: int = 5000, flush_seconds: float = 1.0,
                 max_queued: int = 10_000):
        self.sink = sink
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._queue: queue.Queue[LoggedBatch | None] = queue.Queue(max_queued)
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._lock = threading.Lock()  # put() runs on the event loop and in worker threads
        self._closed = False
        self.dropped = 0  # batches lost because the writer fell behind (or came after close)
        self.written = 0  # rows written
        self.failed = 0  # rows the sink failed to write

    def start(self) -> PredictionLog:
        """Start the writer thread."""
        self._thread.start()
        return self

    def put(self, batch: LoggedBatch) -> None:
        """Hand a request's predictions to the writer; never blocks the request."""
        with self._lock:
            if self._closed:
                self.dropped += 1
                return
            try:
                self._queue.put_nowait(batch)
            except queue.Full:
                self.dropped += 1

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued, stop the writer, close the sink (later puts count as
        dropped). If the writer is still busy after ``timeout``, the sink is left open."""
        with self._lock:
            self._closed = True  # every put from here on is dropped, none is lost unseen
        if self._thread.is_alive():
            deadline = time.monotonic() + timeout
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.error("prediction log: writer still busy after %.0f s; sink left open",
                          timeout)
                return
        self.sink.close()

    def _flush(self, pending: list[LoggedBatch]) -> None:
        rows = sum(len(b.minutes) for b in pending)
        try:
            self.sink.write(to_columns(pending))
            self.written += rows
        except Exception:  # noqa: BLE001 - a logging outage must never stop serving
            self.failed += rows
            log.exception("prediction log: could not write %d rows", rows)

    def _run(self) -> None:
        pending: list[LoggedBatch] = []
        rows, deadline = 0, None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = False  # the flush interval passed
            if item:
                pending.append(item)
                rows += len(item.minutes)
                deadline = deadline or time.monotonic() + self.flush_seconds
            if pending and (item is None or item is False or rows >= self.flush_rows):
                self._flush(pending)
                pending, rows, deadline = [], 0, None
            if item is None:
                return
