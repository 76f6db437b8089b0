"""Months, TLC file names, and where each month's output lands (pure string work)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

from serve.errors import InvalidInput

PREDICTIONS_FILE = "predictions.parquet"
REJECTS_FILE = "rejects.parquet"
REJECTS_DIR = "_rejects"
TAXI_TYPES = ("green", "yellow")  # the TLC trip records that carry trip_distance
NO_DISTANCE = ("fhv", "fhvhv")  # TLC for-hire vehicle records: no trip_distance column
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
# A TLC file name, or a backfill template of one (`yellow_tripdata_{month}.parquet`).
_TLC_NAME = re.compile(
    r"(?P<taxi>green|yellow|fhvhv|fhv)_tripdata_(?P<month>\d{4}-\d{2}|\{month\})")


def parse_month(month: str, option: str = "--month") -> tuple[int, int]:
    """``"2021-03"`` -> ``(2021, 3)``; raises InvalidInput naming the option."""
    m = _MONTH.match(month or "")
    if not m or not 1 <= int(m[2]) <= 12:
        raise InvalidInput(f"{option} must be YYYY-MM, got {month!r}", field=option)
    return int(m[1]), int(m[2])


def check_taxi_type(taxi: str, option: str = "--taxi-type") -> str:
    """``taxi`` if it can be scored; InvalidInput explaining why fhv/fhvhv cannot."""
    if taxi in NO_DISTANCE:
        raise InvalidInput(f"{option} {taxi}: TLC {taxi} trip records have no trip_distance, "
                           f"which the model needs; only {' and '.join(TAXI_TYPES)} months "
                           f"can be scored", field=option)
    if taxi not in TAXI_TYPES:
        raise InvalidInput(f"{option} must be one of {', '.join(TAXI_TYPES)}, got {taxi!r}",
                           field=option)
    return taxi


def month_range(first: str, last: str) -> list[str]:
    """Months from ``first`` to ``last`` inclusive, e.g. ``2021-11..2022-01``."""
    (y0, m0), (y1, m1) = parse_month(first, "--from"), parse_month(last, "--to")
    start, end = y0 * 12 + m0 - 1, y1 * 12 + m1 - 1
    if end < start:
        raise InvalidInput(f"--to {last} is before --from {first}", field="--to")
    return [f"{i // 12:04d}-{i % 12 + 1:02d}" for i in range(start, end + 1)]


def infer_from_name(uri: str) -> tuple[str | None, str | None]:
    """Taxi type and month from a TLC-style name (``green_tripdata_2021-03``) or a DB URL."""
    m = _TLC_NAME.search(uri)
    taxi, month = (m["taxi"], m["month"]) if m else (None, None)
    if month == "{month}":  # a backfill template names the taxi type, not the month
        month = None
    if is_database(uri):
        month = dict(parse_qsl(urlparse(uri).query)).get("month", month)
    return taxi, month


def is_database(uri: str) -> bool:
    """Whether ``uri`` is a SQLAlchemy PostgreSQL URL (a table input)."""
    return urlparse(uri).scheme.startswith("postgresql")


def join_uri(root: str, *parts: str) -> str:
    """``root/part/...`` for a local folder or an ``s3://`` prefix."""
    return "/".join([root.rstrip("/"), *parts])


def partition(taxi: str, month: str) -> str:
    """The hive-style partition folder of one month."""
    year, mm = parse_month(month)
    return f"taxi_type={taxi}/year={year:04d}/month={mm:02d}"


def predictions_uri(output: str, taxi: str, month: str) -> str:
    """Where the predictions of one month land."""
    return join_uri(output, partition(taxi, month), PREDICTIONS_FILE)


def rejects_uri(output: str, taxi: str, month: str) -> str:
    """Where the rejected rows of one month land (``_`` keeps them out of dataset reads)."""
    return join_uri(output, REJECTS_DIR, partition(taxi, month), REJECTS_FILE)


def ride_id_prefix(month: str) -> str:
    """The course's ride id prefix, ``"2021/03_"``."""
    year, mm = parse_month(month)
    return f"{year:04d}/{mm:02d}_"


def month_input(template: str | None, taxi_type: str, month: str) -> str:
    """The input of one month: the template with ``{month}``/``{taxi}``, or the TLC URL."""
    from serve.tlc import tlc_url

    if not template:
        return tlc_url(taxi_type, month)
    if is_database(template) and "{month}" not in template:
        # A table holds every month: select this one by the month parameter.
        parsed = urlparse(template)
        query = {**dict(parse_qsl(parsed.query)), "month": month}
        return urlunparse(parsed._replace(query=urlencode(query)))
    return template.replace("{month}", month).replace("{taxi}", taxi_type)
