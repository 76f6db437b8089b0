"""Unit tests of the streaming core, sinks, runner helpers and the Lambda adapter (no servers)."""

from __future__ import annotations

import base64
import json

import mlflow
import pandas as pd
import pytest
from botocore.exceptions import ClientError

from serve.stream.checkpoints import Checkpoints
from serve.stream.codec import MODEL_NAME, OutRecord, decode_data, prediction_event
from serve.stream.core import CollectingSink, StreamService
from serve.stream.events import kinesis_event, lowest_failure
from serve.stream.sinks import KinesisSink, S3Sink, chunks, parse_s3_uri

ARN = "arn:aws:kinesis:us-east-2:123456789012:stream/ride_events"


def b64(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.b64encode(raw).decode()


def aws_record(seq: str, data: str, key: str = "1") -> dict:
    """One record exactly as the Kinesis event source mapping delivers it."""
    return {
        "kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": key, "sequenceNumber": seq,
                    "data": data, "approximateArrivalTimestamp": 1545084650.987},
        "eventSource": "aws:kinesis", "eventVersion": "1.0",
        "eventID": f"shardId-000000000006:{seq}", "eventName": "aws:kinesis:record",
        "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-role",
        "awsRegion": "us-east-2", "eventSourceARN": ARN,
    }


RIDE_A = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}
RIDE_B = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8, "extra": "ignored"}
SEQ = [f"4959033827149025660855969253836157109592157598913658889{i}" for i in range(7)]

# A literal event: two good rides around four kinds of poison.
EVENT = {"Records": [
    aws_record(SEQ[0], b64({"ride": RIDE_A, "ride_id": 256}), "256"),
    aws_record(SEQ[1], "not base64!!"),
    aws_record(SEQ[2], b64(b"{not json")),
    aws_record(SEQ[3], b64({"ride_id": 12})),
    aws_record(SEQ[4], b64({"ride": {**RIDE_A, "PULocationID": "130"}, "ride_id": 13})),
    aws_record(SEQ[5], b64({"ride": RIDE_B, "ride_id": "r-257"}), "r-257"),
    aws_record(SEQ[6], b64({"ride": RIDE_A, "ride_id": True})),
]}
POISON_REASONS = {
    SEQ[1]: "data is not base64",
    SEQ[2]: "data is not JSON",
    SEQ[3]: "missing field: 'ride'",
    SEQ[4]: "ride: PULocationID must be an integer in 1..265, got '130'",
    SEQ[6]: "ride_id must be an integer or a non-empty string, got True",
}


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def expected_minutes(model, *rides) -> list[float]:
    # Through the pandas path, independent of the stream's own decoding.
    return model.predict_frame(pd.DataFrame(list(rides))).tolist()


def service(model, sink=None, dead=None) -> StreamService:
    return StreamService(model, "7", sink or CollectingSink(), dead or CollectingSink())


def test_aws_event_gives_the_exact_events_and_dead_letters(model):
    sink, dead = CollectingSink(), CollectingSink()
    result = service(model, sink, dead).handle(EVENT)

    a, b = expected_minutes(model, RIDE_A, RIDE_B)
    assert a == pytest.approx(5 + 4 * 3.66) and b == pytest.approx(5 + 4 * 1.8)
    assert sink.payloads() == [
        {"model": MODEL_NAME, "version": "7",
         "prediction": {"ride_duration": a, "ride_id": 256}},
        {"model": MODEL_NAME, "version": "7",
         "prediction": {"ride_duration": b, "ride_id": "r-257"}},
    ]
    assert [r.partition_key for r in sink.records] == ["256", "r-257"]
    assert result.response() == {"batchItemFailures": []}  # poison counts as handled
    letters = {d["sequenceNumber"]: d for d in dead.payloads()}
    assert set(letters) == set(POISON_REASONS)
    for seq, reason in POISON_REASONS.items():
        assert letters[seq]["reason"].startswith(reason), letters[seq]["reason"]
        assert letters[seq]["eventSourceARN"] == ARN
    assert letters[SEQ[1]]["data"] == "not base64!!"  # the original bytes, for replay


