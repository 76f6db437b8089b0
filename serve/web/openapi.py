"""``GET /openapi.json``: the OpenAPI 3.0 document of every endpoint and error shape.

Hand-written next to the code it describes (the app is raw ASGI, nothing generates it);
``tests/test_web_openapi.py`` holds it to the truth: every route of the app is in it, and
schemathesis sends it generated requests and checks every answer against it.
"""

from __future__ import annotations

import json

from serve.features import MAX_LOCATION, MIN_LOCATION
from serve.web.v2 import FLOAT_TYPES, INPUTS, OUTPUT

MAX_FLOAT = 1.7976931348623157e308
JSON = "application/json"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], optional: dict | None = None, extra: bool = False,
         **properties) -> dict:
    props = {**properties, **(optional or {})}
    return {"type": "object", "required": required, "properties": props,
            "additionalProperties": extra}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {JSON: {"schema": schema}}}


ERRORS = {  # status -> what it means, on every endpoint that can answer it
    400: "Invalid request: bad JSON, a wrong type or value, naming the field.",
    404: "No such model name or version.",
    408: "The request did not arrive whole within the read timeout (REQUEST_TIMEOUT).",
    413: "Too many rows or too large a body.",
    415: "Unsupported Content-Type.",
    500: "The model failed on a valid input (MODEL_ERROR); details in the service log.",
    503: "No model loaded yet (MODEL_NOT_READY), overloaded (OVERLOADED, QUEUE_FULL) or "
         "shutting down (SHUTTING_DOWN); OVERLOADED, QUEUE_FULL and SHUTTING_DOWN carry "
         "Retry-After.",
}
ID = {"type": "integer", "minimum": MIN_LOCATION, "maximum": MAX_LOCATION}
DISTANCE = {"type": "number", "minimum": 0, "maximum": MAX_FLOAT}


