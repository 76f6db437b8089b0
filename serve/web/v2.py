"""The Open Inference Protocol V2 (REST), as KServe, Seldon, MLServer and Triton speak it.

``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``; ``GET /v2/models/{name}[/versions/{v}]``
(metadata), ``.../ready``; ``POST .../infer`` with one tensor per ride column, shape ``[N]``
(or ``[N, 1]``, as MLServer's pandas codec sends them). ``{name}`` is the registered model's
name and ``{v}`` the version being served: any other name or version is a 404. Errors are the
spec's ``{"error": "..."}``. The request is decoded straight into :class:`Rides`, pandas-free,
so ``/infer`` costs what ``/invocations`` costs. Tensors come as JSON ``data`` or, with
Triton's binary tensor extension (``tritonclient``'s default), as raw bytes after the JSON
header; answers are always JSON, which every V2 client reads.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from functools import partial

import numpy as np

from serve.config import REGISTERED_MODEL_NAME
from serve.errors import DurationError, InvalidInput, NotFound, PayloadTooLarge
from serve.features import MAX_LOCATION, MIN_LOCATION, Rides
from serve.scoring import decode_json
from serve.web.holder import Active
from serve.web.service import Response, Scoring, Service

INPUTS = (("PULocationID", "INT64"), ("DOLocationID", "INT64"), ("trip_distance", "FP64"))
OUTPUT = "predicted_duration"
INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"}) | INT_TYPES
NUMPY_TYPES = {"INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "UINT8": "<u1",
               "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2", "FP32": "<f4",
               "FP64": "<f8"}
MAX_FLOAT = sys.float_info.max
INFER = "/v2/models/{name}/infer"  # the endpoint label in metrics and the prediction log
_MODEL_NAME = re.compile(r"^models:/(?P<name>[^/@]+)")


def v2_error_response(err: DurationError) -> Response:
    """The spec's error body ``{"error": "..."}`` with the error's status."""
    return Response(err.status_code, json.dumps({"error": err.message}).encode())


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} chars)"


def _bad(col: str, message: str) -> InvalidInput:
    return InvalidInput(f"input {col!r}: {message}", field=col)


def _tensor(tensor: dict, col: str, datatype: str, max_rows: int,
            blob: bytes | None = None) -> np.ndarray:
    """One validated ride column from a V2 input tensor: JSON data, shape [N] or [N, 1], or
    raw little-endian bytes (``blob``, the binary tensor extension)."""
    if blob is not None:
        return _binary_column(tensor, col, datatype, max_rows, blob)
    shape, data = tensor.get("shape"), tensor.get("data")
    if not (type(shape) is list and type(data) is list and len(shape) == 1
            and type(shape[0]) is int and shape[0] == len(data) and 0 < len(data) <= max_rows
            and tensor.get("datatype") == datatype and "parameters" not in tensor):
        data = _flat_data(tensor, col, datatype, max_rows)
    # Plain comparisons, no numpy: a one-ride request must cost what /invocations costs. They
    # are false for NaN, and compare a 400-digit integer exactly instead of overflowing.
    if len(data) == 1:  # one ride: skip the generators
        v = data[0]
        if datatype == "INT64" and type(v) is int and MIN_LOCATION <= v <= MAX_LOCATION:
            return np.array(data, dtype=np.int64)
        if datatype == "FP64" and (type(v) is float or type(v) is int) and 0 <= v <= MAX_FLOAT:
            return np.array(data, dtype=np.float64)
    if datatype == "INT64":
        if not all(type(v) is int and MIN_LOCATION <= v <= MAX_LOCATION for v in data):
            bad = next(v for v in data if not (type(v) is int
                                               and MIN_LOCATION <= v <= MAX_LOCATION))
            raise _bad(col, f"must hold integers in {MIN_LOCATION}..{MAX_LOCATION}, got "
                            f"{_shown(bad)}")
        return np.array(data, dtype=np.int64)
    if not all((type(v) is float or type(v) is int) and 0 <= v <= MAX_FLOAT for v in data):
        bad = next(v for v in data if not ((type(v) is float or type(v) is int)
                                           and 0 <= v <= MAX_FLOAT))
        raise _bad(col, f"must hold finite numbers >= 0, got {_shown(bad)}")
    return np.array(data, dtype=np.float64)


def _shape_and_type(tensor: dict, col: str, datatype: str, max_rows: int) -> tuple[int, str]:
    """Rows and datatype of a tensor, checked: shape [N] or [N, 1], a numeric datatype."""
    shape = tensor.get("shape")
    if (type(shape) is not list or len(shape) not in (1, 2) or any(type(d) is not int
            for d in shape) or shape[0] < 1 or shape[1:] not in ([], [1])):
        raise _bad(col, f"shape must be [N] or [N, 1] with N >= 1, got {_shown(shape)}")
    if shape[0] > max_rows:
        raise PayloadTooLarge(f"{shape[0]} rows in one request; the limit is {max_rows}")
    kind = tensor.get("datatype")
    if kind not in (INT_TYPES if datatype == "INT64" else FLOAT_TYPES):
        raise _bad(col, f"datatype must be {datatype}, got {_shown(kind)}")
    return shape[0], kind


def _flat_data(tensor: dict, col: str, datatype: str, max_rows: int) -> list:
    """The data list of any JSON tensor form we accept (shape [N, 1], nested data, another
    numeric datatype, parameters), or the error that names what is off."""
    params = tensor.get("parameters")
    if params is not None and type(params) is not dict:
        raise _bad(col, "'parameters' must be a JSON object")
    if params and "binary_data_size" in params:
        raise _bad(col, "binary_data_size is set but no binary data follows the JSON")
    n, _ = _shape_and_type(tensor, col, datatype, max_rows)
    data = tensor.get("data")
    if type(data) is not list:
        raise _bad(col, f"'data' must be a JSON list, got {type(data).__name__}")
    if data and type(data[0]) is list:  # nested as the shape [N, 1]
        if not all(type(row) is list and len(row) == 1 for row in data):
            raise _bad(col, f"nested data must match the shape {tensor['shape']}")
        data = [row[0] for row in data]
    if len(data) != n:
        raise _bad(col, f"shape {tensor['shape']} needs {n} elements, got {len(data)}")
    return data


def _binary_column(tensor: dict, col: str, datatype: str, max_rows: int,
                   blob: bytes) -> np.ndarray:
    n, kind = _shape_and_type(tensor, col, datatype, max_rows)
    dtype = np.dtype(NUMPY_TYPES[kind])
    if len(blob) != n * dtype.itemsize:
        raise _bad(col, f"binary_data_size {len(blob)} does not hold {n} {kind} values")
    arr = np.frombuffer(blob, dtype=dtype)
    if datatype == "INT64":
        bad = (arr < MIN_LOCATION) | (arr > MAX_LOCATION)
        if bad.any():
            raise _bad(col, f"must hold integers in {MIN_LOCATION}..{MAX_LOCATION}, got "
                            f"{arr[np.argmax(bad)].item()!r}")
        return arr.astype(np.int64)
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        raise _bad(col, f"must hold finite numbers >= 0, got {arr[np.argmax(bad)].item()!r}")
    return arr


def split_binary(body: bytes) -> tuple[object, bytes]:
    """The JSON header and the raw tensor bytes after it (Triton's binary tensor extension;
    the header's end is found by parsing it, as its length header says)."""
    try:
        _, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))  # 1 char per byte
    except ValueError:
        return decode_json(body), b""  # not a JSON prefix either: the usual error
    return decode_json(body[:end]), body[end:]


