"""The MLflow scoring protocol (``POST /invocations``) for the ride model, without the web layer.

``mlflow models serve`` decodes every request with pandas and enforces the model
signature before predicting. We answer the common requests (the four JSON forms
holding well-typed rides) on a pandas-free fast path, and hand everything else
(CSV, parquet, strings that MLflow coerces, ``index`` keys, odd shapes) to
MLflow's own parser and the pyfunc model, so the bytes of every successful
response are MLflow's by construction. What differs is the failure side: errors
are ``{"error_code", "message"}`` and never a stack trace; a 4xx when the request is at fault,
a 500 ``MODEL_ERROR`` when the model fails on an input that passed validation. Parquet bodies
are read through :mod:`serve.parquet_body`, which checks their footer before any page.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Mapping

import numpy as np

from serve.errors import DurationError, InvalidInput, ModelFailed, UnsupportedMediaType
from serve.features import MAX_LOCATION, MIN_LOCATION, RIDE_COLUMNS, Rides, rides_from_rows
from serve.parquet_body import read_parquet_body

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_CSV = "text/csv"
CONTENT_TYPE_PARQUET = "application/vnd.apache.parquet"
CONTENT_TYPES = (CONTENT_TYPE_JSON, CONTENT_TYPE_CSV, CONTENT_TYPE_PARQUET)
INPUT_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
PARAMS_KEY = "params"
MAX_MESSAGE = 400  # MLflow echoes whole DataFrames into messages; clients need the gist
# MlflowException codes that mean the input is at fault (schema enforcement says
# INVALID_PARAMETER_VALUE); any other failure of the model is the server's.
CLIENT_ERROR_CODES = ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
MODEL_FAILED = ("the model failed on this request (a server fault, not the input); see the "
                "service log")


class MalformedRequest(InvalidInput):
    """A body that is not JSON/CSV at all, or JSON of the wrong shape."""

    error_code = "MALFORMED_REQUEST"


def media_type(content_type: str | None) -> str:
    """The mime type of a Content-Type header, checked the way MLflow's scoring server does."""
    if content_type == CONTENT_TYPE_JSON:  # what nearly every request sends: nothing to parse
        return CONTENT_TYPE_JSON
    if not content_type:
        raise UnsupportedMediaType(f"missing Content-Type header; use one of {list(CONTENT_TYPES)}")
    mime, *pairs = (p.strip() for p in content_type.split(";"))
    params = {k.strip().lower(): v.strip() for k, _, v in (p.partition("=") for p in pairs if p)}
    if params.get("charset", "utf-8").lower() != "utf-8":
        raise UnsupportedMediaType(f"only UTF-8 bodies are supported, got charset "
                                   f"{params['charset']!r}")
    unexpected = sorted(set(params) - {"charset"})
    if unexpected:
        raise UnsupportedMediaType(f"unrecognized Content-Type parameters: {', '.join(unexpected)}")
    mime = mime.lower()
    if mime not in CONTENT_TYPES:
        raise UnsupportedMediaType(f"Content-Type {content_type!r} is not supported; use one of "
                                   f"{list(CONTENT_TYPES)}")
    return mime


def decode_json(body: bytes) -> object:
    """The decoded JSON body; MalformedRequest naming the position when it is not JSON."""
    try:
        return json.loads(body)
    except UnicodeDecodeError as e:
        raise MalformedRequest(f"request body is not valid UTF-8: {e.reason} at byte {e.start}") \
            from e
    except json.JSONDecodeError as e:
        raise MalformedRequest(f"request body is not valid JSON: {e.msg} at line {e.lineno} "
                               f"column {e.colno}") from e
    except RecursionError as e:
        raise MalformedRequest("request body is not valid JSON we accept: nested too deeply") \
            from e
    except ValueError as e:  # e.g. an integer literal of more than 4300 digits
        raise MalformedRequest(f"request body is not valid JSON we accept: {e}") from e


def _fast_ride(record) -> tuple[int, int, float] | None:
    """A ride whose JSON types need no coercion, or None (then MLflow's rules decide)."""
    if type(record) is not dict:
        return None
    pu = record.get("PULocationID")
    do = record.get("DOLocationID")
    d = record.get("trip_distance")
    # type() is: bool is an int subclass and MLflow coerces it; leave that to MLflow.
    if (type(pu) is int and type(do) is int and MIN_LOCATION <= pu <= MAX_LOCATION
            and MIN_LOCATION <= do <= MAX_LOCATION and (type(d) is float or type(d) is int)
            and 0 <= d <= sys.float_info.max):  # <= max: a huge int must not overflow float()
        return pu, do, float(d)
    return None


def _records(records: list) -> Rides | None:
    if not records:
        return None  # MLflow answers an empty frame with a schema error: let it word it
    rows = []
    for record in records:
        ride = _fast_ride(record)
        if ride is None:
            return None
        rows.append(ride)
    return rides_from_rows(rows)


