"""Unit tests of the stream's record rules (no servers): ride_id is a key, dead letters always
fit, malformed events never raise, logs say what happened, CLI texts match the code."""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path

import pytest

from serve.stream.codec import (
    MAX_DEAD_LETTER_BYTES,
    PoisonRecord,
    dead_letter,
    dead_letter_record,
    decode_data,
    encode,
    key_problem,
)
from serve.stream.core import CollectingSink, DeadLetterNotWritten, StreamService
from serve.stream.sinks import KinesisSink
from tests.test_stream import FailingSink

ROOT = Path(__file__).resolve().parents[1]
RIDE_A = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}
RIDE_B = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def data(ride_id, ride=RIDE_A) -> str:
    return base64.b64encode(json.dumps({"ride_id": ride_id, "ride": ride}).encode()).decode()


def record(seq: str, ride_id, ride=RIDE_A) -> dict:
    return {"kinesis": {"sequenceNumber": seq, "partitionKey": str(seq),
                        "data": data(ride_id, ride)}}


# -- item 13: ride_id is a key ------------------------------------------------------------
@pytest.mark.parametrize("rid, why", [
    ("", "is empty or only whitespace"),
    (" \t", "is empty or only whitespace"),
    (" 7", "starts or ends with whitespace"),
    ("7\n", "starts or ends with whitespace"),
    ("a\x00b", "holds the unprintable character U+0000"),
    ("a\x1bb", "holds the unprintable character U+001B"),
    ("a\u200bb", "holds the unprintable character U+200B"),  # zero-width space: looks like "ab"
    ("\ud800", "holds the unprintable character U+D800"),  # a lone surrogate cannot be encoded
    ("x" * 257, "is 257 characters, over the 256"),
    (10 ** 300, "is 301 characters, over the 256"),
])
def test_a_ride_id_that_cannot_be_a_key_is_poison(rid, why):
    with pytest.raises(PoisonRecord) as e:
        decode_data(data(rid))
    assert e.value.message.startswith(f"ride_id {why}"), e.value.message


@pytest.mark.parametrize("rid", [0, -5, 256, "r-257", "élan", "7", "a b", "x" * 256])
def test_a_ride_id_that_is_a_key_passes(rid):
    assert decode_data(data(rid))[0] == rid
    assert key_problem(str(rid)) is None


def test_one_ride_id_names_one_ride_in_a_batch(model):
    sink, dead = CollectingSink(), CollectingSink()
    event = {"Records": [record("1", 7), record("2", 7, RIDE_B), record("3", "7", RIDE_B),
                         record("4", 7), record("5", 8, RIDE_B)]}
    result = StreamService(model, "1", sink, dead).handle(event)
    # the same ride again is predicted again (an at-least-once repeat, deduped downstream);
    # another ride under a used id is a dead letter naming the record that used it first
    assert [e["prediction"]["ride_id"] for e in sink.payloads()] == [7, 7, 8]
    letters = {d["sequenceNumber"]: d["reason"] for d in dead.payloads()}
    assert set(letters) == {"2", "3"} and result.failures == []
    assert letters["2"] == ("ride_id 7 already names another ride in this batch (record 1); "
                            "a ride_id must identify one ride")
    assert letters["3"].startswith("ride_id '7' already names another ride")


# -- the class of item 2: whatever passed validation but cannot be written ------------------
def test_an_event_that_cannot_be_written_is_a_dead_letter(model, monkeypatch):
    import serve.stream.core as core

    real = core.event_record

    def event_record(event):
        if event["prediction"]["ride_id"] == 2:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return real(event)

    monkeypatch.setattr(core, "event_record", event_record)
    sink, dead = CollectingSink(), CollectingSink()
    result = StreamService(model, "1", sink, dead).handle(
        {"Records": [record("1", 1), record("2", 2), record("3", 3)]})
    assert [e["prediction"]["ride_id"] for e in sink.payloads()] == [1, 3]
    [letter] = dead.payloads()
    assert letter["sequenceNumber"] == "2" and result.failures == []
    assert letter["reason"].startswith("prediction event cannot be written: UnicodeEncodeError")


# -- dead letters always fit --------------------------------------------------------------
def fits(letter: dict) -> bool:
    rec = dead_letter_record(letter)
    return len(rec.data) <= MAX_DEAD_LETTER_BYTES and key_problem(rec.partition_key) is None


def test_a_big_record_is_cut_to_fit_and_says_so():
    original = base64.b64encode(b"x" * 2_000_000).decode()
    letter = dead_letter({"kinesis": {"sequenceNumber": "9", "partitionKey": "k",
                                      "data": original}}, "data is not JSON")
    assert fits(letter) and len(encode(letter)) > MAX_DEAD_LETTER_BYTES - 200
    assert letter["dataTruncated"] is True and letter["dataLength"] == len(original)
    assert original.startswith(letter["data"]) and letter["sequenceNumber"] == "9"
    small = dead_letter({"kinesis": {"sequenceNumber": "9", "data": "eA=="}}, "r")
    assert small["data"] == "eA==" and "dataTruncated" not in small