@pytest.mark.parametrize("data, reason", [
    # binary data: named as not UTF-8, not as a UTF-16 codec error json.loads(bytes) would give
    (b"\xff\xfe not json", "data is not UTF-8 text (byte 0xff at offset 0)"),
    (b"\xef\xbb\xbf{}", "data is not JSON we accept"),  # a BOM is not JSON
    (b"[1, 2]", "event must be a JSON object"),
    (b'{"ride": {}}', "missing field: 'ride_id'"),
    (b'{"ride_id": 1, "ride": []}', "ride: a ride must be a JSON object"),
    (b'{"ride_id": 1, "ride": {"PULocationID": 1, "DOLocationID": 2}}',
     "ride: missing field: 'trip_distance'"),
    (b'{"ride_id": 1, "ride": {"PULocationID": 1, "DOLocationID": 2, "trip_distance": -1}}',
     "ride: trip_distance must be a finite number >= 0"),
    (b'{"ride_id": 1.5, "ride": {}}', "ride_id must be an integer"),
    # inputs that used to raise past the decoder (OverflowError, ValueError, RecursionError)
    # and so failed the whole batch again and again: now poison like any other
    (b'{"ride_id": 1, "ride": {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1'
     + b"0" * 400 + b"}}", "ride: trip_distance must be a finite number >= 0"),
    (b'{"ride_id": 1, "ride": {"PULocationID": 1' + b"0" * 400
     + b', "DOLocationID": 2, "trip_distance": 1}}', "ride: PULocationID must be an integer"),
    (b'{"ride_id": ' + b"1" * 5000 + b', "ride": {}}', "data is not JSON"),
    (b"[" * 100_000, "data is not JSON"),
    (json.dumps({"ride_id": "x" * 300, "ride": {"PULocationID": 1, "DOLocationID": 2,
                                                 "trip_distance": 1}}).encode(),
     "ride_id is 300 characters, over the 256 of a partition key"),
])
def test_poison_reasons_name_the_problem(data, reason):
    from serve.stream.codec import PoisonRecord

    with pytest.raises(PoisonRecord) as e:
        decode_data(b64(data))
    assert e.value.message.startswith(reason), e.value.message


def test_prediction_event_contract():
    assert prediction_event(256, 21.3, "4") == {
        "model": "ride_duration_prediction_model", "version": "4",
        "prediction": {"ride_duration": 21.3, "ride_id": 256}}


class FailingSink(CollectingSink):
    """Fails the given indices of every put (after keeping the others)."""

    def __init__(self, fail: set[int]):
        super().__init__()
        self.fail = fail

    def put(self, records):
        super().put([r for i, r in enumerate(records) if i not in self.fail])
        return sorted(self.fail & set(range(len(records))))


def test_write_failures_are_reported_and_later_poison_left_for_the_retry(model):
    # Records: 0 good, 1 poison, 2 good (write fails), 3 poison, 4 good.
    event = {"Records": [
        aws_record("10", b64({"ride": RIDE_A, "ride_id": 1})),
        aws_record("11", b64(b"nope")),
        aws_record("12", b64({"ride": RIDE_A, "ride_id": 2})),
        aws_record("13", b64(b"nope")),
        aws_record("14", b64({"ride": RIDE_B, "ride_id": 3})),
    ]}
    dead = CollectingSink()
    result = service(model, FailingSink({1}), dead).handle(event)
    assert result.response() == {"batchItemFailures": [{"itemIdentifier": "12"}]}
    # Lambda re-delivers from 12, so poison 13 is dead-lettered on that retry, not twice.
    assert [d["sequenceNumber"] for d in dead.payloads()] == ["11"]
    assert [e["prediction"]["ride_id"] for e in result.events] == [1, 3]


def test_dead_letter_write_failure_is_a_failure(model):
    event = {"Records": [aws_record("5", b64(b"nope")),
                         aws_record("6", b64({"ride": RIDE_A, "ride_id": 1}))]}
    result = service(model, dead=FailingSink({0})).handle(event)
    assert result.failures == ["5"]