def _binary_parts(inputs: list, blob: bytes) -> list[bytes | None]:
    """Each input's slice of the raw bytes (None for a JSON input), in request order."""
    parts, offset = [], 0
    for i, tensor in enumerate(inputs):
        params = tensor.get("parameters") if type(tensor) is dict else None
        size = params.get("binary_data_size") if type(params) is dict else None
        if size is None:
            parts.append(None)
            continue
        if type(size) is not int or size < 0 or offset + size > len(blob):
            raise InvalidInput(f"inputs[{i}]: binary_data_size {size!r} is past the "
                               f"{len(blob)} bytes of binary data")
        parts.append(blob[offset:offset + size])
        offset += size
    if offset != len(blob):
        raise InvalidInput(f"{len(blob) - offset} bytes of binary data belong to no input")
    return parts


def parse_infer(payload, max_rows: int, blob: bytes = b"") -> tuple[Rides, str | None]:
    """Rides and request id of a V2 inference request (``blob``: the raw bytes after a binary
    request's JSON header); InvalidInput naming what is wrong."""
    if type(payload) is not dict:
        raise InvalidInput(f"the body must be a JSON object with 'inputs', got "
                           f"{type(payload).__name__}")
    rid = payload.get("id")
    if rid is not None and type(rid) is not str:
        raise InvalidInput(f"'id' must be a string, got {type(rid).__name__}")
    params = payload.get("parameters")
    if params is not None and type(params) is not dict:
        raise InvalidInput("'parameters' must be a JSON object")
    content_type = (params or {}).get("content_type")
    if content_type not in (None, "pd"):
        raise InvalidInput(f"request content_type {content_type!r} is not supported: send one "
                           f"tensor per column, with content_type 'pd' or none")
    outputs = payload.get("outputs")
    if outputs is not None and (type(outputs) is not list or any(
            type(o) is not dict or o.get("name") != OUTPUT for o in outputs)):
        raise InvalidInput(f"'outputs' may only name {OUTPUT!r}, got {outputs!r}"[:300])
    inputs = payload.get("inputs")
    if type(inputs) is not list or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors, one per column: "
                           + ", ".join(c for c, _ in INPUTS))
    parts = _binary_parts(inputs, blob) if blob else None
    by_name: dict[str, tuple[dict, bytes | None]] = {}
    for i, tensor in enumerate(inputs):
        name = tensor.get("name") if type(tensor) is dict else None
        if type(name) is not str:
            raise InvalidInput(f"inputs[{i}] must be a tensor object with a 'name'")
        if name in by_name:
            raise InvalidInput(f"input {name!r} is given twice", field=name)
        by_name[name] = tensor, parts and parts[i]  # other columns are ignored, as everywhere
    columns = []
    for col, datatype in INPUTS:
        if col not in by_name:
            raise InvalidInput(f"missing input {col!r} (the model takes "
                               f"{', '.join(c for c, _ in INPUTS)})", field=col)
        tensor, part = by_name[col]
        columns.append(_tensor(tensor, col, datatype, max_rows, part))
    if len({len(c) for c in columns}) != 1:
        sizes = ", ".join(f"{c} {len(a)}" for (c, _), a in zip(INPUTS, columns, strict=True))
        raise InvalidInput(f"inputs must have the same length: {sizes}")
    return Rides(*columns), rid


