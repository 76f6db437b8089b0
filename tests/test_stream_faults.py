"""The streaming mode under hostile input and faults, against moto_server (issue 14, items 1-4
and 6; issue 12 item 9): re-created streams, unencodable and oversized records, an endpoint
that goes away, malformed Lambda events, throttling, missing streams.

Faults are real: moto_server is restarted on its port, a TCP proxy in front of it goes away
and comes back, a quota in front of the client refuses reads as Kinesis does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from botocore.exceptions import ClientError

from ops.moto import start_moto
from ops.procs import free_port, start, stop, wait_for
from serve.stream.produce import ensure_stream, payloads, produce, read_stream, ride_events
from serve.stream.sinks import KinesisSink

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


# -- fixtures and helpers -----------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    """A tiny real model saved as an MLflow model folder (duration = 5 + 4 * distance)."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def loaded(model_dir):
    from serve.stream.app import StreamSettings, load_stream_model

    return load_stream_model(StreamSettings(model_location=str(model_dir), model_version="1"))


def settings(endpoint: str, out: str, dead: str | None = None, **kw):
    from serve.stream.app import StreamSettings

    return StreamSettings(predictions_stream_name=out, dead_letter_destination=dead,
                          kinesis_endpoint_url=endpoint, **kw)


def streams(kinesis, *prefixes: str, shards: int = 1) -> list[str]:
    names = [f"{p}-{secrets.token_hex(4)}" for p in prefixes]
    for n in names:
        ensure_stream(kinesis, n, shards)
    return names


def rides(n: int, first_id: int = 0) -> list[dict]:
    """``n`` valid ride events with ids ``first_id``.."""
    rng = np.random.default_rng(first_id)
    cols = {"PULocationID": rng.integers(1, 266, n), "DOLocationID": rng.integers(1, 266, n),
            "trip_distance": rng.uniform(0, 20, n).round(2)}
    return list(ride_events(cols, first_id))


def put_raw(kinesis, stream: str, items: list[tuple[str, bytes]]) -> None:
    """Records as a producer could send them, in order (one PutRecords call per 500)."""
    for lo in range(0, len(items), 500):
        resp = kinesis.put_records(StreamName=stream, Records=[
            {"PartitionKey": k, "Data": d} for k, d in items[lo:lo + 500]])
        assert resp["FailedRecordCount"] == 0


def ride_bytes(event: dict) -> bytes:
    return json.dumps(event).encode()


def predicted(kinesis, stream: str) -> Counter:
    return Counter(e["prediction"]["ride_id"] for e in payloads(read_stream(kinesis, stream)))


def runner_for(kinesis, loaded, stream: str, out: str, dead: str | None, tmp_path, **kw):
    from serve.stream.app import build_handler
    from serve.stream.checkpoints import consumer_checkpoints
    from serve.stream.runner import Runner

    s = settings(kinesis.meta.endpoint_url, out, dead)
    return Runner(kinesis, build_handler(s, loaded), stream,
                  consumer_checkpoints(tmp_path / "cp", "test", stream), **kw)


# -- item 2: a record that passes validation but cannot be encoded ------------------------
def test_unencodable_ride_ids_are_dead_letters_not_a_stuck_shard(kinesis, loaded, tmp_path):
    src, out, dead = streams(kinesis, "in", "out", "dead")
    good = rides(60)
    bad = {  # valid JSON, each id a string that cannot be a key: lone surrogate, control, blank
        "lone": b'{"ride_id": "\\ud800", "ride": {"PULocationID": 1, "DOLocationID": 2, '
                b'"trip_distance": 1.0}}',
        "nul": b'{"ride_id": "a\\u0000b", "ride": {"PULocationID": 1, "DOLocationID": 2, '
               b'"trip_distance": 1.0}}',
        "blank": b'{"ride_id": " \\t", "ride": {"PULocationID": 1, "DOLocationID": 2, '
                 b'"trip_distance": 1.0}}',
    }
    items = [(str(e["ride_id"]), ride_bytes(e)) for e in good]
    items[20:20] = [(k, v) for k, v in bad.items()]
    put_raw(kinesis, src, items)

    stats = runner_for(kinesis, loaded, src, out, dead, tmp_path, batch_size=50,
                       idle_exit=0.5, retry_delay=0.01).run()
    ids = predicted(kinesis, out)
    assert set(ids) == {e["ride_id"] for e in good} and max(ids.values()) == 1
    assert stats.failures == 0, "a batch failed: the shard was blocked by the bad ids"
    reasons = {d["partitionKey"]: d["reason"] for d in payloads(read_stream(kinesis, dead))}
    assert "U+D800" in reasons["lone"] and "U+0000" in reasons["nul"]
    assert "whitespace" in reasons["blank"]


