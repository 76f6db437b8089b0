"""Unit tests of the online service's pure parts: scoring-protocol fast path, content types,
/predict parsing, the prediction log and its sinks (real files; PostgreSQL in test_web.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from serve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from serve.features import Rides
from serve.predlog import (
    JsonlSink,
    LoggedBatch,
    ParquetSink,
    PredictionLog,
    open_sink,
    to_columns,
)
from serve.scoring import decode_json, encode_predictions, fast_rides, media_type
from serve.web.service import parse_predict

RIDE = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}


def cols(r: Rides) -> list[tuple]:
    return list(zip(r.pu.tolist(), r.do.tolist(), r.distance.tolist(), strict=True))


@pytest.mark.parametrize("payload", [
    {"dataframe_records": [RIDE]},
    {"instances": [RIDE]},
    {"inputs": [RIDE]},
    {"inputs": {k: [v] for k, v in RIDE.items()}},
    {"instances": {k: [v] for k, v in RIDE.items()}},
    {"dataframe_split": {"columns": list(RIDE), "data": [list(RIDE.values())]}},
    {"dataframe_split": {"columns": ["x", *RIDE], "data": [["a", *RIDE.values()]]}},
    {"dataframe_records": [{**RIDE, "extra": "ignored"}], "params": {"a": 1}},
])
def test_fast_path_reads_every_json_form(payload):
    assert cols(fast_rides(payload)) == [(43, 151, 1.8)]


@pytest.mark.parametrize("payload", [
    {"dataframe_records": [{**RIDE, "PULocationID": "43"}]},  # MLflow coerces strings
    {"dataframe_records": [{**RIDE, "PULocationID": True}]},  # ... and booleans
    {"dataframe_records": [{**RIDE, "PULocationID": 43.0}]},
    {"dataframe_records": [{**RIDE, "PULocationID": 0}]},  # out of range: the model words it
    {"dataframe_records": [{**RIDE, "trip_distance": -1}]},
    {"dataframe_records": [{**RIDE, "trip_distance": float("nan")}]},
    {"dataframe_records": [{**RIDE, "trip_distance": None}]},
    {"dataframe_records": [{"PULocationID": 43, "DOLocationID": 151}]},
    {"dataframe_records": []},
    {"dataframe_records": [RIDE], "instances": [RIDE]},
    {"dataframe_records": [RIDE], "unknown": 1},
    {"dataframe_records": [RIDE], "params": "not a dict"},
    {"dataframe_split": {"index": [0], "columns": list(RIDE), "data": [list(RIDE.values())]}},
    {"dataframe_split": {"columns": list(RIDE), "data": [[43, 151]]}},
    {"dataframe_records": {"a": 1}},
    [RIDE],
    "text",
])
def test_fast_path_leaves_everything_else_to_mlflow(payload):
    assert fast_rides(payload) is None


def test_predictions_are_encoded_as_mlflow_writes_them():
    import io

    from mlflow.pyfunc.scoring_server import predictions_to_json

    minutes = np.array([19.483680831672288, 1 / 3, 1e-7, 12.0])
    out = io.StringIO()
    predictions_to_json(minutes, out)
    assert encode_predictions(minutes) == out.getvalue().encode()


@pytest.mark.parametrize("header,mime", [
    ("application/json", "application/json"),
    ("application/json; charset=utf-8", "application/json"),
    ("Application/JSON;charset=UTF-8", "application/json"),
    ("text/csv", "text/csv"),
])
def test_media_type_accepts(header, mime):
    assert media_type(header) == mime


@pytest.mark.parametrize("header", [None, "", "text/plain", "application/json; charset=latin-1",
                                    "application/json; format=pandas-split"])
def test_media_type_rejects(header):
    with pytest.raises(UnsupportedMediaType):
        media_type(header)


@pytest.mark.parametrize("body", [b"{", b"\xff\xfe", b"", b"{'a': 1}"])
def test_decode_json_rejects_with_position(body):
    with pytest.raises(InvalidInput, match="not valid"):
        decode_json(body)


def test_parse_predict_one_and_many():
    rides, many = parse_predict(RIDE, 10)
    assert not many and cols(rides) == [(43, 151, 1.8)]
    rides, many = parse_predict({"rides": [RIDE, {**RIDE, "trip_distance": 0}]}, 10)
    assert many and cols(rides) == [(43, 151, 1.8), (43, 151, 0.0)]


def test_parse_predict_names_the_row_and_field():
    with pytest.raises(InvalidInput, match=r"rides\[1\]: DOLocationID") as e:
        parse_predict({"rides": [RIDE, {**RIDE, "DOLocationID": 300}]}, 10)
    assert e.value.field == "DOLocationID"
    with pytest.raises(PayloadTooLarge):
        parse_predict({"rides": [RIDE] * 11}, 10)


def batch(n: int, version: str = "7") -> LoggedBatch:
    rides = Rides(np.arange(1, n + 1), np.full(n, 2), np.linspace(0, 3, n))
    return LoggedBatch(1.7e9, "/predict", version, rides, np.arange(n, dtype=float) + 0.5)


def test_prediction_log_writes_jsonl_in_batches(tmp_path):
    path = tmp_path / "log" / "preds.jsonl"
    plog = PredictionLog(JsonlSink(path), flush_rows=4, flush_seconds=60).start()
    for _ in range(3):
        plog.put(batch(2))
    plog.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6 and plog.written == 6 and plog.dropped == 0
    assert rows[1] == {"ts": "2023-11-14T22:13:20+00:00", "endpoint": "/predict",
                       "model_version": "7", "PULocationID": 2, "DOLocationID": 2,
                       "trip_distance": 3.0, "duration": 1.5}


def test_prediction_log_writes_parquet_files_readable_as_one_dataset(tmp_path):
    plog = PredictionLog(open_sink(str(tmp_path / "preds")), flush_rows=3,
                         flush_seconds=60).start()
    plog.put(batch(3, "1"))
    plog.put(batch(2, "2"))
    plog.close()
    assert isinstance(plog.sink, ParquetSink)
    df = pd.read_parquet(tmp_path / "preds")
    assert len(df) == 5 and sorted(df["model_version"]) == ["1", "1", "1", "2", "2"]
    assert not list((tmp_path / "preds").glob(".*"))  # no half-written temp files left


def test_prediction_log_drops_and_counts_when_the_writer_falls_behind(tmp_path):
    plog = PredictionLog(JsonlSink(tmp_path / "p.jsonl"), max_queued=2)  # writer not started
    for _ in range(5):
        plog.put(batch(1))
    assert plog.dropped == 3


def test_prediction_log_survives_a_failing_sink():
    class Broken:
        def write(self, columns):
            raise OSError("disk full")

        def close(self):
            pass

    plog = PredictionLog(Broken(), flush_rows=1).start()
    plog.put(batch(2))
    plog.close()
    assert plog.failed == 2 and plog.written == 0


def test_prediction_log_counts_puts_after_close_as_dropped(tmp_path):
    path = tmp_path / "p.jsonl"
    plog = PredictionLog(JsonlSink(path), flush_rows=100, flush_seconds=60).start()
    plog.put(batch(2))
    plog.close()
    plog.put(batch(3))  # a request finishing after shutdown
    assert plog.written == 2 and plog.dropped == 1
    assert len(path.read_text().splitlines()) == 2


def test_prediction_log_does_not_close_the_sink_under_a_busy_writer():
    import threading

    entered, release, closed = threading.Event(), threading.Event(), threading.Event()

    class Slow:
        def write(self, columns):
            entered.set()
            release.wait(30)

        def close(self):
            closed.set()

    plog = PredictionLog(Slow(), flush_rows=1).start()
    plog.put(batch(1))
    assert entered.wait(10)
    plog.close(timeout=0.2)  # the writer is stuck in write()
    assert not closed.is_set()
    release.set()
    plog._thread.join(10)
    assert plog.written == 1 and not plog._thread.is_alive()


def test_parquet_sink_leaves_no_temp_file_when_a_write_fails(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    real = pq.write_table

    def write_then_fail(table, where, **kwargs):
        real(table, where, **kwargs)  # the temp file is on disk ...
        raise OSError("No space left on device")  # ... when the write fails

    sink = ParquetSink(tmp_path / "preds")
    columns = to_columns([batch(2)])
    monkeypatch.setattr(pq, "write_table", write_then_fail)
    with pytest.raises(OSError, match="No space"):
        sink.write(columns)
    assert not list((tmp_path / "preds").iterdir())
    monkeypatch.undo()
    sink.write(columns)
    assert len(pd.read_parquet(tmp_path / "preds")) == 2


def test_open_sink_rejects_unknown_schemes():
    with pytest.raises(ValueError, match="unsupported scheme"):
        open_sink("ftp://host/preds")


def test_pyarrow_is_pinned_past_cve_2023_47248_everywhere_we_install_it():
    """We parse client parquet: pyarrow 0.14.0-14.0.0 unpickles arbitrary data read from
    untrusted IPC and parquet files (CVE-2023-47248)."""
    import re
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    root = Path(__file__).resolve().parents[1]
    deps = re.findall(r'^\s*"(pyarrow[^"]*)"', (root / "pyproject.toml").read_text(), re.M)
    conda = re.findall(r"^\s*- (pyarrow\S*)", (root / "conda.yaml").read_text(), re.M)
    pinned = re.findall(r"^(pyarrow\S*)", (root / "serve/requirements-web.txt").read_text(), re.M)
    specs = [Requirement(d) for d in deps + conda + pinned]
    assert len(specs) == 3, specs
    for spec in specs:  # no vulnerable version allowed
        assert not any(spec.specifier.contains(v) for v in ("0.14.0", "13.0.0", "14.0.0")), spec
    assert Version(version("pyarrow")) >= Version("14.0.1")


# -- the event loop never waits for MLflow's pyfunc ---------------------------------------------
async def asgi_post(app, path: str, body: dict) -> tuple[int, dict]:
    """One POST through the ASGI app itself (no server): status and JSON answer."""
    data = json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())]}
    messages = [{"type": "http.request", "body": data, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_a_request_for_mlflows_parser_never_blocks_the_event_loop(tiny_model, tiny_model_dir):
    """A version started from the version cache answers on its tables while MLflow's pyfunc is
    still loading (seconds, behind a lock). A request only that pyfunc can parse waits for it
    in a worker thread: requests on the fast path are answered meanwhile. (It once blocked the
    event loop: every request behind it waited, and was shed past --max-queue-wait.)"""
    import asyncio
    import threading

    import mlflow

    from serve.registry import LoadedModel
    from serve.web.app import create_app
    from serve.web.holder import Active
    from serve.web.settings import WebSettings

    pyfunc = mlflow.pyfunc.load_model(str(tiny_model_dir))
    loading, loaded = threading.Event(), threading.Event()

    def load_pyfunc():  # MLflow's import and the model's load, held until the test says so
        loading.set()
        loaded.wait(30)
        return pyfunc

    app = create_app(WebSettings(web_max_queue_wait=30))
    model = LoadedModel(python_model=tiny_model, load_pyfunc=load_pyfunc)
    app.service.holder.active = Active(model, tiny_model, "7")
    slow_body = {"dataframe_split": {"index": [0], "columns": list(RIDE),
                                     "data": [list(RIDE.values())]}}
    assert fast_rides(slow_body) is None  # MLflow's parser takes it
    answered = []

    async def post(path, body):
        answer = await asgi_post(app, path, body)
        answered.append(path)
        return answer

    async def main():
        slow = asyncio.ensure_future(post("/invocations", slow_body))
        assert await asyncio.to_thread(loading.wait, 30)  # it waits for the pyfunc now
        fast = await asyncio.wait_for(post("/predict", RIDE), 10)
        loaded.set()
        return fast, await asyncio.wait_for(slow, 30)

    try:
        (fast_status, fast), (slow_status, slow) = asyncio.run(main())
    finally:
        loaded.set()
        app.work.close()
    assert answered == ["/predict", "/invocations"]
    assert fast_status == 200 and fast["duration"] == pytest.approx(5 + 4 * 1.8)
    assert slow_status == 200 and slow["predictions"] == pytest.approx([5 + 4 * 1.8])
