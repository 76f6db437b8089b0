"""Integration tests of ``python -m serve.web`` over real HTTP against a real tracking server.

The service is compared byte for byte with a real ``mlflow models serve`` of the
same registered version; malformed requests are a table; the prediction log is
read back from the files and the PostgreSQL table it writes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ops.procs import free_port, http_ok, spawn, stop, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
RIDE = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}
RIDES = [RIDE, {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 3},
         {"PULocationID": 265, "DOLocationID": 74, "trip_distance": 0.0},
         {"PULocationID": 7, "DOLocationID": 7, "trip_distance": 25.5}]
JSON_CT = "application/json"
MAX_ROWS = 5_000
MAX_BODY = 1 << 20


@dataclass
class Web:
    """A running ``python -m serve.web``."""

    url: str
    proc: subprocess.Popen
    log: Path

    def post(self, path: str, body, content_type: str | None = JSON_CT, **kw):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"Content-Type": content_type} if content_type else {}
        return requests.post(self.url + path, data=data, headers=headers, timeout=30, **kw)

    def metrics(self) -> dict[tuple, float]:
        text = requests.get(self.url + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


SHEDDING_OFF = 30  # seconds of --max-queue-wait: longer than any stall of a busy machine


def start_web(home: Path, model_uri: str, tracking_uri: str, *args: str,
              ready: bool = True, env: dict | None = None) -> Web:
    """Start the service on a free port and wait until it is alive (and ready, if asked);
    ``env``: more environment variables (settings such as ``WEB_REQUEST_TIMEOUT``).

    Load shedding is off the path (``WEB_MAX_QUEUE_WAIT=30``, not 0.5) unless ``env`` or the
    arguments set it: these tests check what the service answers, and a CI machine building
    images meanwhile can stall a process for seconds. test_web_load tests the shedding."""
    port = free_port()
    env = {"WEB_MAX_QUEUE_WAIT": str(SHEDDING_OFF), **(env or {})}
    log = home / f"web-{port}.log"
    cmd = [sys.executable, "-m", "serve.web", "--model-uri", model_uri, "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}"
    try:
        proc = spawn(cmd, log, http_ok(url + ("/ready" if ready else "/health")), "serve.web",
                     timeout=90, cwd=ROOT,
                     env=dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, **env))
    except Exception as e:
        raise AssertionError(f"serve.web did not start; log:\n{log.read_text()[-3000:]}") from e
    return Web(url, proc, log)


def warm_up(web: Web) -> None:
    """Wait until the service has loaded everything it will ever load. A version from the
    version cache starts on its tables and loads MLflow's pyfunc in the background; a CSV body
    needs that pyfunc, so once one is answered the background load is over (and no longer
    competes with the requests of a test for the GIL)."""
    r = requests.post(web.url + "/invocations", data=b"PULocationID,DOLocationID,"
                      b"trip_distance\n43,151,1.8\n", headers={"Content-Type": "text/csv"},
                      timeout=60)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def web(registered_model, tracking_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("web")
    w = start_web(home, "models:/duration@production", tracking_server.uri,
                  "--max-rows", str(MAX_ROWS), "--max-body-bytes", str(MAX_BODY),
                  "--log-predictions", str(home / "predictions.jsonl"))
    yield w
    stop(w.proc.pid)
    assert "Traceback" not in w.log.read_text(), w.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def mlflow_serve(registered_model, tracking_server, tmp_path_factory):
    """``mlflow models serve`` of the same version, the reference for /invocations."""
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-serve") / "serve.log"
    url = f"http://127.0.0.1:{port}"
    proc = spawn([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                  f"models:/duration/{registered_model['version']}", "--env-manager", "local",
                  "-h", "127.0.0.1", "-p", str(port), "-w", "1"], log,
                 http_ok(url + "/ping"), "mlflow models serve", timeout=120)
    yield url
    stop(proc.pid)


# -- endpoints -------------------------------------------------------------------------------
def test_health_ready_ping(web):
    for path in ("/health", "/ping"):
        r = requests.get(web.url + path, timeout=5)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert requests.get(web.url + "/ready", timeout=5).json() == {"status": "ready",
                                                                  "model_version": "1"}


def test_version_names_the_registered_model(web, registered_model):
    v = requests.get(web.url + "/version", timeout=5).json()
    assert v["model_uri"] == "models:/duration@production"
    assert (v["name"], v["version"], v["run_id"]) == ("duration", registered_model["version"],
                                                     registered_model["run_id"])
    assert v["pinned_uri"] == "models:/duration/1" and v["loaded_at"]
    import mlflow

    assert v["mlflow_version"] == mlflow.__version__


def test_predict_one_ride_matches_the_registered_model(web, registered_model):
    import mlflow

    expected = mlflow.pyfunc.load_model("models:/duration/1").predict(pd.DataFrame(RIDES))
    r = web.post("/predict", RIDE)
    assert r.status_code == 200
    assert r.json() == {"duration": expected[0], "model_version": "1"}
    r = web.post("/predict", {"rides": RIDES})
    assert r.json() == {"predictions": [{"duration": m} for m in expected],
                        "model_version": "1"}


def test_metrics_count_requests_predictions_and_model(web):
    before = web.metrics()
    web.post("/predict", {"rides": RIDES})
    web.post("/predict", {"PULocationID": 0})
    after = web.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("duration_http_requests_total", endpoint="/predict", status="200") == 1
    assert delta("duration_http_requests_total", endpoint="/predict", status="400") == 1
    assert delta("duration_http_request_duration_seconds_count", endpoint="/predict",
                 status="200") == 1
    assert delta("duration_predictions_total", model_version="1") == len(RIDES)
    info = [labels for (name, labels) in after if name == "duration_model_info"]
    assert info and dict(info[0])["version"] == "1"
    assert after[("duration_model_reloads_total", ())] == 1


def test_a_large_batch_is_scored_off_the_event_loop_with_the_same_numbers(web):
    import mlflow

    from serve.web.app import OFFLOAD_BYTES

    n = MAX_ROWS
    rides = pd.DataFrame({"PULocationID": [1 + i % 265 for i in range(n)],
                          "DOLocationID": [1 + (7 * i) % 265 for i in range(n)],
                          "trip_distance": [round(0.1 * (i % 300), 2) for i in range(n)]})
    body = json.dumps({"dataframe_records": rides.to_dict(orient="records")})
    assert len(body) > OFFLOAD_BYTES
    r = web.post("/invocations", body)
    assert r.status_code == 200
    expected = mlflow.pyfunc.load_model("models:/duration/1").predict(rides)
    assert r.json()["predictions"] == expected.tolist()


# -- MLflow compatibility --------------------------------------------------------------------
SPLIT = {"columns": list(RIDE), "data": [list(r.values()) for r in RIDES]}
COLUMNAR = {k: [r[k] for r in RIDES] for k in RIDE}


def _csv(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode()


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf)
    return buf.getvalue()


SAME_AS_MLFLOW = {
    "records-one": ({"dataframe_records": [RIDE]}, JSON_CT),
    "records-many": ({"dataframe_records": RIDES}, JSON_CT),
    "split": ({"dataframe_split": SPLIT}, JSON_CT),
    "split-index": ({"dataframe_split": {**SPLIT, "index": [5, 6, 7, 8]}}, JSON_CT),
    "instances-records": ({"instances": RIDES}, JSON_CT),
    "inputs-records": ({"inputs": RIDES}, JSON_CT),
    "inputs-columnar": ({"inputs": COLUMNAR}, JSON_CT),
    "instances-columnar": ({"instances": COLUMNAR}, JSON_CT),
    "with-params": ({"dataframe_records": [RIDE], "params": {}}, JSON_CT),
    "extra-column": ({"dataframe_records": [{**RIDE, "VendorID": 2}]}, JSON_CT),
    "int-distance": ({"dataframe_records": [{**RIDE, "trip_distance": 2}]}, JSON_CT),
    "string-id-coerced": ({"dataframe_records": [{**RIDE, "PULocationID": "43"}]}, JSON_CT),
    "float-id": ({"dataframe_records": [{**RIDE, "PULocationID": 43.0}]}, JSON_CT),
    "charset": ({"dataframe_records": RIDES}, "application/json; charset=utf-8"),
    "csv": (_csv(pd.DataFrame(RIDES)), "text/csv"),
    "csv-extra-column": (_csv(pd.DataFrame(RIDES).assign(x="a")), "text/csv"),
    "parquet": (_parquet(pd.DataFrame(RIDES)), "application/vnd.apache.parquet"),
}


@pytest.mark.parametrize("case", list(SAME_AS_MLFLOW))
def test_invocations_answer_exactly_what_mlflow_models_serve_answers(web, mlflow_serve, case):
    body, ct = SAME_AS_MLFLOW[case]
    data = body if isinstance(body, bytes) else json.dumps(body)
    theirs = requests.post(mlflow_serve + "/invocations", data=data,
                           headers={"Content-Type": ct}, timeout=30)
    ours = web.post("/invocations", data, ct)
    assert theirs.status_code == 200, theirs.text[:500]
    assert (ours.status_code, ours.content) == (200, theirs.content)


@pytest.mark.parametrize("body", [
    {"dataframe_records": [{"PULocationID": 43, "DOLocationID": 151}]},
    {"dataframe_records": [{**RIDE, "trip_distance": -1}]},
    {"dataframe_records": [{**RIDE, "trip_distance": None}]},
    {"dataframe_records": []},
    {"records": [RIDE]},
])
def test_invocations_reject_what_mlflow_rejects_without_a_traceback(web, mlflow_serve, body):
    theirs = requests.post(mlflow_serve + "/invocations", json=body, timeout=30)
    ours = web.post("/invocations", body)
    assert theirs.status_code >= 400
    assert 400 <= ours.status_code < 500 and "Traceback" not in ours.text
    assert set(ours.json()) == {"error_code", "message"}


# -- malformed requests ------------------------------------------------------------------------
BIG_RIDES = {"rides": [RIDE] * (MAX_ROWS + 1)}
# (method, path, body, content type, expected status, text the message must contain)
MALFORMED = {
    "bad-json": ("POST", "/predict", b'{"PULocationID": 43,', JSON_CT, 400, "not valid JSON"),
    "not-utf8": ("POST", "/predict", b"\xff\xfe\x00", JSON_CT, 400, "UTF-8"),
    "empty-body": ("POST", "/predict", b"", JSON_CT, 400, "not valid JSON"),
    "text-plain": ("POST", "/predict", json.dumps(RIDE), "text/plain", 415, "text/plain"),
    "no-content-type": ("POST", "/predict", json.dumps(RIDE), None, 415, "Content-Type"),
    "latin1": ("POST", "/predict", json.dumps(RIDE), "application/json; charset=latin-1", 415,
               "UTF-8"),
    "csv-to-predict": ("POST", "/predict", b"a,b\n1,2\n", "text/csv", 415, "/predict takes"),
    "json-array": ("POST", "/predict", [RIDE], JSON_CT, 400, "JSON object"),
    "json-string": ("POST", "/predict", b'"ride"', JSON_CT, 400, "JSON object"),
    "missing-pu": ("POST", "/predict", {"DOLocationID": 1, "trip_distance": 1}, JSON_CT, 400,
                   "PULocationID"),
    "missing-distance": ("POST", "/predict", {"PULocationID": 1, "DOLocationID": 1}, JSON_CT,
                         400, "trip_distance"),
    "pu-string": ("POST", "/predict", {**RIDE, "PULocationID": "43"}, JSON_CT, 400,
                  "PULocationID"),
    "pu-bool": ("POST", "/predict", {**RIDE, "PULocationID": True}, JSON_CT, 400, "PULocationID"),
    "pu-zero": ("POST", "/predict", {**RIDE, "PULocationID": 0}, JSON_CT, 400, "1..265"),
    "do-266": ("POST", "/predict", {**RIDE, "DOLocationID": 266}, JSON_CT, 400, "DOLocationID"),
    "pu-fraction": ("POST", "/predict", {**RIDE, "PULocationID": 43.5}, JSON_CT, 400,
                    "PULocationID"),
    "distance-negative": ("POST", "/predict", {**RIDE, "trip_distance": -0.1}, JSON_CT, 400,
                          "trip_distance"),
    "distance-string": ("POST", "/predict", {**RIDE, "trip_distance": "1.8"}, JSON_CT, 400,
                        "trip_distance"),
    "distance-null": ("POST", "/predict", {**RIDE, "trip_distance": None}, JSON_CT, 400,
                      "trip_distance"),
    "distance-nan": ("POST", "/predict", b'{"PULocationID": 1, "DOLocationID": 2, '
                                         b'"trip_distance": NaN}', JSON_CT, 400, "trip_distance"),
    "distance-infinite": ("POST", "/predict", b'{"PULocationID": 1, "DOLocationID": 2, '
                                              b'"trip_distance": 1e400}', JSON_CT, 400,
                          "trip_distance"),
    "rides-not-list": ("POST", "/predict", {"rides": RIDE}, JSON_CT, 400, "'rides' must be"),
    "rides-empty": ("POST", "/predict", {"rides": []}, JSON_CT, 400, "empty"),
    "rides-one-bad": ("POST", "/predict", {"rides": [RIDE, {**RIDE, "DOLocationID": -3}]},
                      JSON_CT, 400, "rides[1]: DOLocationID"),
    "too-many-rides": ("POST", "/predict", BIG_RIDES, JSON_CT, 413, f"limit is {MAX_ROWS}"),
    "body-too-large": ("POST", "/predict", b" " * (MAX_BODY + 1), JSON_CT, 413, "limit is"),
    "get-predict": ("GET", "/predict", None, None, 405, "takes POST"),
    "post-health": ("POST", "/health", b"{}", JSON_CT, 405, "takes GET"),
    "unknown-path": ("POST", "/predictions", json.dumps(RIDE), JSON_CT, 404, "/predictions"),
    "inv-no-format": ("POST", "/invocations", {"rides": [RIDE]}, JSON_CT, 400, "exactly one of"),
    "inv-two-formats": ("POST", "/invocations", {"dataframe_records": [RIDE], "inputs": [RIDE]},
                        JSON_CT, 400, "exactly one of"),
    "inv-list-body": ("POST", "/invocations", [RIDE], JSON_CT, 400, "JSON object"),
    "inv-missing-field": ("POST", "/invocations", {"dataframe_records": [{"PULocationID": 1}]},
                          JSON_CT, 400, "DOLocationID"),
    "inv-negative": ("POST", "/invocations",
                     {"dataframe_records": [{**RIDE, "trip_distance": -2}]}, JSON_CT, 400,
                     "trip_distance"),
    "inv-out-of-range": ("POST", "/invocations",
                         {"dataframe_records": [{**RIDE, "DOLocationID": 999}]}, JSON_CT, 400,
                         "DOLocationID"),
    "inv-word-id": ("POST", "/invocations",
                    {"dataframe_records": [{**RIDE, "PULocationID": "abc"}]}, JSON_CT, 400,
                    "PULocationID"),
    "inv-split-ragged": ("POST", "/invocations",
                         {"dataframe_split": {"columns": list(RIDE), "data": [[1, 2]]}}, JSON_CT,
                         400, "dataframe_split"),
    "inv-empty": ("POST", "/invocations", {"dataframe_records": []}, JSON_CT, 400,
                  "missing inputs"),
    "inv-format-param": ("POST", "/invocations", {"dataframe_records": [RIDE]},
                         "application/json; format=pandas-records", 415, "format"),
    "inv-csv-missing-column": ("POST", "/invocations", b"PULocationID,DOLocationID\n1,2\n",
                               "text/csv", 400, "trip_distance"),
    "inv-csv-garbage": ("POST", "/invocations", b"\x00\x01\x02", "text/csv", 400,
                        "missing inputs"),
    "inv-parquet-garbage": ("POST", "/invocations", b"PAR1 not parquet",
                            "application/vnd.apache.parquet", 400, "parquet"),
    "inv-too-many-rows": ("POST", "/invocations", {"dataframe_records": [RIDE] * (MAX_ROWS + 1)},
                          JSON_CT, 413, "limit is"),
    # bodies that used to escape as 500s (RecursionError, ValueError, OverflowError)
    "deep-nesting": ("POST", "/predict", b"[" * 100_000, JSON_CT, 400, "nested too deeply"),
    "5000-digit-number": ("POST", "/predict", b'{"PULocationID": ' + b"1" * 5000 + b"}", JSON_CT,
                          400, "not valid JSON"),
    "distance-huge-int": ("POST", "/predict", b'{"PULocationID": 1, "DOLocationID": 2, '
                                              b'"trip_distance": 1' + b"0" * 400 + b"}",
                          JSON_CT, 400, "trip_distance"),
    "inv-distance-huge-int": ("POST", "/invocations",
                              b'{"dataframe_records": [{"PULocationID": 1, "DOLocationID": 2, '
                              b'"trip_distance": 1' + b"0" * 400 + b"}]}", JSON_CT, 400,
                              "trip_distance"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_a_4xx_json_error_without_traceback(web, case):
    method, path, body, ct, status, needle = MALFORMED[case]
    if method == "GET":
        r = requests.get(web.url + path, timeout=10)
    else:
        r = web.post(path, body, ct)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error_code", "message"} and err["error_code"].isupper()
    assert needle in err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_malformed_table_covers_every_client_error_and_checks_each_message():
    """A 4xx error type added to serve/errors.py needs a malformed case here, and no case
    may pass whatever the message says."""
    from serve import errors

    client_errors = {c.status_code for c in vars(errors).values() if isinstance(c, type)
                     and issubclass(c, errors.DurationError) and 400 <= c.status_code < 500}
    # 408 needs a slow client, not a body: tests/test_web_hardening.py sends one.
    assert client_errors - {408} <= {case[4] for case in MALFORMED.values()}
    assert [name for name, case in MALFORMED.items() if not case[5]] == []


# -- readiness and the prediction log --------------------------------------------------------
def test_not_ready_until_a_model_loads(tracking_server, tmp_path):
    w = start_web(tmp_path, "models:/duration-does-not-exist@production", tracking_server.uri,
                  "--poll-interval", "1", ready=False)
    try:
        r = requests.get(w.url + "/ready", timeout=5)
        assert r.status_code == 503 and r.json()["error_code"] == "MODEL_NOT_READY"
        r = w.post("/predict", RIDE)
        assert r.status_code == 503 and "duration-does-not-exist" in r.json()["message"]
        assert requests.get(w.url + "/health", timeout=5).status_code == 200
        wait_for(lambda: w.metrics()[("duration_registry_poll_failures_total", ())] >= 1,
                 "a failed poll", timeout=30)
    finally:
        stop(w.proc.pid)


def test_predictions_are_logged_off_the_request_path(web):
    log = web.log.parent / "predictions.jsonl"
    marker = {"PULocationID": 200, "DOLocationID": 201, "trip_distance": 9.25}
    answer = web.post("/predict", marker).json()
    web.post("/invocations", {"dataframe_records": [marker, marker]})

    def logged():
        rows = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
        return [r for r in rows if r["trip_distance"] == 9.25 and r["PULocationID"] == 200]

    rows = wait_for(lambda: len(logged()) == 3 and logged(), "3 logged predictions", timeout=15)
    assert {r["endpoint"] for r in rows} == {"/predict", "/invocations"}
    assert all(r["duration"] == answer["duration"] and r["model_version"] == "1" for r in rows)


def test_prediction_log_to_postgres(postgres):
    import numpy as np
    import sqlalchemy as sa

    from serve.features import Rides
    from serve.predlog import LoggedBatch, PredictionLog, SqlSink, open_sink

    sink = open_sink(postgres)
    assert isinstance(sink, SqlSink)
    plog = PredictionLog(sink, flush_rows=2).start()
    for v in ("3", "4"):
        plog.put(LoggedBatch(1.7e9, "/predict", v, Rides(np.array([1, 2]), np.array([3, 4]),
                                                         np.array([0.5, 1.5])),
                             np.array([7.0, 8.0])))
    plog.close()
    with sa.create_engine(postgres).connect() as conn:
        rows = conn.execute(sa.text(
            'SELECT model_version, "PULocationID", trip_distance, duration FROM predictions '
            "ORDER BY model_version, duration")).all()
    assert [tuple(r) for r in rows] == [("3", 1, 0.5, 7.0), ("3", 2, 1.5, 8.0),
                                        ("4", 1, 0.5, 7.0), ("4", 2, 1.5, 8.0)]
