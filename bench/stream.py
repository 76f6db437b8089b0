"""Streaming benchmark on one machine, against one moto_server (Kinesis) started here.

1. Handler throughput on 100-record Kinesis batches: the course-style handler
   (decode one record, ``pyfunc.predict`` one ride, ``put_record`` per record)
   vs ours (decode all, one vectorized prediction, ``PutRecords``), same model,
   same endpoint. Prints both records/s and the ratio (target >= 20x).
2. End to end, sustained: the producer writes ``--rate`` records/s per shard onto a
   2-shard stream while the local runner (``python -m serve.stream``, a separate
   process) predicts and a reader tails the prediction stream. Prints the rate
   achieved and the p50/p99 latency from the producer's timestamp in the ride
   event to the moment the prediction event is read back (target p99 < 1 s).

Usage: ``python bench/stream.py [--seconds 10] [--rate 1000]``
"""

from __future__ import annotations

import base64
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py lives at the repo root

from ops.moto import start_moto  # noqa: E402
from ops.procs import spawn, stop, wait_for  # noqa: E402
from serve.stream.codec import MODEL_NAME  # noqa: E402
from serve.stream.core import CollectingSink, StreamService  # noqa: E402
from serve.stream.events import kinesis_event  # noqa: E402
from serve.stream.produce import (  # noqa: E402
    ensure_stream,
    produce,
    read_ride_columns,
    read_stream,
    ride_events,
)
from serve.stream.sinks import KinesisSink  # noqa: E402

BATCH = 100


def course_style_handler(pyfunc, client, stream: str, version: str):
    """The MLOps Zoomcamp handler: one record at a time, one put_record per prediction."""
    import pandas as pd

    def handler(event, context=None):
        predictions = []
        for record in event["Records"]:
            ride_event = json.loads(base64.b64decode(record["kinesis"]["data"]).decode("utf-8"))
            ride, ride_id = ride_event["ride"], ride_event["ride_id"]
            prediction = float(pyfunc.predict(pd.DataFrame([ride]))[0])
            prediction_event = {"model": MODEL_NAME, "version": version,
                                "prediction": {"ride_duration": prediction, "ride_id": ride_id}}
            client.put_record(StreamName=stream, Data=json.dumps(prediction_event),
                              PartitionKey=str(ride_id))
            predictions.append(prediction_event)
        return {"predictions": predictions}

    return handler


def batches(events: list[dict], n: int) -> list[dict]:
    """``n`` Kinesis events of BATCH records each, shaped as AWS delivers them."""
    out = []
    for b in range(n):
        chunk = events[b * BATCH:(b + 1) * BATCH]
        recs = [{"SequenceNumber": str(b * BATCH + i), "PartitionKey": str(e["ride_id"]),
                 "Data": json.dumps(e).encode(), "ApproximateArrivalTimestamp": None}
                for i, e in enumerate(chunk)]
        out.append(kinesis_event(recs, "shardId-000000000000",
                                 "arn:aws:kinesis:us-east-1:123456789012:stream/bench",
                                 "us-east-1"))
    return out


def interleaved_rates(handlers: dict, events: dict[str, list[dict]]) -> dict[str, float]:
    """Records/s of each handler, calls interleaved so that load changes hit all alike."""
    spent = dict.fromkeys(handlers, 0.0)
    for name, h in handlers.items():
        h(events[name][0], None)  # warm-up, not counted
    n = min(len(v) for v in events.values())
    for i in range(1, n):
        for name, h in handlers.items():
            t0 = time.perf_counter()
            h(events[name][i], None)
            spent[name] += time.perf_counter() - t0
    return {name: (n - 1) * BATCH / spent[name] for name in handlers}