def _answer(name: str, version: str | None, rid: str | None, active: Active,
            minutes: np.ndarray) -> bytes:
    if version is not None and version != active.version:  # swapped while it waited
        raise NotFound(f"version {version!r} of model {name!r} is no longer served; "
                       f"version {active.version} is")
    # Spliced, not json.dumps of nested dicts: this is most of a one-ride answer's cost.
    head = json.dumps({"model_name": name, "model_version": active.version,
                       **({"id": rid} if rid is not None else {})})[:-1].encode()
    return b"".join((head, b', "outputs": [{"name": "', OUTPUT.encode(),
                     b'", "datatype": "FP64", "shape": [', str(len(minutes)).encode(),
                     b'], "data": ', json.dumps(minutes.tolist()).encode(), b"}]}"))


class V2:
    """The V2 endpoints over a :class:`Service`: routing of the templated paths, and handlers."""

    def __init__(self, service: Service, server_version: str = "0.1.0"):
        self.service = service
        self.server_version = server_version
        self._routes: dict[str, tuple[str, str, Callable]] = {}  # paths seen, bounded

    def route(self, path: str) -> tuple[str, str, Callable]:
        """``(endpoint label, method, handler)`` of a ``/v2`` path; NotFound if there is none."""
        found = self._routes.get(path)
        if found is None:
            if len(self._routes) >= 64:  # clients choose the paths: keep the memo small
                self._routes.clear()
            found = self._routes[path] = self._route(path)
        return found

    def _route(self, path: str) -> tuple[str, str, Callable]:
        rest = path.split("/")[2:]
        if rest in ([], [""]):
            return "/v2", "GET", self.server_metadata
        if rest == ["health", "live"]:
            return path, "GET", self.live
        if rest == ["health", "ready"]:
            return path, "GET", self.ready
        if len(rest) >= 2 and rest[0] == "models" and rest[1]:
            name, tail, version, label = rest[1], rest[2:], None, "/v2/models/{name}"
            if len(tail) >= 2 and tail[0] == "versions" and tail[1]:
                version, tail, label = tail[1], tail[2:], label + "/versions/{version}"
            if not tail:
                return label, "GET", partial(self.metadata, name, version)
            if tail == ["ready"]:
                return label + "/ready", "GET", partial(self.model_ready, name, version)
            if tail == ["infer"]:
                return label + "/infer", "POST", partial(self.infer, name, version)
        raise NotFound(f"no V2 endpoint {path!r}; try GET /v2, /v2/health/live, "
                       f"/v2/health/ready, /v2/models/{{name}}[/versions/{{v}}][/ready], "
                       f"POST /v2/models/{{name}}[/versions/{{v}}]/infer")

    def served_name(self) -> str:
        """The registered model's name (from the URI until the first load)."""
        active = self.service.holder.active
        if active is not None:
            return active.loaded.ref.name or REGISTERED_MODEL_NAME
        m = _MODEL_NAME.match(self.service.holder.uri)
        return m["name"] if m else REGISTERED_MODEL_NAME

    def _model(self, name: str, version: str | None) -> Active:
        served = self.served_name()
        if name != served:
            raise NotFound(f"model {name!r} is not served here; this server serves {served!r}")
        active = self.service.holder.require()
        if version is not None and version != active.version:
            raise NotFound(f"version {version!r} of model {name!r} is not served; "
                           f"version {active.version} is")
        return active

    def server_metadata(self) -> Response:
        """``GET /v2``: name, version and extensions of the server."""
        return Response(200, json.dumps({"name": "duration", "version": self.server_version,
                                         "extensions": []}).encode())

    def live(self) -> Response:
        """``GET /v2/health/live``: 200 while the process serves."""
        return Response(200, b'{"live": true}')

    def ready(self) -> Response:
        """``GET /v2/health/ready``: 200 once the model is loaded, 503 before."""
        self.service.holder.require()
        return Response(200, b'{"ready": true}')

    def model_ready(self, name: str, version: str | None) -> Response:
        """``GET /v2/models/{name}[/versions/{v}]/ready``."""
        self._model(name, version)
        return Response(200, json.dumps({"name": name, "ready": True}).encode())

    def metadata(self, name: str, version: str | None) -> Response:
        """``GET /v2/models/{name}[/versions/{v}]``: the tensors the model takes and gives."""
        active = self._model(name, version)
        return Response(200, json.dumps({
            "name": name, "versions": [active.version], "platform": "mlflow",
            "inputs": [{"name": c, "datatype": t, "shape": [-1]} for c, t in INPUTS],
            "outputs": [{"name": OUTPUT, "datatype": "FP64", "shape": [-1]}],
        }).encode())

    def infer(self, name: str, version: str | None, body: bytes,
              content_type: str | None) -> Scoring:
        """``POST /v2/models/{name}[/versions/{v}]/infer``: rides as tensors in, minutes out."""
        self._model(name, version)
        try:
            payload, blob = decode_json(body), b""
        except InvalidInput:  # maybe a JSON header followed by raw tensor bytes
            payload, blob = split_binary(body)
        rides, rid = parse_infer(payload, self.service.settings.web_max_rows, blob)
        return Scoring(INFER, rides, partial(_answer, name, version, rid))