# -- item 3: oversized dead letters; non-retryable errors --------------------------------
def test_oversized_poison_fits_as_a_dead_letter_without_duplicates(kinesis, loaded, tmp_path):
    src, out, dead = streams(kinesis, "in", "out", "dead")
    good = rides(300)
    big = b'{"ride_id": 5000, "ride": "' + b"x" * 900_000 + b'"}'  # ~900 KB, not a ride
    items = [(str(e["ride_id"]), ride_bytes(e)) for e in good]
    # the big one among other poison in the same batch (their dead letters share one call)
    items[120:120] = [("p1", b"not json"), ("big", big), ("p2", b"[1]")]
    put_raw(kinesis, src, items)

    stats = runner_for(kinesis, loaded, src, out, dead, tmp_path, batch_size=100,
                       idle_exit=0.5, retry_delay=0.01).run()
    ids = predicted(kinesis, out)
    assert set(ids) == {e["ride_id"] for e in good}
    dups = sum(n - 1 for n in ids.values())
    assert dups == 0, f"{dups} duplicated predictions"
    assert stats.failures == 0 and stats.records == len(items)
    from serve.stream.codec import MAX_DEAD_LETTER_BYTES

    raw = read_stream(kinesis, dead)
    letters = {d["partitionKey"]: d for d in payloads(raw)}
    assert set(letters) == {"p1", "big", "p2"}
    assert max(len(r["Data"]) for r in raw) <= MAX_DEAD_LETTER_BYTES
    cut, original = letters["big"], base64.b64encode(big).decode()
    assert cut["dataTruncated"] is True and cut["dataLength"] == len(original)
    assert cut["dataSha256"] == hashlib.sha256(original.encode()).hexdigest()
    assert original.startswith(cut["data"]) and len(cut["data"]) > 1000
    assert "data" in letters["p1"] and "dataTruncated" not in letters["p1"]


class CountingClient:
    """A real client that counts the calls made through it."""

    def __init__(self, client):
        self.client, self.calls = client, Counter()

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*a, **kw):
            self.calls[name] += 1
            return attr(*a, **kw)
        return call


def test_sink_never_retries_what_kinesis_refuses_every_time(kinesis):
    from serve.stream.codec import OutRecord

    [name] = streams(kinesis, "sink")
    client = CountingClient(kinesis)
    sink = KinesisSink(client, name, sleep=lambda s: None)
    batch = [OutRecord("a", b"1"), OutRecord("b", b"x" * (1024 * 1024 + 1)), OutRecord("c", b"3")]
    assert sink.put(batch) == [1]
    assert client.calls["put_records"] == 1  # not 5, and not with the oversized record
    assert sorted(r["PartitionKey"] for r in read_stream(kinesis, name)) == ["a", "c"]
    # a whole call refused for good (the stream does not exist): one call, not five
    client.calls.clear()
    assert KinesisSink(client, "no-such-stream", sleep=lambda s: None).put(batch[:1]) == [0]
    assert client.calls["put_records"] == 1


# -- item 6: the Lambda handler on malformed events ---------------------------------------
GOOD = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.0}


def good_record(seq: str, ride_id: int) -> dict:
    data = base64.b64encode(json.dumps({"ride": GOOD, "ride_id": ride_id}).encode()).decode()
    return {"kinesis": {"partitionKey": str(ride_id), "sequenceNumber": seq, "data": data},
            "eventSource": "aws:kinesis", "eventID": f"shardId-000000000000:{seq}"}