def nested(depth: int) -> list:
    out: list = []
    for _ in range(depth):
        out = [out]
    return out


@pytest.mark.parametrize("rec", [
    None, 5, "text", [], [1] * 100_000, {"kinesis": 5}, {"kinesis": None},
    {"kinesis": {"sequenceNumber": 12, "data": 123, "partitionKey": ["x"]}},
    {"kinesis": {"sequenceNumber": "1", "data": "é" * 200_000, "partitionKey": "k" * 300}},
    {"kinesis": {"sequenceNumber": "1", "data": "\ud800" * 50_000}},
    {"kinesis": {"sequenceNumber": "1"}, "eventID": "e" * 100_000},
    {"deep": nested(5000)},
], ids=lambda r: type(r).__name__)
def test_a_dead_letter_fits_whatever_the_record(rec):
    letter = dead_letter(rec, "reason " * 100_000)
    assert fits(letter) and len(letter["reason"]) < 1100


def test_a_malformed_event_never_raises_and_is_kept(model):
    for event in ([record("1", 1)], "x", None, {"Records": "x"}, {"Records": [None, 5]}):
        dead = CollectingSink()
        result = StreamService(model, "1", CollectingSink(), dead).handle(event)
        assert result.failures == [] and dead.records, event
        assert all(len(r.data) <= MAX_DEAD_LETTER_BYTES for r in dead.records)
    assert StreamService(model, "1", CollectingSink(), CollectingSink()).handle(
        {"no": "records"}).response() == {"batchItemFailures": []}


def test_an_unidentified_record_whose_dead_letter_fails_fails_the_batch(model):
    # it cannot be reported in batchItemFailures: a function error re-delivers the batch
    with pytest.raises(DeadLetterNotWritten):
        StreamService(model, "1", CollectingSink(), FailingSink({0})).handle(
            {"Records": [record("1", 1), {"kinesis": {"data": "eA=="}}]})


# -- item 14: logs say what happened ------------------------------------------------------
class FakeKinesis:
    """Fails the entries with key "2" on every attempt."""

    def put_records(self, StreamName, Records):  # noqa: N803 - boto3's signature
        return {"Records": [{"ErrorCode": "InternalFailure"} if r["PartitionKey"] == "2"
                            else {"SequenceNumber": "1"} for r in Records]}


def test_the_last_attempt_does_not_say_retrying(caplog):
    from serve.stream.codec import OutRecord

    caplog.set_level(logging.WARNING)
    sink = KinesisSink(FakeKinesis(), "s", max_attempts=3, sleep=lambda s: None)
    assert sink.put([OutRecord(str(i), b"x") for i in range(4)]) == [2]
    lines = [r.getMessage() for r in caplog.records]
    assert [ln.endswith("retrying them") for ln in lines] == [True, True, False]
    assert lines[-1] == "PutRecords to s: 1 entries failed (attempt 3/3), giving up on them"


def test_a_dead_letter_that_failed_is_not_logged_as_written(model, caplog):
    caplog.set_level(logging.WARNING)
    event = {"Records": [{"kinesis": {"sequenceNumber": "5", "data": "eA=="}},
                         {"kinesis": {"sequenceNumber": "6", "data": "eQ=="}}]}
    result = StreamService(model, "1", CollectingSink(), FailingSink({0})).handle(event)
    assert result.failures == ["5"]
    text = caplog.text
    assert "dead letter of record 5 NOT written, the record will be re-delivered" in text
    assert "dead letter of record 5:" not in text and "dead letter of record 6: data" in text


# -- issue 15 item 9: what the CLIs and .env.example say ----------------------------------
def test_cli_help_names_the_real_defaults():
    from click.testing import CliRunner

    from serve.stream.cli import cli as runner_cli
    from serve.stream.produce import cli as produce_cli

    for cli in (runner_cli, produce_cli):
        text = " ".join(CliRunner().invoke(cli, ["--help"], terminal_width=200).output.split())
        assert "default: KINESIS_ENDPOINT_URL from the environment or .env, else real AWS" in text
        assert "default: real AWS." not in text
    text = " ".join(CliRunner().invoke(runner_cli, ["--help"], terminal_width=200).output.split())
    assert "default: $STACK_HOME/stream-checkpoints" in text and ".stack/" not in text
    assert "Default: the output stream's name" in text


def test_env_example_points_kinesis_at_the_readme_moto_port():
    env = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    kinesis = re.search(r"KINESIS_ENDPOINT_URL=http://127\.0\.0\.1:(\d+)", env)[1]
    moto = re.search(r"moto_server -H 127\.0\.0\.1 -p (\d+)", readme)[1]
    served = re.findall(r"mlflow models serve [^\n]*-p (\d+)", readme)
    assert kinesis == moto and served and kinesis not in served