def test_prediction_failure_fails_every_valid_record(model):
    class Broken:
        def predict_rides(self, rides):
            raise RuntimeError("model exploded")

    event = {"Records": [aws_record("9", b64({"ride": RIDE_A, "ride_id": 1})),
                         aws_record("10", b64({"ride": RIDE_B, "ride_id": 2}))]}
    sink = CollectingSink()
    result = StreamService(Broken(), "1", sink, CollectingSink()).handle(event)
    assert result.failures == ["9", "10"] and sink.records == []
    assert lowest_failure(result.response()) == "9"


def test_empty_event_is_a_no_op(model):
    assert service(model).handle({"Records": []}).response() == {"batchItemFailures": []}


# -- sinks ------------------------------------------------------------------------------
class FakeKinesis:
    """Records PutRecords calls; fails entries by partition key for the first N attempts."""

    def __init__(self, fail_keys=(), fail_times=1, raise_times=0):
        self.calls: list[list[dict]] = []
        self.fail_keys, self.fail_times, self.raise_times = set(fail_keys), fail_times, raise_times
        self.seen: dict[str, int] = {}

    def put_records(self, StreamName, Records):  # noqa: N803 - boto3's signature
        self.calls.append(Records)
        if self.raise_times:
            self.raise_times -= 1
            raise ClientError({"Error": {"Code": "ProvisionedThroughputExceededException"}},
                              "PutRecords")
        out = []
        for r in Records:
            k = r["PartitionKey"]
            self.seen[k] = self.seen.get(k, 0) + 1
            if k in self.fail_keys and self.seen[k] <= self.fail_times:
                out.append({"ErrorCode": "ProvisionedThroughputExceededException",
                            "ErrorMessage": "Rate exceeded"})
            else:
                out.append({"SequenceNumber": "1", "ShardId": "shardId-000000000000"})
        return {"FailedRecordCount": sum("ErrorCode" in o for o in out), "Records": out}


def records(n: int, size: int = 10) -> list[OutRecord]:
    return [OutRecord(str(i), b"x" * size) for i in range(n)]


def test_chunks_respect_500_records_and_5_mib():
    assert [len(c) for c in chunks(records(1201))] == [500, 500, 201]
    big = records(12, size=1024 * 1024 - 2)  # ~1 MiB each: 5 fit in 5 MiB, not 6
    assert [len(c) for c in chunks(big)] == [5, 5, 2]
    assert [i for c in chunks(big) for i in c] == list(range(12))


def test_sink_retries_only_the_failed_entries():
    client = FakeKinesis(fail_keys={"3", "7"})
    sink = KinesisSink(client, "s", sleep=lambda s: None)
    assert sink.put(records(10)) == []
    assert len(client.calls) == 2
    assert [r["PartitionKey"] for r in client.calls[1]] == ["3", "7"]


def test_sink_gives_up_after_bounded_attempts():
    client = FakeKinesis(fail_keys={"2"}, fail_times=99)
    delays = []
    sink = KinesisSink(client, "s", max_attempts=4, base_delay=0.1, max_delay=0.15,
                       sleep=delays.append)
    assert sink.put(records(5)) == [2]
    assert len(client.calls) == 4 and len(delays) == 3 and max(delays) <= 0.15


def test_sink_retries_a_throttled_call():
    client = FakeKinesis(raise_times=2)
    assert KinesisSink(client, "s", sleep=lambda s: None).put(records(3)) == []
    assert len(client.calls) == 3


