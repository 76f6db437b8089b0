"""Unit tests of the Open Inference Protocol decoding and routing (serve/web/v2.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serve.errors import InvalidInput, NotFound, PayloadTooLarge
from serve.web.v2 import NUMPY_TYPES, V2, parse_infer, split_binary

COLUMNS = {"PULocationID": ("INT64", [43, 1]), "DOLocationID": ("INT64", [151, 2]),
           "trip_distance": ("FP64", [1.8, 3])}


def tensors(shape=None, nest=False, **override) -> list[dict]:
    """The three input tensors of two rides; ``override`` replaces fields of one input."""
    out = []
    for name, (datatype, data) in COLUMNS.items():
        t = {"name": name, "datatype": datatype, "shape": shape or [len(data)],
             "data": [[v] for v in data] if nest else list(data)}
        t.update(override.get(name, {}))
        out.append(t)
    return out


def rows(rides) -> list[tuple]:
    return list(zip(rides.pu.tolist(), rides.do.tolist(), rides.distance.tolist(), strict=True))


EXPECTED = [(43, 151, 1.8), (1, 2, 3.0)]


@pytest.mark.parametrize("payload", [
    {"inputs": tensors()},
    {"inputs": tensors(shape=[2, 1])},  # MLServer's pandas codec
    {"inputs": tensors(shape=[2, 1], nest=True)},
    {"inputs": tensors(), "parameters": {"content_type": "pd"}},
    {"inputs": tensors(PULocationID={"parameters": {"content_type": "np"}})},
    {"inputs": tensors(PULocationID={"datatype": "INT32"}, trip_distance={"datatype": "FP32"})},
    {"inputs": tensors(trip_distance={"datatype": "INT64", "data": [1.8, 3]})},
    {"inputs": list(reversed(tensors()))},
    {"inputs": [*tensors(), {"name": "VendorID", "datatype": "INT64", "shape": [2],
                             "data": [1, 2]}]},  # other columns are ignored
    {"inputs": tensors(), "outputs": [{"name": "predicted_duration"}]},
    {"inputs": tensors(), "parameters": {"binary_data_output": True}},  # tritonclient's default
])
def test_parse_infer_reads_every_accepted_form(payload):
    rides, rid = parse_infer(payload, 100)
    assert rows(rides) == EXPECTED and rid is None
    assert rides.pu.dtype.kind == "i" and rides.distance.dtype.kind == "f"


def test_parse_infer_returns_the_request_id():
    assert parse_infer({"id": "r-1", "inputs": tensors()}, 100)[1] == "r-1"


BAD = {
    "not-object": ([1], "JSON object"),
    "no-inputs": ({"id": "x"}, "'inputs'"),
    "empty-inputs": ({"inputs": []}, "'inputs'"),
    "id-number": ({"id": 3, "inputs": tensors()}, "'id' must be a string"),
    "content-type-np": ({"inputs": tensors(), "parameters": {"content_type": "np"}},
                        "content_type"),
    "unknown-output": ({"inputs": tensors(), "outputs": [{"name": "output-0"}]}, "outputs"),
    "tensor-not-object": ({"inputs": [1, 2, 3]}, "inputs[0]"),
    "duplicate": ({"inputs": [*tensors(), tensors()[0]]}, "twice"),
    "missing": ({"inputs": tensors()[:2]}, "missing input 'trip_distance'"),
    "shape-mismatch": ({"inputs": tensors(PULocationID={"shape": [3]})}, "needs 3 elements"),
    "shape-3d": ({"inputs": tensors(shape=[2, 1, 1])}, "shape must be"),
    "shape-2-cols": ({"inputs": tensors(shape=[1, 2])}, "shape must be"),
    "shape-zero": ({"inputs": tensors(shape=[0])}, "shape must be"),
    "lengths-differ": ({"inputs": tensors(trip_distance={"shape": [1], "data": [1.0]})},
                       "same length"),
    "bytes": ({"inputs": tensors(PULocationID={"datatype": "BYTES"})}, "datatype must be INT64"),
    "id-as-float-type": ({"inputs": tensors(PULocationID={"datatype": "FP64"})},
                         "datatype must be INT64"),
    "id-zero": ({"inputs": tensors(PULocationID={"data": [0, 1]})}, "1..265"),
    "id-266": ({"inputs": tensors(DOLocationID={"data": [1, 266]})}, "DOLocationID"),
    "id-float": ({"inputs": tensors(PULocationID={"data": [43.0, 1]})}, "integers"),
    "id-bool": ({"inputs": tensors(PULocationID={"data": [True, 1]})}, "True"),
    "id-string": ({"inputs": tensors(PULocationID={"data": ["43", 1]})}, "'43'"),
    "id-huge": ({"inputs": tensors(PULocationID={"data": [10 ** 400, 1]})}, "chars"),
    "distance-negative": ({"inputs": tensors(trip_distance={"data": [-0.5, 1]})}, "-0.5"),
    "distance-nan": ({"inputs": tensors(trip_distance={"data": [float("nan"), 1]})}, "nan"),
    "distance-inf": ({"inputs": tensors(trip_distance={"data": [float("inf"), 1]})}, "inf"),
    "distance-huge-int": ({"inputs": tensors(trip_distance={"data": [10 ** 400, 1]})},
                          "finite"),
    "distance-null": ({"inputs": tensors(trip_distance={"data": [None, 1]})}, "None"),
    "data-not-list": ({"inputs": tensors(trip_distance={"data": "1.8"})}, "JSON list"),
    "nested-ragged": ({"inputs": tensors(shape=[2, 1], PULocationID={"data": [[43, 1], [2]]})},
                      "nested"),
    "binary-missing": ({"inputs": tensors(PULocationID={"parameters": {"binary_data_size": 16}})},
                       "no binary data follows"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_parse_infer_names_what_is_wrong(case):
    payload, needle = BAD[case]
    with pytest.raises(InvalidInput) as e:
        parse_infer(payload, 100)
    assert needle in e.value.message and e.value.status_code == 400


def binary_request(pu=(43, 1), do=(151, 2), dist=(1.8, 3.0), pu_type="INT64") -> bytes:
    """A request in Triton's binary tensor extension: JSON header, then the raw tensors."""
    arrays = {"PULocationID": np.array(pu, dtype=NUMPY_TYPES[pu_type]),
              "DOLocationID": np.array(do, dtype="<i8"),
              "trip_distance": np.array(dist, dtype="<f8")}
    header = {"inputs": [{"name": c, "datatype": pu_type if c == "PULocationID" else
                          ("FP64" if c == "trip_distance" else "INT64"), "shape": [len(a)],
                          "parameters": {"binary_data_size": a.nbytes}}
                         for c, a in arrays.items()]}
    return json.dumps(header).encode() + b"".join(a.tobytes() for a in arrays.values())


