"""The streaming mode against the real parts: moto_server as Kinesis and S3, the tracking server.

10,000 rides over 2 shards, 1% poison, read by two consumers of the same stream
(1-to-many): one in-process run that must give exactly one prediction per valid
ride, and one CLI runner that is SIGKILLed mid-stream, restarted, and stopped
with SIGTERM.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from ops.procs import start, stop, wait_for
from serve.stream.codec import PoisonRecord, decode_data
from serve.stream.produce import (
    ensure_stream,
    payloads,
    produce,
    read_ride_columns,
    read_stream,
    ride_events,
)
from serve.stream.sinks import KinesisSink

pytestmark = pytest.mark.integration

N_RIDES, POISON_EVERY, SHARDS = 10_000, 100, 2
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ride_stream(kinesis, months):
    """A 2-shard input stream holding 10,000 ride events, every 100th one poison."""
    name = f"rides-{secrets.token_hex(4)}"
    ensure_stream(kinesis, name, SHARDS)
    events = list(ride_events(read_ride_columns(str(months.test), N_RIDES)))
    produce(KinesisSink(kinesis, name), events, rate=0, poison_every=POISON_EVERY)
    written = read_stream(kinesis, name)
    assert len(written) == N_RIDES and len({r["ShardId"] for r in written}) == SHARDS
    poison = {r["PartitionKey"] for r in written if int(r["PartitionKey"]) % POISON_EVERY
              == POISON_EVERY - 1}
    where = {int(r["PartitionKey"]): (r["ShardId"], int(r["SequenceNumber"])) for r in written}
    valid = {rid for rid in where if str(rid) not in poison}
    assert len(poison) == N_RIDES // POISON_EVERY
    return {"name": name, "events": events, "valid": valid, "poison": poison, "where": where}


def prediction_ids(kinesis, stream: str) -> tuple[Counter, list[dict]]:
    events = payloads(read_stream(kinesis, stream))
    return Counter(e["prediction"]["ride_id"] for e in events), events


def test_one_prediction_per_valid_ride_and_every_poison_dead_lettered(
        kinesis, ride_stream, registered_model, tmp_path):
    from serve.registry import load_model
    from serve.stream.app import StreamSettings, build_handler
    from serve.stream.checkpoints import consumer_checkpoints
    from serve.stream.runner import Runner

    out, dlq = f"preds-{secrets.token_hex(4)}", f"dead-{secrets.token_hex(4)}"
    ensure_stream(kinesis, out, SHARDS)
    ensure_stream(kinesis, dlq, 1)
    settings = StreamSettings(model_uri="models:/duration@production",
                              predictions_stream_name=out, dead_letter_destination=dlq,
                              kinesis_endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    runner = Runner(kinesis, build_handler(settings), ride_stream["name"],
                    consumer_checkpoints(tmp_path, "production", ride_stream["name"]),
                    batch_size=100, idle_exit=0.5)
    stats = runner.run()
    assert stats.records == N_RIDES and stats.failures == 0

    ids, events = prediction_ids(kinesis, out)
    assert set(ids) == ride_stream["valid"]
    assert max(ids.values()) == 1 and len(events) == len(ride_stream["valid"])
    assert {e["version"] for e in events} == {registered_model["version"]}
    # The streamed predictions are the registered model's own, ride by ride.
    model = load_model("models:/duration@production").python_model
    by_id = {e["ride_id"]: e["ride"] for e in ride_stream["events"]}
    sample = sorted(ride_stream["valid"])[:500]
    want = model.predict_frame(pd.DataFrame([by_id[i] for i in sample]))
    got = {e["prediction"]["ride_id"]: e["prediction"]["ride_duration"] for e in events}
    assert [got[i] for i in sample] == want.tolist()

    letters = payloads(read_stream(kinesis, dlq))
    assert sorted(d["partitionKey"] for d in letters) == sorted(ride_stream["poison"])
    assert all(d["reason"] and d["sequenceNumber"] for d in letters)


def runner_cmd(stream: str, out: str, endpoint: str, checkpoints: Path, dead: str) -> list[str]:
    return [sys.executable, "-m", "serve.stream", "--input-stream", stream,
            "--output-stream", out, "--endpoint-url", endpoint, "--consumer", "challenger",
            "--model-uri", "models:/duration@production", "--batch-size", "25",
            "--checkpoint-dir", str(checkpoints), "--dead-letter", dead]


def test_runner_killed_mid_stream_loses_nothing(aws, kinesis, ride_stream, registered_model,
                                                tracking_server, tmp_path):
    from serve.stream.checkpoints import consumer_checkpoints

    out = f"shadow-{secrets.token_hex(4)}"
    ensure_stream(kinesis, out, 1)
    s3 = aws.client("s3")
    s3.create_bucket(Bucket="dead-letters")
    dead = f"s3://dead-letters/{out}"
    env = {**os.environ, **aws.env, "MLFLOW_TRACKING_URI": tracking_server.uri}
    cmd = runner_cmd(ride_stream["name"], out, aws.endpoint, tmp_path / "cp", dead)
    cps = consumer_checkpoints(tmp_path / "cp", "challenger", ride_stream["name"])
    shards = sorted({s for s, _ in ride_stream["where"].values()})
    last = {s: max(q for sh, q in ride_stream["where"].values() if sh == s) for s in shards}

    # Run 1: SIGKILL as soon as a batch is checkpointed (no chance to clean up).
    proc = start(cmd, tmp_path / "run1.log", env=env, cwd=ROOT)
    try:
        wait_for(lambda: any(cps.path(s).exists() for s in shards), "first checkpoint",
                 timeout=90, interval=0.01, proc=proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop(proc.pid)
    at_kill = {s: int(cps.load(s) or 0) for s in shards}
    assert any(at_kill[s] < last[s] for s in shards), "runner finished before the kill"

    # Run 2: resumes from the checkpoints; stopped with SIGTERM once it has caught up.
    proc = start(cmd, tmp_path / "run2.log", env=env, cwd=ROOT)
    try:
        wait_for(lambda: all(int(cps.load(s) or 0) == last[s] for s in shards), "catch up",
                 timeout=120, interval=0.05, proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc.pid)
    assert "stopped:" in (tmp_path / "run2.log").read_text()

    ids, _ = prediction_ids(kinesis, out)
    assert ride_stream["valid"] <= set(ids), "a valid ride has no prediction"
    assert set(ids) == ride_stream["valid"]
    # Duplicates only inside the at-least-once window: the batch after the checkpoint.
    dups = {rid for rid, n in ids.items() if n > 1}
    for rid in dups:
        shard, seq = ride_stream["where"][rid]
        assert at_kill[shard] < seq <= at_kill[shard] + 25, (rid, seq)
    assert len(dups) <= 25 * SHARDS and max(ids.values()) <= 2
    print(f"killed at {at_kill} of {last}; {len(dups)} duplicated predictions")

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="dead-letters",
                                                  Prefix=out)["Contents"]]
    letters = [json.loads(line) for k in keys
               for line in s3.get_object(Bucket="dead-letters", Key=k)["Body"].read().splitlines()]
    assert {d["partitionKey"] for d in letters} == ride_stream["poison"]


def test_cli_dry_run_writes_nothing(aws, kinesis, ride_stream, registered_model,
                                    tracking_server, tmp_path):
    out = f"dry-{secrets.token_hex(4)}"
    ensure_stream(kinesis, out, 1)
    env = {**os.environ, **aws.env, "MLFLOW_TRACKING_URI": tracking_server.uri}
    res = subprocess.run(
        [*runner_cmd(ride_stream["name"], out, aws.endpoint, tmp_path, "unused-dlq"),
         "--test-run", "--idle-exit", "0.3", "--batch-size", "500"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"stopped: {N_RIDES} records" in res.stderr
    assert read_stream(kinesis, out) == []
    # a dry run never moves the consumer's checkpoints: a real run would still see every ride
    assert not list(tmp_path.rglob("*.json"))


class FlakyHandler:
    """Reports ``fail_seq`` as failed ``times`` times (then succeeds); notes what it saw."""

    def __init__(self, fail_seq: str, times: int):
        self.fail_seq, self.times = fail_seq, times
        self.seen: list[str] = []

    def __call__(self, event, context):
        seqs = [r["kinesis"]["sequenceNumber"] for r in event["Records"]]
        self.seen += seqs
        if self.fail_seq in seqs and self.times:
            self.times -= 1
            return {"batchItemFailures": [{"itemIdentifier": self.fail_seq}]}
        return {"batchItemFailures": []}


@pytest.fixture
def small_stream(kinesis):
    """A 1-shard stream of 30 records; returns (name, shard id, sequence numbers)."""
    name = f"small-{secrets.token_hex(4)}"
    ensure_stream(kinesis, name, 1)
    seqs = [kinesis.put_record(StreamName=name, PartitionKey=str(i), Data=b"x")["SequenceNumber"]
            for i in range(30)]
    shard = kinesis.list_shards(StreamName=name)["Shards"][0]["ShardId"]
    return name, shard, seqs


def test_runner_redelivers_from_the_lowest_failure(kinesis, small_stream, tmp_path):
    from serve.stream.checkpoints import Checkpoints
    from serve.stream.runner import Runner

    name, shard, seqs = small_stream
    handler = FlakyHandler(seqs[14], times=2)
    cps = Checkpoints(tmp_path)
    stats = Runner(kinesis, handler, name, cps, batch_size=10, idle_exit=0.2, retry_delay=0.01,
                   max_retries=3).run()
    # Batch 10..19 fails at 14; the re-delivery (from 14: 14..23) fails again, then passes.
    # 10..13 are never re-delivered.
    assert Counter(handler.seen) == {**dict.fromkeys(seqs, 1), **dict.fromkeys(seqs[14:24], 2),
                                     **dict.fromkeys(seqs[14:20], 3)}
    assert cps.load(shard) == seqs[-1] and stats.failures == 2 and stats.records == 30


def test_runner_stops_at_the_checkpoint_when_retries_run_out(kinesis, small_stream, tmp_path):
    from serve.stream.checkpoints import Checkpoints
    from serve.stream.runner import RetriesExhausted, Runner

    name, shard, seqs = small_stream
    cps = Checkpoints(tmp_path)
    with pytest.raises(RetriesExhausted, match=seqs[14]):
        Runner(kinesis, FlakyHandler(seqs[14], times=99), name, cps, batch_size=10,
               idle_exit=0.2, retry_delay=0.01, max_retries=2).run()
    assert cps.load(shard) == seqs[13]  # nothing at or after the failing record is skipped


def test_runner_retries_a_batch_whose_handler_raised(kinesis, small_stream, tmp_path):
    from serve.stream.checkpoints import Checkpoints
    from serve.stream.runner import Runner

    name, shard, seqs = small_stream
    calls = []

    def handler(event, context):
        calls.append(event["Records"][0]["kinesis"]["sequenceNumber"])
        if len(calls) == 2:
            raise RuntimeError("function error")
        return {"batchItemFailures": []}

    cps = Checkpoints(tmp_path)
    Runner(kinesis, handler, name, cps, batch_size=10, idle_exit=0.2, retry_delay=0.01).run()
    assert calls == [seqs[0], seqs[10], seqs[10], seqs[20]]  # the whole batch, again
    assert cps.load(shard) == seqs[-1]


def test_producer_cli_replays_a_month(aws, kinesis, months):
    from click.testing import CliRunner

    from serve.stream.produce import cli

    name = f"produced-{secrets.token_hex(4)}"
    res = CliRunner().invoke(cli, ["--rides", str(months.test), "--stream", name,
                                   "--endpoint-url", aws.endpoint, "--rate", "0",
                                   "--limit", "60", "--poison-every", "20",
                                   "--create-shards", "2"])
    assert res.exit_code == 0, res.output
    sent = read_stream(kinesis, name)
    assert sorted(int(r["PartitionKey"]) for r in sent) == list(range(60))
    poison = []
    for r in sent:
        try:
            decode_data(base64.b64encode(r["Data"]).decode())
        except PoisonRecord:
            poison.append(int(r["PartitionKey"]))
    assert sorted(poison) == [19, 39, 59]
    good = json.loads(next(r for r in sent if r["PartitionKey"] == "0")["Data"])
    assert set(good) == {"ride", "ride_id", "produced_at"} and good["ride_id"] == 0