def _schemas(max_rows: int) -> dict:
    ride = _obj(["PULocationID", "DOLocationID", "trip_distance"], extra=True,
                PULocationID=ID, DOLocationID=ID, trip_distance=DISTANCE)
    rides = {"type": "array", "items": _ref("Ride"), "minItems": 1, "maxItems": max_rows}
    column = lambda item: {"type": "array", "items": item, "minItems": 1,  # noqa: E731
                           "maxItems": max_rows}
    columnar = _obj(["PULocationID", "DOLocationID", "trip_distance"], PULocationID=column(ID),
                    DOLocationID=column(ID), trip_distance=column(DISTANCE))
    params = {"params": {"type": "object"}}
    tensor = _obj(["name", "shape", "datatype"], {
        "data": {"type": "array"}, "parameters": {"type": "object"}}, extra=True,
        name={"type": "string", "enum": [c for c, _ in INPUTS]},
        datatype={"type": "string", "enum": sorted(FLOAT_TYPES)},
        shape={"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2})
    io = _obj(["name", "datatype", "shape"], name={"type": "string"},
              datatype={"type": "string"}, shape={"type": "array", "items": {"type": "integer"}})
    return {
        "Ride": ride,
        "PredictRequest": {"anyOf": [_ref("Ride"), _obj(["rides"], extra=True, rides=rides)]},
        "Duration": _obj(["duration", "model_version"], duration={"type": "number"},
                         model_version={"type": "string"}),
        "Durations": _obj(["predictions", "model_version"], model_version={"type": "string"},
                          predictions={"type": "array", "items": _obj(
                              ["duration"], duration={"type": "number"})}),
        "InvocationsRequest": {"oneOf": [
            _obj(["dataframe_records"], params, dataframe_records=rides),
            _obj(["dataframe_split"], params, dataframe_split=_obj(
                ["columns", "data"], {"index": {"type": "array"}},
                columns={"type": "array", "items": {"type": "string"}},
                data={"type": "array", "items": {"type": "array"}, "minItems": 1,
                      "maxItems": max_rows})),
            _obj(["instances"], params, instances={"oneOf": [rides, columnar]}),
            _obj(["inputs"], params, inputs={"oneOf": [rides, columnar]}),
        ]},
        "Predictions": _obj(["predictions"], predictions={"type": "array",
                                                          "items": {"type": "number"}}),
        "Error": _obj(["error_code", "message"], error_code={"type": "string"},
                      message={"type": "string"}),
        "V2Error": _obj(["error"], error={"type": "string"}),
        "Status": _obj(["status"], status={"type": "string", "enum": ["ok"]}),
        "Ready": _obj(["status", "model_version"], status={"type": "string", "enum": ["ready"]},
                      model_version={"type": "string"}),
        "Version": _obj(["model_uri", "pinned_uri", "name", "version", "run_id", "loaded_at",
                         "mlflow_version"], **{k: {"type": "string", "nullable": True} for k in (
                             "model_uri", "pinned_uri", "name", "version", "run_id",
                             "loaded_at", "mlflow_version")}),
        "V2Server": _obj(["name", "version", "extensions"], name={"type": "string"},
                         version={"type": "string"},
                         extensions={"type": "array", "items": {"type": "string"}}),
        "V2Live": _obj(["live"], live={"type": "boolean"}),
        "V2Ready": _obj(["ready"], ready={"type": "boolean"}),
        "V2ModelReady": _obj(["name", "ready"], name={"type": "string"},
                             ready={"type": "boolean"}),
        "V2Metadata": _obj(["name", "versions", "platform", "inputs", "outputs"],
                           name={"type": "string"}, platform={"type": "string"},
                           versions={"type": "array", "items": {"type": "string"}},
                           inputs={"type": "array", "items": io},
                           outputs={"type": "array", "items": io}),
        "V2InferRequest": _obj(["inputs"], {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "outputs": {"type": "array", "items": _obj(["name"], {"parameters": {
                "type": "object"}}, name={"type": "string", "enum": [OUTPUT]})}},
            inputs={"type": "array", "items": tensor, "minItems": 1}),
        "V2InferResponse": _obj(["model_name", "model_version", "outputs"],
                                {"id": {"type": "string"}}, model_name={"type": "string"},
                                model_version={"type": "string"},
                                outputs={"type": "array", "items": _obj(
                                    ["name", "datatype", "shape", "data"],
                                    name={"type": "string"}, datatype={"type": "string"},
                                    shape={"type": "array", "items": {"type": "integer"}},
                                    data={"type": "array", "items": {"type": "number"}})}),
    }


def _op(summary: str, ok: dict, errors: tuple[int, ...] = (), body: dict | None = None,
        error: str = "Error", params: tuple[str, ...] = ()) -> dict:
    op = {"summary": summary, "responses": {"200": ok, **{
        str(code): _json(_ref(error), ERRORS[code]) for code in errors}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True,
                             "schema": {"type": "string"}} for p in params]
    return op


def _v2_model_paths(base: str, params: tuple[str, ...]) -> dict:
    v2_body = {JSON: {"schema": _ref("V2InferRequest")}}
    return {
        base: {"get": _op("V2 model metadata: the tensors the model takes and gives.",
                          _json(_ref("V2Metadata"), "Metadata."), (404, 503), error="V2Error",
                          params=params)},
        f"{base}/ready": {"get": _op("V2 model readiness.",
                                     _json(_ref("V2ModelReady"), "Ready."), (404, 503),
                                     error="V2Error", params=params)},
        f"{base}/infer": {"post": _op(
            "V2 inference: one tensor per ride column, shape [N] or [N, 1] (JSON data, or "
            "Triton's binary tensor extension).", _json(_ref("V2InferResponse"), "Minutes."),
            (400, 404, 408, 413, 500, 503), v2_body, error="V2Error", params=params)},
    }


def openapi(max_rows: int) -> dict:
    """The OpenAPI 3.0 document of the service (``max_rows``: the row limit it enforces)."""
    json_errors = (400, 408, 413, 415, 500, 503)
    return {
        "openapi": "3.0.3",
        "info": {"title": "duration", "version": "0.1.0",
                 "description": "NYC taxi ride duration: our /predict, MLflow's scoring "
                                "protocol (/invocations) and the Open Inference Protocol "
                                "V2 (/v2). Inputs: " + ", ".join(
                                    f"{c} {t}" for c, t in INPUTS) + "."},
        "paths": {
            "/predict": {"post": _op(
                "One ride, or {\"rides\": [...]}: minutes and the model version.",
                {"description": "Minutes.", "content": {JSON: {"schema": {
                    "oneOf": [_ref("Duration"), _ref("Durations")]}}}}, json_errors,
                {JSON: {"schema": _ref("PredictRequest")}})},
            "/invocations": {"post": _op(
                "MLflow's scoring protocol, the same bytes as `mlflow models serve`.",
                _json(_ref("Predictions"), "Minutes, one per row."), json_errors, {
                    JSON: {"schema": _ref("InvocationsRequest")},
                    "text/csv": {"schema": {"type": "string"}},
                    "application/vnd.apache.parquet": {"schema": {"type": "string",
                                                                  "format": "binary"}}})},
            "/health": {"get": _op("Alive.", _json(_ref("Status"), "Alive."))},
            "/ping": {"get": _op("Alive (MLflow's name).", _json(_ref("Status"), "Alive."))},
            "/ready": {"get": _op("A model is loaded.", _json(_ref("Ready"), "Ready."),
                                  (503,))},
            "/version": {"get": _op("Which model answers.", _json(_ref("Version"), "Model."),
                                    (503,))},
            "/metrics": {"get": _op("Prometheus metrics.", {
                "description": "Text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}}})},
            "/openapi.json": {"get": _op("This document.", _json({"type": "object"},
                                                                 "OpenAPI 3.0."))},
            "/v2": {"get": _op("V2 server metadata.", _json(_ref("V2Server"), "Server."))},
            "/v2/health/live": {"get": _op("V2 liveness.", _json(_ref("V2Live"), "Live."))},
            "/v2/health/ready": {"get": _op("V2 readiness.", _json(_ref("V2Ready"), "Ready."),
                                            (503,), error="V2Error")},
            **_v2_model_paths("/v2/models/{model_name}", ("model_name",)),
            **_v2_model_paths("/v2/models/{model_name}/versions/{model_version}",
                              ("model_name", "model_version")),
        },
        "components": {"schemas": _schemas(max_rows)},
    }


def openapi_json(max_rows: int) -> bytes:
    """The document, encoded once."""
    return json.dumps(openapi(max_rows)).encode()