def test_binary_tensors_decode_like_json_ones():
    for pu_type in ("INT64", "INT32", "UINT8"):
        payload, blob = split_binary(binary_request(pu_type=pu_type))
        rides, _ = parse_infer(payload, 100, blob)
        assert rows(rides) == EXPECTED and rides.pu.dtype == np.int64


@pytest.mark.parametrize("body, needle", [
    (binary_request(pu=(0, 1)), "1..265"),
    (binary_request(dist=(-1.0, 2.0)), "-1.0"),
    (binary_request(dist=(float("nan"), 2.0)), "nan"),
    (binary_request() + b"\x00", "belong to no input"),
    (binary_request()[:-1], "binary_data_size 16"),
])
def test_binary_tensors_are_validated(body, needle):
    with pytest.raises(InvalidInput) as e:
        parse_infer(*split_binary(body)[:1], 100, split_binary(body)[1])
    assert needle in e.value.message


def test_parse_infer_refuses_more_rows_than_the_limit():
    with pytest.raises(PayloadTooLarge):
        parse_infer({"inputs": tensors()}, 1)


class _Holder:
    uri = "models:/duration@production"
    active = None


class _Service:
    holder = _Holder()


@pytest.mark.parametrize("path, label, method", [
    ("/v2", "/v2", "GET"),
    ("/v2/", "/v2", "GET"),
    ("/v2/health/live", "/v2/health/live", "GET"),
    ("/v2/health/ready", "/v2/health/ready", "GET"),
    ("/v2/models/duration", "/v2/models/{name}", "GET"),
    ("/v2/models/duration/ready", "/v2/models/{name}/ready", "GET"),
    ("/v2/models/duration/infer", "/v2/models/{name}/infer", "POST"),
    ("/v2/models/duration/versions/3", "/v2/models/{name}/versions/{version}", "GET"),
    ("/v2/models/duration/versions/3/ready", "/v2/models/{name}/versions/{version}/ready", "GET"),
    ("/v2/models/duration/versions/3/infer", "/v2/models/{name}/versions/{version}/infer",
     "POST"),
])
def test_route_maps_paths_to_bounded_endpoint_labels(path, label, method):
    got_label, got_method, _ = V2(_Service()).route(path)
    assert (got_label, got_method) == (label, method)


@pytest.mark.parametrize("path", ["/v2/models", "/v2/models/", "/v2/models/duration/predict",
                                  "/v2/models/duration/versions", "/v2/health",
                                  "/v2/models/duration/versions/3/infer/x"])
def test_route_rejects_other_paths(path):
    with pytest.raises(NotFound):
        V2(_Service()).route(path)


def test_the_served_name_comes_from_the_uri_before_the_first_load():
    assert V2(_Service()).served_name() == "duration"
