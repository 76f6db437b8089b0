"""Reading TLC trip months from a local path, ``s3://`` or ``https://``, through one code path.

Every reader goes through :func:`open_parquet`, which returns a
``pyarrow.parquet.ParquetFile``: local files directly, S3 objects through
pyarrow's S3 filesystem (endpoint from ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` / ``MLFLOW_S3_ENDPOINT_URL``, so MinIO or moto work
unchanged) and HTTP(S) files (the public TLC URLs) downloaded once into a
cache folder with a progress bar, since parquet needs random access.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serve.atomic import atomic_path
from serve.config import cache_home
from serve.errors import InvalidInput
from serve.features import RIDE_COLUMNS, check_rides, duration_mask, ride_durations
from serve.urls import masked

log = logging.getLogger(__name__)

TLC_URL = "https://d37ci6vzurychx.cloudfront.net/trip-data/{taxi}_tripdata_{month}.parquet"
PICKUP_COLUMNS = ("lpep_pickup_datetime", "tpep_pickup_datetime", "pickup_datetime")
DROPOFF_COLUMNS = ("lpep_dropoff_datetime", "tpep_dropoff_datetime", "dropoff_datetime")


def tlc_url(taxi: str, month: str) -> str:
    """The public URL of a TLC month, e.g. ``tlc_url("green", "2021-01")``."""
    return TLC_URL.format(taxi=taxi, month=month)


def s3_endpoint() -> tuple[str | None, str]:
    """The S3 endpoint (``None``: AWS) and region from the usual environment variables, for
    every S3 client of the data paths (pyarrow's and boto3's alike)."""
    endpoint = (os.getenv("AWS_ENDPOINT_URL_S3") or os.getenv("AWS_ENDPOINT_URL")
                or os.getenv("MLFLOW_S3_ENDPOINT_URL"))
    region = os.getenv("AWS_REGION") or os.getenv("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint, region


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow S3 filesystem honouring the usual endpoint/region environment variables."""
    endpoint, region = s3_endpoint()
    return pafs.S3FileSystem(endpoint_override=endpoint, region=region,
                             allow_bucket_creation=False)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path behind a local path or an ``s3://`` URI."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return s3_filesystem(), f"{parsed.netloc}{parsed.path}"
    if parsed.scheme in ("", "file"):
        return pafs.LocalFileSystem(), str(Path(parsed.path if parsed.scheme else uri).resolve())
    raise InvalidInput(f"unsupported location {uri!r}: use a local path, s3:// or https://")


def cache_dir() -> Path:
    """Where downloaded months are kept (``DURATION_CACHE`` or ``~/.cache/duration``)."""
    return cache_home()


def download(url: str, dest_dir: Path | None = None) -> Path:
    """Download ``url`` once into the cache (atomic rename) with a progress bar on a terminal."""
    import requests
    from tqdm import tqdm

    dest_dir = dest_dir or cache_dir()
    name = Path(urlparse(url).path).name or "download"
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    dest = dest_dir / f"{digest}-{name}"
    if dest.exists():
        return dest
    # A temporary file of this download only (concurrent downloads each have their own),
    # deleted on any failure: the cache holds complete files or nothing.
    log.info("downloading %s", masked(url))
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh, \
            requests.get(url, stream=True, timeout=(10, 60)) as resp:
        if resp.status_code != 200:
            raise InvalidInput(f"cannot download {masked(url)}: HTTP {resp.status_code}")
        total = int(resp.headers.get("content-length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=name,
                  disable=not sys.stderr.isatty()) as bar:
            for chunk in resp.iter_content(chunk_size=1 << 20):
                fh.write(chunk)
                bar.update(len(chunk))
    return dest


def open_parquet(uri: str) -> pq.ParquetFile:
    """Open a parquet file from a local path, ``s3://`` URI or ``http(s)://`` URL."""
    shown = masked(uri)
    if urlparse(uri).scheme in ("http", "https"):
        import requests

        try:
            uri = str(download(uri))
        except requests.RequestException as e:  # offline, DNS, a cut connection, ...
            raise InvalidInput(f"cannot download {shown} ({type(e).__name__}): check the URL "
                               "and the network, or pass a local copy") from e
    fs, path = resolve(uri)
    try:
        # Opened by ParquetFile itself, so closing it (or leaving its `with`) closes the file.
        return pq.ParquetFile(path, filesystem=fs)
    except FileNotFoundError as e:
        raise InvalidInput(f"no such file: {shown}") from e
    except (OSError, pa.ArrowException) as e:  # 0 bytes, truncated, not parquet, no access
        raise InvalidInput(f"{shown}: not a readable parquet file: {first_line(e)}") from e


def first_line(error: BaseException) -> str:
    """The first line of an error's message (pyarrow and drivers add pages of detail)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def trip_columns(names, source: str) -> tuple[str, str]:
    """Pickup and dropoff column names among ``names`` (green ``lpep_*``, yellow ``tpep_*``),
    checking the ride columns are there too; InvalidInput naming the first missing one.
    One check for every reader: parquet files, database tables, Spark frames."""
    counts = Counter(names)
    pickup = next((c for c in PICKUP_COLUMNS if c in counts), None)
    dropoff = next((c for c in DROPOFF_COLUMNS if c in counts), None)
    if pickup is None or dropoff is None:
        raise InvalidInput(f"{source}: not TLC trips: no pickup/dropoff datetime columns in "
                           f"{sorted(counts)}", field="pickup_datetime")
    missing = [c for c in RIDE_COLUMNS if c not in counts]
    if missing:
        raise InvalidInput(f"{source}: missing column {missing[0]!r}", field=missing[0])
    for c in (pickup, dropoff, *RIDE_COLUMNS):
        if counts[c] > 1:
            raise InvalidInput(f"{source}: column {c!r} appears {counts[c]} times: which one "
                               f"holds the rides is ambiguous", field=c)
    return pickup, dropoff


def read_training_frame(uri: str) -> pd.DataFrame:
    """Rides of one month with their ``duration`` (minutes), filtered as the course does.

    Keeps rows with 1 <= duration <= 60 and valid ride fields.
    """
    with open_parquet(uri) as pf:
        pickup, dropoff = trip_columns(pf.schema_arrow.names, uri)
        df = pf.read(columns=[*RIDE_COLUMNS, pickup, dropoff]).to_pandas()
    minutes = ride_durations(df[pickup], df[dropoff])
    _, reasons = check_rides(df)
    keep = duration_mask(minutes) & (reasons == "")
    out = df.loc[keep, list(RIDE_COLUMNS)].reset_index(drop=True)
    out["PULocationID"] = out["PULocationID"].astype(np.int64)
    out["DOLocationID"] = out["DOLocationID"].astype(np.int64)
    out["duration"] = minutes[keep]
    log.info("%s: %d rows, %d kept (1 <= minutes <= 60, valid rides)", masked(uri), len(df),
             len(out))
    return out