def test_s3_sink_is_idempotent_per_batch():
    class FakeS3:
        def __init__(self):
            self.objects = {}

        def put_object(self, Bucket, Key, Body, ContentType):  # noqa: N803
            self.objects[(Bucket, Key)] = Body

    s3 = FakeS3()
    sink = S3Sink(s3, *parse_s3_uri("s3://dlq/stream/dead"))
    batch = [OutRecord("1", b'{"a":1}'), OutRecord("2", b'{"b":2}')]
    assert sink.put(batch) == [] and sink.put(batch) == []
    [(bucket, key)] = s3.objects
    assert bucket == "dlq" and key.startswith("stream/dead/") and key.endswith(".jsonl")
    assert s3.objects[(bucket, key)] == b'{"a":1}\n{"b":2}\n'
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        parse_s3_uri("dlq-stream")


# -- runner helpers ---------------------------------------------------------------------
def test_runner_builds_events_as_aws_delivers_them():
    from datetime import datetime, timezone

    arrival = datetime(2018, 12, 17, 22, 10, 50, 987000, tzinfo=timezone.utc)
    got = kinesis_event([{"SequenceNumber": SEQ[0], "PartitionKey": "256",
                          "Data": b'{"ride_id": 256}', "ApproximateArrivalTimestamp": arrival}],
                        "shardId-000000000006", ARN, "us-east-2")
    want = aws_record(SEQ[0], b64(b'{"ride_id": 256}'), "256")
    want["invokeIdentityArn"] = got["Records"][0]["invokeIdentityArn"]
    assert got == {"Records": [want]}


def test_lowest_failure_compares_sequence_numbers_as_numbers():
    resp = {"batchItemFailures": [{"itemIdentifier": "100"}, {"itemIdentifier": "99"}]}
    assert lowest_failure(resp) == "99"
    assert lowest_failure({"batchItemFailures": []}) is None
    assert lowest_failure(None) is None  # a handler returning nothing succeeded (as in Lambda)
    for bad in ([{"itemIdentifier": ""}], [{"itemIdentifier": None}], [{}]):
        assert lowest_failure({"batchItemFailures": bad}, first="7") == "7"


def test_checkpoints_round_trip_atomically(tmp_path):
    cp = Checkpoints(tmp_path / "c")
    assert cp.load("shardId-1") is None
    cp.save("shardId-1", "41")
    cp.save("shardId-1", "42")
    assert cp.load("shardId-1") == "42"
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["shardId-1.json"]  # no temp left


# -- Lambda adapter ---------------------------------------------------------------------
def test_lambda_handler_dry_run_from_a_local_model(model, tmp_path, monkeypatch):
    import serve.lambda_function as lf
    from train import model_files

    mlflow.pyfunc.save_model(tmp_path / "model", **model_files(model, tmp_path / "files",
                                                                  [RIDE_A, RIDE_B]))
    monkeypatch.setenv("MODEL_LOCATION", str(tmp_path / "model"))
    monkeypatch.setenv("MODEL_VERSION", "3")
    monkeypatch.setenv("TEST_RUN", "true")
    lf._handler.cache_clear()
    try:
        resp = lf.lambda_handler(EVENT, None)
        again = lf.lambda_handler({"Records": EVENT["Records"][:1]}, None)
    finally:
        lf._handler.cache_clear()
    a, b = expected_minutes(model, RIDE_A, RIDE_B)
    assert resp["batchItemFailures"] == []
    assert resp["predictions"] == [
        {"model": MODEL_NAME, "version": "3", "prediction": {"ride_duration": a, "ride_id": 256}},
        {"model": MODEL_NAME, "version": "3",
         "prediction": {"ride_duration": b, "ride_id": "r-257"}}]
    assert {d["sequenceNumber"] for d in resp["deadLetters"]} == set(POISON_REASONS)
    assert [p["prediction"]["ride_id"] for p in again["predictions"]] == [256]


def test_record_without_data_is_poison_not_a_batch_failure():
    from serve.stream.codec import decode_records

    good = b64({"ride_id": 7, "ride": {"PULocationID": 1, "DOLocationID": 2,
                                       "trip_distance": 1.5}})
    batch = decode_records([{"kinesis": {"sequenceNumber": "1"}}, aws_record("2", good)])
    assert batch.poison == [(0, "record has no kinesis.data")]
    assert batch.positions == [1] and batch.ride_ids == [7]
