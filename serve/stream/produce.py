"""``python -m serve.stream.produce``: replay a parquet month of rides onto a Kinesis stream.

Each ride becomes ``{"ride": {...}, "ride_id": n, "produced_at": epoch seconds}``
(partition key ``str(ride_id)``), sent with PutRecords at a paced rate; the
timestamp lets a reader measure event-to-prediction latency. Also holds the small
stream helpers the demo, tests and benchmark share (create, read back).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence

import click
import numpy as np
from botocore.exceptions import BotoCoreError, ClientError, WaiterError

from serve.cli import Command
from serve.logs import setup_logging
from serve.stream.codec import OutRecord, encode
from serve.stream.sinks import MAX_RECORDS, KinesisSink
from serve.stream.streams import ENDPOINT_HELP, StreamUnavailable, endpoint_of, require_stream

log = logging.getLogger(__name__)

# Poison records as a producer could really send them (Kinesis data is bytes, so every
# one of these reaches the handler base64-encoded): not JSON, not an object, no ride,
# wrong types, out of range.
POISON = (
    b"\xff\xfe not json",
    b"[1, 2, 3]",
    b'{"ride_id": 1}',
    b'{"ride": {"PULocationID": "43", "DOLocationID": 151, "trip_distance": 1.0}, "ride_id": 7}',
    b'{"ride": {"PULocationID": 43, "DOLocationID": 999, "trip_distance": 1.0}, "ride_id": 8}',
    b'{"ride": {"PULocationID": 43, "DOLocationID": 151, "trip_distance": -2}, "ride_id": 9}',
)


class RecordsNotWritten(RuntimeError):
    """Some records could not be written even after the sink's retries."""


def ensure_stream(client, name: str, shards: int = 1, timeout: float = 60) -> None:
    """Create ``name`` with ``shards`` shards unless it exists; wait until ACTIVE."""
    try:
        client.create_stream(StreamName=name, ShardCount=shards)
    except client.exceptions.ResourceInUseException:
        pass
    client.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 1, "MaxAttempts": max(1, int(timeout))})


def read_ride_columns(path: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """The ride columns of a TLC parquet file (local, s3:// or https://)."""
    from serve.features import RIDE_COLUMNS
    from serve.tlc import open_parquet

    with open_parquet(path) as pf:
        table = pf.read(columns=list(RIDE_COLUMNS))
    if limit:
        table = table.slice(0, limit)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in RIDE_COLUMNS}


def ride_events(columns: dict[str, np.ndarray], first_id: int = 0) -> Iterator[dict]:
    """Ride events ``{"ride": ..., "ride_id": n}`` from ride columns (None for nulls)."""
    pu, do, dist = (columns[c].tolist() for c in ("PULocationID", "DOLocationID",
                                                    "trip_distance"))
    for i, (p, d, km) in enumerate(zip(pu, do, dist, strict=True)):
        yield {"ride": {"PULocationID": p, "DOLocationID": d, "trip_distance": km},
               "ride_id": first_id + i}


def to_records(events: Sequence[dict], poison_every: int = 0,
               stamp: float | None = None) -> list[OutRecord]:
    """Stream records for ``events``; every ``poison_every``-th one replaced by a poison record."""
    out = []
    for e in events:
        rid = e["ride_id"]
        if poison_every and rid % poison_every == poison_every - 1:
            out.append(OutRecord(str(rid), POISON[(rid // poison_every) % len(POISON)]))
            continue
        if stamp is not None:
            e = {**e, "produced_at": stamp}
        out.append(OutRecord(str(rid), encode(e)))
    return out


def produce(sink: KinesisSink, events: Sequence[dict], rate: float = 0,
            chunk: int = MAX_RECORDS, poison_every: int = 0) -> int:
    """Send ``events`` at ``rate`` records/s (0 = as fast as possible); returns records sent."""
    if rate:
        chunk = max(1, min(chunk, int(rate / 10) or 1))  # ~10 calls/s keeps pacing smooth
    start, sent = time.monotonic(), 0
    for lo in range(0, len(events), chunk):
        if rate:  # pace against the schedule, not the previous call, so delays do not add up
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        batch = to_records(events[lo:lo + chunk], poison_every, stamp=time.time())
        failed = sink.put(batch)
        if failed:
            raise RecordsNotWritten(f"{len(failed)} records could not be written to "
                                    f"{sink.stream_name} after {sent} were (the warnings above "
                                    f"say why)")
        sent += len(batch)
    return sent


def read_stream(client, stream: str, limit: int = 10_000) -> list[dict]:
    """Every record currently in ``stream`` (all shards, from TRIM_HORIZON), with its shard."""
    out = []
    for shard in client.list_shards(StreamName=stream)["Shards"]:
        it = client.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                       ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            resp = client.get_records(ShardIterator=it, Limit=limit)
            out += [{**r, "ShardId": shard["ShardId"]} for r in resp["Records"]]
            if resp.get("MillisBehindLatest", 0) == 0 and len(resp["Records"]) < limit:
                break  # at the tip of the shard
            it = resp.get("NextShardIterator")
    return out


def payloads(records: Sequence[dict]) -> list[dict]:
    """JSON payloads of records read back with :func:`read_stream`."""
    return [json.loads(r["Data"]) for r in records]


@click.command(cls=Command)
@click.option("--rides", required=True, help="TLC parquet month: local path, s3:// or https://.")
@click.option("--stream", required=True, help="Kinesis stream to write ride events to.")
@click.option("--endpoint-url", default=None, envvar="KINESIS_ENDPOINT_URL", help=ENDPOINT_HELP)
@click.option("--rate", default=1000.0, show_default=True,
              help="Records per second (0 = as fast as possible).")
@click.option("--limit", default=None, type=int, help="Send only the first N rides.")
@click.option("--poison-every", default=0, show_default=True,
              help="Replace every N-th record by a poison record (0 = none).")
@click.option("--create-shards", default=0, show_default=True,
              help="Create the stream with this many shards if missing (0 = must exist).")
def cli(rides, stream, endpoint_url, rate, limit, poison_every, create_shards) -> None:
    """Replay a parquet month of rides onto a Kinesis stream at a given rate."""
    import boto3

    setup_logging("INFO")
    from serve.config import get_settings

    # Same endpoint resolution as the runner and the sinks: option, environment, then .env.
    client = boto3.client("kinesis",
                          endpoint_url=endpoint_url or get_settings().kinesis_endpoint_url)
    if create_shards:
        try:
            ensure_stream(client, stream, create_shards)
        except (ClientError, BotoCoreError, WaiterError) as e:
            raise click.ClickException(f"could not create stream {stream!r} at "
                                       f"{endpoint_of(client)}: {e}") from e
    try:
        require_stream(client, stream, "stream (--stream)")
    except StreamUnavailable as e:
        raise click.ClickException(f"{e}; or pass --create-shards N to create it") from e
    events = list(ride_events(read_ride_columns(rides, limit)))
    t0 = time.monotonic()
    try:
        n = produce(KinesisSink(client, stream), events, rate, poison_every=poison_every)
    except RecordsNotWritten as e:
        raise click.ClickException(str(e)) from e
    secs = time.monotonic() - t0
    log.info("sent %d ride events to %s in %.1f s (%.0f records/s)", n, stream, secs,
             n / max(secs, 1e-9))


if __name__ == "__main__":
    cli()