VALID_DATA = good_record("1", 1)["kinesis"]["data"]
MALFORMED = {  # case -> (the bad record, or a whole event; what its dead letter's reason says)
    "no kinesis key": ({"eventID": "x"}, "no kinesis.sequenceNumber"),
    "kinesis null": ({"kinesis": None}, "no kinesis.sequenceNumber"),
    "no sequenceNumber": ({"kinesis": {"data": VALID_DATA}}, "no kinesis.sequenceNumber"),
    "sequenceNumber not a number": ({"kinesis": {"data": VALID_DATA, "sequenceNumber": "x1"}},
                                    "no kinesis.sequenceNumber"),
    "record a string": ("garbage", "no kinesis.sequenceNumber"),
    "record None": (None, "no kinesis.sequenceNumber"),
    "no data": ({"kinesis": {"sequenceNumber": "99"}}, "no kinesis.data"),
}


@pytest.fixture(scope="module")
def lambda_env(aws, kinesis, model_dir):
    import serve.lambda_function as lf

    out, dead = streams(kinesis, "lambda-out", "lambda-dead")
    env = {"MODEL_LOCATION": str(model_dir), "MODEL_VERSION": "1",
           "PREDICTIONS_STREAM_NAME": out, "DEAD_LETTER_DESTINATION": dead,
           "KINESIS_ENDPOINT_URL": aws.endpoint}
    lf._handler.cache_clear()
    with pytest.MonkeyPatch.context() as mp:  # read once, at the first invocation (cached)
        for k, v in env.items():
            mp.setenv(k, v)
        lf._handler()
    yield lf, out, dead
    lf._handler.cache_clear()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_lambda_handler_never_raises_for_a_malformed_record(lambda_env, kinesis, case):
    lf, out, dead = lambda_env
    bad, reason = MALFORMED[case]
    rid = 1000 + list(MALFORMED).index(case)
    resp = lf.lambda_handler({"Records": [good_record("5", rid), bad, good_record("7", rid + 50)]})
    assert resp == {"batchItemFailures": []}
    assert {rid, rid + 50} <= set(predicted(kinesis, out))
    letters = [d for d in payloads(read_stream(kinesis, dead)) if reason in d["reason"]]
    assert any(holds(d, bad) for d in letters), (case, letters[-3:])


def holds(letter: dict, record) -> bool:
    """Whether ``letter`` is the dead letter of ``record`` (its data, or the record whole)."""
    k = record.get("kinesis") if isinstance(record, dict) else None
    if isinstance(k, dict):
        seq = k.get("sequenceNumber")
        return letter["data"] == k.get("data") and letter["sequenceNumber"] == (
            seq if isinstance(seq, str) and seq.isdigit() else None)
    return "record" in letter and json.loads(letter["record"]) == record


@pytest.mark.parametrize("event, reason", [
    ([good_record("5", 1)], "event is not a JSON object but list"),
    ({"Records": {"kinesis": {}}}, "event Records is not a list but dict"),
    ("hello", "event is not a JSON object but str"),
])
def test_lambda_handler_dead_letters_an_event_that_is_not_one(lambda_env, kinesis, event,
                                                              reason):
    lf, _, dead = lambda_env
    assert lf.lambda_handler(event) == {"batchItemFailures": []}
    letters = [d for d in payloads(read_stream(kinesis, dead)) if d["reason"] == reason]
    assert letters and json.loads(letters[-1]["record"]) == event