class Tail(threading.Thread):
    """Reads every shard of a stream from TRIM_HORIZON, noting when each ride_id arrives."""

    def __init__(self, client, stream: str):
        super().__init__(daemon=True)
        self.client, self.stream = client, stream
        self.seen: dict[int, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        its = {s["ShardId"]: self.client.get_shard_iterator(
            StreamName=self.stream, ShardId=s["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"] for s in self.client.list_shards(StreamName=self.stream)["Shards"]}
        while not self.halt.is_set():
            got = 0
            for shard, it in its.items():
                resp = self.client.get_records(ShardIterator=it, Limit=10_000)
                now = time.time()
                for r in resp["Records"]:
                    self.seen.setdefault(json.loads(r["Data"])["prediction"]["ride_id"], now)
                its[shard] = resp["NextShardIterator"]
                got += len(resp["Records"])
            if not got:
                self.halt.wait(0.1)


@click.command()
@click.option("--seconds", default=10.0, show_default=True,
              help="Duration of the sustained end-to-end run.")
@click.option("--rate", default=1000.0, show_default=True,
              help="Records per second per shard in the sustained run (Kinesis shard limit).")
@click.option("--handler-batches", default=10, show_default=True,
              help="100-record batches timed per handler.")
@click.option("--batch-size", default=500, show_default=True,
              help="Runner --batch-size in the sustained run (Lambda BatchSize).")
def main(seconds: float, rate: float, handler_batches: int, batch_size: int) -> None:
    """Course-style vs batched handler, then a sustained end-to-end run with latency."""
    import mlflow

    from ops.synth import write_month
    from serve.tlc import read_training_frame
    from train import build_estimator, fit_model, model_files

    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    moto = start_moto(work / "moto.log")
    os.environ.update(moto.env)
    endpoint = moto.endpoint
    runner = None
    try:
        client = moto.client("kinesis")

        # One model for everybody: trained on a synthetic month, saved as an MLflow model.
        train = write_month("green", "2021-01", 60_000, work / "train.parquet", 0)
        rides = write_month("green", "2021-02", 200_000, work / "rides.parquet", 1)
        train_df = read_training_frame(str(train))
        model = fit_model(train_df, build_estimator("lr", 0, 0, 0))
        mlflow.pyfunc.save_model(work / "model", **model_files(model, work / "files",
                                                                  train_df.head(3)))
        pyfunc = mlflow.pyfunc.load_model(str(work / "model"))
        events = list(ride_events(read_ride_columns(str(rides))))

        # 1. handlers on the same 100-record batches, writing to the same endpoint.
        ensure_stream(client, "course_out", 1)
        ensure_stream(client, "ours_out", 1)
        service = StreamService(pyfunc.unwrap_python_model(), "1",
                                KinesisSink(client, "ours_out"), CollectingSink())
        n = handler_batches + 1
        rates = interleaved_rates(
            {"course": course_style_handler(pyfunc, client, "course_out", "1"),
             "ours": lambda e, c: service.handle(e).response()},
            {"course": batches(events, n), "ours": batches(events[n * BATCH:], n)})
        print(f"course-style handler (per-record decode, pyfunc predict, put_record): "
              f"{rates['course']:,.0f} records/s")
        print(f"batched handler (decode all, one predict_rides, PutRecords):          "
              f"{rates['ours']:,.0f} records/s")
        print(f"ratio: {rates['ours'] / rates['course']:.1f}x  ({handler_batches} batches of "
              f"{BATCH} each, interleaved; target >= 20x)", flush=True)

        # 2. sustained end to end: producer -> 2 shards -> runner process -> predictions.
        shards = 2
        ensure_stream(client, "rides_in", shards)
        ensure_stream(client, "predictions", shards)
        env = {**os.environ, **moto.env}
        runner = spawn([sys.executable, "-m", "serve.stream", "--input-stream", "rides_in",
                        "--output-stream", "predictions", "--endpoint-url", endpoint,
                        "--consumer", "bench", "--model-location", str(work / "model"),
                        "--model-version", "1", "--batch-size", str(batch_size),
                        "--poll-interval", "0.1", "--checkpoint-dir", str(work / "cp")],
                       work / "runner.log",
                       lambda: "reading rides_in" in (work / "runner.log").read_text(), "runner",
                       timeout=120, env=env, cwd=ROOT)
        tail = Tail(client, "predictions")
        tail.start()
        n = int(seconds * rate * shards)
        t0 = time.monotonic()
        sent = produce(KinesisSink(client, "rides_in"), events[:n], rate=rate * shards)
        produce_secs = time.monotonic() - t0
        wait_for(lambda: len(tail.seen) >= sent, "all predictions", timeout=60)
        tail.halt.set()
        produced_at = {json.loads(r["Data"])["ride_id"]: json.loads(r["Data"])["produced_at"]
                       for r in read_stream(client, "rides_in")}
        lat = np.array([tail.seen[i] - produced_at[i] for i in produced_at])
        achieved = sent / produce_secs / shards
        p50, p99, worst = np.percentile(lat, [50, 99, 100])
        print(f"sustained: {sent:,} rides over {shards} shards in {produce_secs:.1f} s = "
              f"{achieved:,.0f} records/s per shard (target {rate:,.0f}; runner batch size "
              f"{batch_size}); "
              f"predictions read back: {len(tail.seen):,}")
        print(f"event-to-prediction latency: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"max {worst * 1000:.0f} ms  (target p99 < 1000 ms)", flush=True)
    finally:
        if runner is not None:
            stop(runner.pid)
        moto.stop()


if __name__ == "__main__":
    main()
