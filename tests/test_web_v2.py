"""The Open Inference Protocol (V2) of ``serve.web`` over real HTTP: a real V2 client
(Triton's ``tritonclient.http``) and the same request bodies sent to MLServer + its MLflow
runtime serving the same registered version (predictions to 1e-9, error status codes).

KServe's Python REST client is not used: ``pip install kserve`` downgrades pandas 3 to 2.3
and pulls the Kubernetes client into the project's environment.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import requests

from ops.mlserver import start_mlserver
from ops.procs import stop
from tests.test_web import start_web

pytestmark = pytest.mark.integration

TYPES = {"PULocationID": "INT64", "DOLocationID": "INT64", "trip_distance": "FP64"}
RIDES = pd.DataFrame({"PULocationID": [1 + (13 * i) % 265 for i in range(100)],
                      "DOLocationID": [1 + (7 * i) % 265 for i in range(100)],
                      "trip_distance": [round(0.37 * i, 2) for i in range(100)]})


def v2_body(df: pd.DataFrame, shape_1: bool = False, **extra) -> dict:
    n = len(df)
    return {**extra, "inputs": [{"name": c, "datatype": t, "shape": [n, 1] if shape_1 else [n],
                                 "data": df[c].tolist()} for c, t in TYPES.items()]}


@pytest.fixture(scope="module")
def web(registered_model, tracking_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("web-v2")
    w = start_web(home, "models:/duration@production", tracking_server.uri)
    yield w
    stop(w.proc.pid)
    assert "Traceback" not in w.log.read_text(), w.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def expected(registered_model):
    import mlflow

    return mlflow.pyfunc.load_model("models:/duration/1").predict(RIDES)


@pytest.fixture(scope="module")
def mlserver(registered_model, tmp_path_factory):
    with start_mlserver("models:/duration/1", tmp_path_factory.mktemp("mlserver"),
                        model_version="1") as server:
        yield server


# -- our endpoints --------------------------------------------------------------------------
def test_health_metadata_and_readiness(web):
    get = lambda p: requests.get(web.url + p, timeout=10)  # noqa: E731
    assert get("/v2").json()["name"] == "duration"
    assert get("/v2/health/live").status_code == 200
    assert get("/v2/health/ready").status_code == 200
    for base in ("/v2/models/duration", "/v2/models/duration/versions/1"):
        meta = get(base).json()
        assert meta["name"] == "duration" and meta["versions"] == ["1"]
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == list(TYPES.items())
        assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [
            ("predicted_duration", "FP64")]
        assert get(base + "/ready").json() == {"name": "duration", "ready": True}


def test_infer_returns_the_model_predictions_version_and_id(web, expected):
    for path in ("/v2/models/duration/infer", "/v2/models/duration/versions/1/infer"):
        r = requests.post(web.url + path, json=v2_body(RIDES, id="req-7"), timeout=10)
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["model_name"], out["model_version"], out["id"]) == ("duration", "1", "req-7")
        (tensor,) = out["outputs"]
        assert (tensor["name"], tensor["datatype"], tensor["shape"]) == (
            "predicted_duration", "FP64", [len(RIDES)])
        assert tensor["data"] == expected.tolist()


@pytest.mark.parametrize("path, status", [
    ("/v2/models/other/infer", 404), ("/v2/models/duration/versions/2/infer", 404),
    ("/v2/models/other", 404), ("/v2/models/duration/versions/2/ready", 404),
    ("/v2/models/duration/explain", 404),
])
def test_unknown_names_and_versions_are_404_in_the_spec_error_shape(web, path, status):
    r = (requests.post(web.url + path, json=v2_body(RIDES), timeout=10) if "infer" in path
         else requests.get(web.url + path, timeout=10))
    assert r.status_code == status and list(r.json()) == ["error"]


def test_get_on_infer_is_405_in_the_spec_error_shape(web):
    r = requests.get(web.url + "/v2/models/duration/infer", timeout=10)
    assert r.status_code == 405 and "takes POST" in r.json()["error"]


# -- a real V2 client -----------------------------------------------------------------------
def triton_inputs(df: pd.DataFrame, binary: bool = False):
    import tritonclient.http as httpclient

    inputs = []
    for c, t in TYPES.items():
        tensor = httpclient.InferInput(c, [len(df)], t)
        tensor.set_data_from_numpy(df[c].to_numpy(np.int64 if t == "INT64" else np.float64),
                                   binary_data=binary)
        inputs.append(tensor)
    return inputs


def test_tritonclient_speaks_to_us(web, expected):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=web.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("duration") and client.is_model_ready("duration", "1")
        assert not client.is_model_ready("duration", "2")
        assert client.get_model_metadata("duration")["outputs"][0]["name"] == "predicted_duration"
        # With the outputs named, JSON answers ...
        wanted = [httpclient.InferRequestedOutput("predicted_duration", binary_data=False)]
        result = client.infer("duration", triton_inputs(RIDES), outputs=wanted,
                              request_id="t-1", model_version="1")
        assert result.get_response()["id"] == "t-1"
        assert result.get_response()["model_version"] == "1"
        assert result.as_numpy("predicted_duration").tolist() == expected.tolist()
        # ... and with none named the client asks for binary outputs: it reads our JSON too.
        result = client.infer("duration", triton_inputs(RIDES))
        assert result.as_numpy("predicted_duration").tolist() == expected.tolist()
        # The client's defaults: binary tensors (Triton's extension) in, binary asked out.
        result = client.infer("duration", triton_inputs(RIDES, binary=True))
        assert result.as_numpy("predicted_duration").tolist() == expected.tolist()
    finally:
        client.close()


def test_tritonclient_gets_our_errors(web):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=web.url.removeprefix("http://"))
    try:
        bad = RIDES.head(3).assign(DOLocationID=[1, 2, 999])
        with pytest.raises(InferenceServerException) as e:
            client.infer("duration", triton_inputs(bad))
        assert e.value.status() == "400" and "DOLocationID" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            client.infer("other", triton_inputs(RIDES))
        assert e.value.status() == "404"
        with pytest.raises(InferenceServerException) as e:  # binary tensors are checked too
            client.infer("duration", triton_inputs(bad, binary=True))
        assert e.value.status() == "400" and "DOLocationID" in e.value.message()
    finally:
        client.close()


# -- the same bodies against MLServer ------------------------------------------------------
def mlserver_pd_body(mlserver, df: pd.DataFrame) -> dict:
    """The body MLServer's own pandas codec builds for ``df`` (run in MLServer's venv)."""
    from ops.mlserver import ensure_venv

    code = ("import sys, json, pandas as pd\n"
            "from mlserver.codecs import PandasCodec\n"
            "df = pd.DataFrame(json.load(sys.stdin))\n"
            "print(PandasCodec.encode_request(df).model_dump_json(exclude_none=True))")
    out = subprocess.run([str(ensure_venv() / "bin" / "python"), "-c", code],
                         input=df.to_json(orient="columns"), capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout)


def outputs_of(response: requests.Response) -> list[float]:
    assert response.status_code == 200, response.text[:500]
    return np.ravel(response.json()["outputs"][0]["data"]).tolist()


@pytest.mark.parametrize("form", ["shape-n", "shape-n-1", "one-ride", "mlserver-pd-codec"])
def test_same_predictions_as_mlserver(web, mlserver, form):
    df = RIDES.head(1) if form == "one-ride" else RIDES
    body = (mlserver_pd_body(mlserver, df) if form == "mlserver-pd-codec"
            else v2_body(df, shape_1=form == "shape-n-1", id="same-1"))
    theirs = outputs_of(requests.post(mlserver.infer_url(), json=body, timeout=30))
    ours_r = requests.post(f"{web.url}/v2/models/duration/infer", json=body, timeout=30)
    ours = outputs_of(ours_r)
    assert np.allclose(ours, theirs, rtol=0, atol=1e-9) and len(ours) == len(df)
    if "id" in body:
        assert ours_r.json()["id"] == body["id"]


BAD_RIDE = RIDES.head(2).assign(PULocationID=[43, 0])
# (path, body, our status, MLServer's status): MLServer answers a bad value with a 500 (the
# model's exception escapes) and a non-JSON body with FastAPI's 422; we answer 400 for both.
ERRORS = {
    "unknown-model": ("/v2/models/other/infer", v2_body(RIDES), 404, 404),
    "unknown-version": ("/v2/models/duration/versions/9/infer", v2_body(RIDES), 404, 404),
    "not-json": ("/v2/models/duration/infer", "{not json", 400, 422),
    "bad-location": ("/v2/models/duration/infer", v2_body(BAD_RIDE), 400, 500),
    "missing-input": ("/v2/models/duration/infer",
                      {"inputs": v2_body(RIDES)["inputs"][:2]}, 400, 500),
    "negative-distance": ("/v2/models/duration/infer",
                          v2_body(RIDES.head(1).assign(trip_distance=[-1.0])), 400, 500),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_status_codes_next_to_mlserver(web, mlserver, case):
    path, body, ours_expected, theirs_expected = ERRORS[case]
    data = body if isinstance(body, str) else json.dumps(body)
    headers = {"Content-Type": "application/json"}
    theirs = requests.post(mlserver.url + path, data=data, headers=headers, timeout=30)
    ours = requests.post(web.url + path, data=data, headers=headers, timeout=30)
    assert (ours.status_code, theirs.status_code) == (ours_expected, theirs_expected)
    assert list(ours.json()) == ["error"] and ours.json()["error"]