# -- item 4: the endpoint goes away and comes back ----------------------------------------
class TcpProxy:
    """A TCP proxy to ``target_port`` that can go away (connection refused, open connections
    cut) and come back on the same port: an endpoint blip as a client sees it."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self.conns: list[socket.socket] = []
        self.server: socket.socket | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def down(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def in_thread(runner) -> tuple[threading.Thread, list]:
    out: list = []

    def run():
        try:
            out.append(runner.run())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_runner_rides_out_an_endpoint_blip(aws, kinesis, loaded, tmp_path, caplog):
    from serve.stream.app import build_handler, kinesis_client
    from serve.stream.checkpoints import consumer_checkpoints
    from serve.stream.runner import Runner

    caplog.set_level("INFO")
    src, out = streams(kinesis, "in", "out")
    proxy = TcpProxy(int(aws.endpoint.rsplit(":", 1)[1]))
    proxy.up()
    s = settings(proxy.endpoint, out)  # the runner reads and writes through the proxy
    runner = Runner(kinesis_client(s), build_handler(s, loaded), src,
                    consumer_checkpoints(tmp_path, "blip", src), batch_size=50)
    first, second = rides(100), rides(100, first_id=100)
    produce(KinesisSink(kinesis, src), first)
    thread, result = in_thread(runner)
    try:
        wait_for(lambda: len(predicted(kinesis, out)) == 100, "first rides", timeout=60)
        proxy.down()  # the endpoint goes away...
        wait_for(lambda: not thread.is_alive() or "Kinesis unavailable" in caplog.text,
                 "the runner noticing", timeout=60)
        assert thread.is_alive(), f"the runner died when the endpoint went away: {result!r}"
        produce(KinesisSink(kinesis, src), second)  # (moto itself is still up)
        proxy.up()  # ...and comes back
        wait_for(lambda: not thread.is_alive() or len(predicted(kinesis, out)) == 200,
                 "every ride predicted", timeout=90)
        assert thread.is_alive(), f"the runner died: {result!r}"
    finally:
        runner.stop.set()
        thread.join(30)
        proxy.down()
    assert not isinstance(result[0], BaseException), result
    ids = predicted(kinesis, out)
    assert set(ids) == set(range(200)) and max(ids.values()) == 1
    assert "Kinesis is back after" in caplog.text


def test_runner_gives_up_after_the_outage_bound(aws, kinesis, loaded, tmp_path, caplog):
    from serve.stream.app import build_handler, kinesis_client
    from serve.stream.checkpoints import consumer_checkpoints
    from serve.stream.pacing import EndpointUnavailable
    from serve.stream.runner import Runner

    caplog.set_level("INFO")
    src, out = streams(kinesis, "in", "out")
    proxy = TcpProxy(int(aws.endpoint.rsplit(":", 1)[1]))
    proxy.up()
    s = settings(proxy.endpoint, out)
    runner = Runner(kinesis_client(s), build_handler(s, loaded), src,
                    consumer_checkpoints(tmp_path, "bound", src), max_outage=1.0)
    thread, result = in_thread(runner)
    wait_for(lambda: f"reading {src}" in caplog.text, "the runner reading", timeout=30)
    proxy.down()
    t0 = time.monotonic()
    thread.join(30)
    assert not thread.is_alive() and isinstance(result[0], EndpointUnavailable), result
    assert "--max-outage" in str(result[0]) and proxy.endpoint in str(result[0])
    assert time.monotonic() - t0 < 15  # the bound and one backoff, not botocore's minutes


# -- issue 12 item 9: pacing for real Kinesis's 5 reads/s per shard -----------------------
class Quota(CountingClient):
    """Kinesis's read limit in front of a real client: 5 GetRecords per second per shard, shared
    by every consumer using this object; over it, ProvisionedThroughputExceededException."""

    def __init__(self, client, per_second: int = 5):
        super().__init__(client)
        self.per_second, self.times, self.lock = per_second, [], threading.Lock()
        self.refused = 0

    def get_records(self, **kw):
        with self.lock:
            now = time.monotonic()
            self.times = [t for t in self.times if now - t < 1.0]
            if len(self.times) >= self.per_second:
                self.refused += 1
                raise ClientError({"Error": {"Code": "ProvisionedThroughputExceededException",
                                             "Message": "Rate exceeded for shard"}},
                                  "GetRecords")
            self.times.append(now)
        self.calls["get_records"] += 1
        return self.client.get_records(**kw)


def test_idle_shard_is_read_at_most_about_once_a_second(kinesis, loaded, tmp_path):
    src, out = streams(kinesis, "idle", "out")
    client = CountingClient(kinesis)
    runner = runner_for(kinesis, loaded, src, out, None, tmp_path, idle_exit=3.0)
    runner.client = client
    t0 = time.monotonic()
    runner.run()
    secs, reads = time.monotonic() - t0, client.calls["get_records"]
    # 0.2 s, then doubling up to 1 s: reads at 0, .2, .6, 1.4, 2.4, 3.4 -> 6; a fixed 0.2 s
    # poll makes 15 and uses the whole 5 reads/s that every consumer of the shard shares
    assert reads <= 7, f"{reads} GetRecords in {secs:.1f} s on an idle shard"


def test_two_consumers_share_a_throttled_shard_and_both_finish(kinesis, loaded, tmp_path):
    src, out_a, out_b = streams(kinesis, "shared", "out-a", "out-b")
    produce(KinesisSink(kinesis, src), rides(600))
    quota = Quota(kinesis)
    runners = [runner_for(kinesis, loaded, src, o, None, tmp_path / o, batch_size=100,
                          idle_exit=1.5, poll_interval=0.05) for o in (out_a, out_b)]
    for r in runners:
        r.client = quota
    threads = [in_thread(r) for r in runners]
    for t, _ in threads:
        t.join(120)
    results = [res[0] for _, res in threads]
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert quota.refused > 0, "the quota never bit: the test shows nothing"
    for o in (out_a, out_b):
        assert set(predicted(kinesis, o)) == set(range(600))
    assert sum(r.throttled for r in results) == quota.refused


# -- item 1: a stream deleted and created again under its name -----------------------------
def test_recreated_stream_detected_while_running(kinesis, loaded, tmp_path):
    from serve.stream.runner import StreamRecreated

    src, out = streams(kinesis, "again", "out")
    produce(KinesisSink(kinesis, src), rides(50))
    runner = runner_for(kinesis, loaded, src, out, None, tmp_path, verify_every=0.5)
    thread, result = in_thread(runner)
    wait_for(lambda: len(predicted(kinesis, out)) == 50, "first rides", timeout=60)
    kinesis.delete_stream(StreamName=src)
    ensure_stream(kinesis, src, 1)
    produce(KinesisSink(kinesis, src), rides(80, first_id=1000))
    thread.join(60)
    runner.stop.set()
    assert isinstance(result[0], StreamRecreated), result
    assert "--on-recreated-stream trim-horizon" in str(result[0])
    # whatever was checkpointed meanwhile is still marked as the old stream's: the next start
    # refuses it too, instead of resuming the new stream from the old stream's positions
    with pytest.raises(StreamRecreated, match="belong to the stream created"):
        runner_for(kinesis, loaded, src, out, None, tmp_path).prepare()


def run_cli(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_restarted_endpoint_never_ends_with_rides_missing(aws, model_dir, loaded, tmp_path):
    """moto_server restarted, streams re-created under the same names: the runner stops with
    the message, or (asked to) reads the new stream from its start; never exit 0 with rides
    missing."""
    from serve.stream.checkpoints import consumer_checkpoints

    port = free_port()
    moto = start_moto(tmp_path / "moto1.log", port=port)
    env = {**os.environ, **moto.env}
    cp = tmp_path / "cp"
    base = ["serve.stream", "--input-stream", "rides", "--output-stream", "preds",
            "--endpoint-url", moto.endpoint, "--consumer", "restart",
            "--model-location", str(model_dir), "--model-version", "1",
            "--checkpoint-dir", str(cp), "--batch-size", "100"]

    def recreate_and_fill(n: int, first_id: int):
        k = moto.client("kinesis")
        for s in ("rides", "preds"):
            ensure_stream(k, s, 2)
        produce(KinesisSink(k, "rides"), rides(n, first_id))
        return k

    try:
        k = recreate_and_fill(300, 0)
        # run 1 in this process (the same runner and checkpoints as the command's)
        runner = runner_for(k, loaded, "rides", "preds", None, tmp_path, idle_exit=0.5)
        runner.checkpoints = consumer_checkpoints(cp, "restart", "rides")
        runner.run()
        assert set(predicted(k, "preds")) == set(range(300))

        moto.stop()
        moto = start_moto(tmp_path / "moto2.log", port=port)  # empty: same names, new streams
        k = recreate_and_fill(600, 10_000)
        run2 = run_cli([*base, "--idle-exit", "1"], env)
        missing = set(range(10_000, 10_600)) - set(predicted(k, "preds"))
        assert run2.returncode != 0, (f"exit 0 with {len(missing)} of 600 valid rides never "
                                      f"predicted")
        assert "stream 'rides' was re-created" in run2.stderr, run2.stderr[-2000:]
        assert "Traceback" not in run2.stderr

        # Asked to, a long-running runner reads it from its start; then the endpoint restarts
        # under it and the streams are re-created again: it waits out the outage, notices,
        # and reads the newest stream from its start too.
        log = tmp_path / "run3.log"
        proc = start([sys.executable, "-m", *base, "--on-recreated-stream", "trim-horizon"],
                     log, env=env, cwd=ROOT)
        try:
            wait_for(lambda: set(predicted(k, "preds")) >= set(range(10_000, 10_600)),
                     "the re-created stream read from its start", timeout=90, proc=proc)
            moto.stop()
            wait_for(lambda: "Kinesis unavailable" in log.read_text(), "outage noticed",
                     timeout=60, proc=proc)
            moto = start_moto(tmp_path / "moto3.log", port=port)
            k = recreate_and_fill(400, 20_000)
            wait_for(lambda: set(predicted(k, "preds")) >= set(range(20_000, 20_400)),
                     "the newest stream read from its start", timeout=120, proc=proc)
        finally:
            stop(proc.pid)
        text = log.read_text()
        assert "was re-created" in text and "reading it from TRIM_HORIZON" in text, text[-3000:]
        assert "Traceback" not in text
    finally:
        moto.stop()


# -- issue 15 item 3: a missing stream is one line, not a traceback -----------------------
@pytest.mark.parametrize("which", ["input", "output", "producer"])
def test_missing_stream_is_one_line_naming_it(aws, kinesis, model_dir, months, which):
    [real] = streams(kinesis, "exists")
    runner = ["serve.stream", "--endpoint-url", aws.endpoint, "--model-location",
              str(model_dir), "--idle-exit", "0.1", "--consumer", "c"]
    args = {"input": [*runner, "--input-stream", "nope-in", "--output-stream", real],
            "output": [*runner, "--input-stream", real, "--output-stream", "nope-out"],
            "producer": ["serve.stream.produce", "--endpoint-url", aws.endpoint,
                         "--rides", str(months.test), "--stream", "nope-in", "--limit", "10"]}
    res = run_cli(args[which], {**os.environ, **aws.env}, timeout=60)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1, res.stderr[-2000:]
    name = "nope-out" if which == "output" else "nope-in"
    assert lines[0].startswith("Error: no Kinesis ") and f"named {name!r}" in lines[0]
    assert "create" in lines[0] and aws.endpoint in lines[0]


# -- issue 12 item 9: the runner's defaults -------------------------------------------------
def test_runner_cli_needs_no_consumer_and_keeps_checkpoints_under_stack_home(
        aws, kinesis, model_dir, tmp_path, monkeypatch):
    import signal

    from click.testing import CliRunner

    from serve.stream.cli import cli

    src, out = streams(kinesis, "defaults", "out")
    produce(KinesisSink(kinesis, src), rides(5))
    monkeypatch.setenv("STACK_HOME", str(tmp_path / "home"))
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:  # no --consumer, no --checkpoint-dir
        res = CliRunner().invoke(cli, ["--input-stream", src, "--output-stream", out,
                                       "--endpoint-url", aws.endpoint, "--model-location",
                                       str(model_dir), "--idle-exit", "0.3"])
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert res.exit_code == 0, res.output
    assert set(predicted(kinesis, out)) == set(range(5))
    checkpoint = tmp_path / "home" / "stream-checkpoints" / out / src / "shardId-000000000000.json"
    assert json.loads(checkpoint.read_text())["stream"]["arn"].endswith(f"/{src}")