def _split(data) -> Rides | None:
    if type(data) is not dict or set(data) != {"columns", "data"}:
        return None
    columns, rows = data["columns"], data["data"]
    if type(columns) is not list or type(rows) is not list or not all(
            type(c) is str for c in columns) or len(set(columns)) != len(columns):
        return None
    width = len(columns)
    if any(type(row) is not list or len(row) != width for row in rows):
        return None
    return _records([dict(zip(columns, row, strict=True)) for row in rows])


def _columnar(data: dict) -> Rides | None:
    cols = [data.get(c) for c in RIDE_COLUMNS]
    if any(type(c) is not list for c in cols) or len({len(c) for c in cols}) != 1:
        return None
    return _records([dict(zip(RIDE_COLUMNS, row, strict=True)) for row in zip(*cols, strict=True)])


def fast_rides(payload) -> Rides | None:
    """Rides from a JSON scoring request when no MLflow coercion is involved, else None.

    Accepts exactly one of the four input forms (plus ``params``, which the ride
    model ignores as MLflow does) holding at least one ride with integer ids in
    range and a finite distance >= 0.
    """
    if type(payload) is not dict:
        return None
    fmt = None
    for key in payload:
        if key in INPUT_FORMATS and fmt is None:
            fmt = key
        elif key != PARAMS_KEY or type(payload[key]) is not dict:
            return None
    if fmt is None:
        return None
    data = payload[fmt]
    if fmt == "dataframe_split":
        rides = _split(data)
    elif type(data) is list:
        rides = _records(data)
    elif type(data) is dict and fmt in ("instances", "inputs") and set(data) == set(RIDE_COLUMNS):
        rides = _columnar(data)
    else:
        rides = None
    return rides if rides is not None and len(rides) else None


def encode_predictions(minutes: np.ndarray) -> bytes:
    """``{"predictions": [...]}`` byte-for-byte as MLflow writes it (default separators)."""
    return json.dumps({"predictions": minutes.tolist()}).encode()


def _short(message: str) -> str:
    """MLflow's message without the echoed DataFrame and never a traceback."""
    message = message.split("Traceback (most recent call last)")[0].strip()
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + " ..."


def mlflow_rows(payload_or_body, mime: str, input_schema, max_rows: int):
    """Decode a request the way ``mlflow models serve`` does (pandas, schema-aware); a parquet
    body of more than ``max_rows`` rows is refused from its footer."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server as ss

    try:
        if mime == CONTENT_TYPE_JSON:
            if not isinstance(payload_or_body, Mapping):
                raise MalformedRequest(
                    f"the body must be a JSON object with exactly one of {list(INPUT_FORMATS)}, "
                    f"got {type(payload_or_body).__name__}")
            keys = [k for k in payload_or_body if k in INPUT_FORMATS]
            if len(keys) != 1:
                raise MalformedRequest(
                    f"the body must have exactly one of {list(INPUT_FORMATS)}, got keys "
                    f"{sorted(payload_or_body)}")
            return ss.infer_and_parse_data({keys[0]: payload_or_body[keys[0]]}, input_schema)
        if mime == CONTENT_TYPE_CSV:
            text = payload_or_body.decode("utf-8")
            return ss.parse_csv_input(io.StringIO(text), schema=input_schema)
        columns = input_schema.input_names() if input_schema is not None else RIDE_COLUMNS
        return read_parquet_body(payload_or_body, columns, max_rows)
    except DurationError:
        raise
    except UnicodeDecodeError as e:
        raise MalformedRequest(f"request body is not valid UTF-8: {e.reason} at byte {e.start}") \
            from e
    except MlflowException as e:
        raise MalformedRequest(_short(e.message)) from e
    except Exception as e:  # noqa: BLE001 - any decoding failure is the client's body
        raise MalformedRequest(f"cannot decode the {mime} body: {type(e).__name__}: "
                               f"{_short(str(e))}") from e


def mlflow_predict(pyfunc, data) -> tuple[np.ndarray, bytes]:
    """Predict through the pyfunc model (signature enforcement included); minutes and the
    response body encoded as MLflow encodes it. InvalidInput when the input is at fault,
    ModelFailed (500) for any other failure of the model."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server as ss

    try:
        raw = pyfunc.predict(data)
    except DurationError:
        raise
    except MlflowException as e:
        if e.error_code in CLIENT_ERROR_CODES:
            raise InvalidInput(_short(e.message)) from e
        raise ModelFailed(MODEL_FAILED) from e
    except Exception as e:  # noqa: BLE001 - the input passed validation: the model is at fault
        raise ModelFailed(MODEL_FAILED) from e
    out = io.StringIO()
    ss.predictions_to_json(raw, out)
    return np.asarray(raw, dtype=np.float64), out.getvalue().encode()
