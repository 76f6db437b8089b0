"""Unit tests of serve/parquet_body.py: parquet request bodies are judged by their footer before
any page is decoded (pure logic on real parquet bytes written by pyarrow)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from serve.features import RIDE_COLUMNS
from serve.parquet_body import MAX_DECODED_BYTES, read_parquet_body
from tests.parquet_bodies import parquet_bomb, to_parquet

RIDE = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}


def test_a_small_body_claiming_millions_of_rows_is_refused_from_its_footer():
    body = parquet_bomb(2_000_000, groups=2)
    assert len(body) < 64 * 1024
    with pytest.raises(PayloadTooLarge, match="2000000 rows; the limit is 10000"):
        read_parquet_body(body, RIDE_COLUMNS, 10_000)


def test_a_normal_body_reads_the_model_columns_only():
    df = pd.DataFrame([RIDE, {**RIDE, "trip_distance": 3.5}]).assign(note=["a", "b"])
    out = read_parquet_body(to_parquet(df), RIDE_COLUMNS, 10)
    assert list(out.columns) == list(RIDE_COLUMNS)
    assert out.to_dict("records") == df[list(RIDE_COLUMNS)].to_dict("records")


def test_an_extra_string_column_is_never_decoded():
    # A 10 MB value repeated in every row: a dictionary that would decode to 100 MB.
    big = "x" * 10_000_000
    df = pd.DataFrame([RIDE] * 10).assign(blob=[big] * 10)
    body = to_parquet(df, compression="zstd")
    assert len(body) < 64 * 1024
    out = read_parquet_body(body, RIDE_COLUMNS, 100)
    assert list(out.columns) == list(RIDE_COLUMNS) and len(out) == 10


def test_a_string_model_column_is_refused_before_decoding():
    df = pd.DataFrame([{**RIDE, "PULocationID": "43"}])
    with pytest.raises(InvalidInput, match="'PULocationID'.*BYTE_ARRAY"):
        read_parquet_body(to_parquet(df), RIDE_COLUMNS, 10)


def test_a_nested_model_column_is_refused():
    table = pa.table({"PULocationID": pa.array([[43, 44]]), "DOLocationID": [151],
                      "trip_distance": [1.8]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with pytest.raises(InvalidInput, match="not a flat column"):
        read_parquet_body(buf.getvalue(), RIDE_COLUMNS, 10)


def test_pages_that_may_expand_past_the_bound_are_refused():
    # 10,000 random rides zstd-compressed: honest, but zstd's worst case is 32768x.
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"PULocationID": rng.integers(1, 266, 10_000),
                       "DOLocationID": rng.integers(1, 266, 10_000),
                       "trip_distance": rng.random(10_000) * 20})
    with pytest.raises(PayloadTooLarge, match=f"the limit is {MAX_DECODED_BYTES >> 20} MiB"):
        read_parquet_body(to_parquet(df, compression="zstd"), RIDE_COLUMNS, 10_000)
    for codec in ("snappy", None):  # bounded expansion: read
        assert len(read_parquet_body(to_parquet(df, compression=codec), RIDE_COLUMNS,
                                     10_000)) == 10_000


def test_a_codec_without_a_bound_is_refused():
    with pytest.raises(UnsupportedMediaType, match="BROTLI"):
        read_parquet_body(to_parquet(pd.DataFrame([RIDE]), compression="brotli"), RIDE_COLUMNS,
                          10)


@pytest.mark.parametrize("body", [b"", b"PAR1", b"PAR1 not parquet PAR1", b"x" * 100])
def test_garbage_is_a_client_error_naming_parquet(body):
    with pytest.raises(InvalidInput, match="parquet"):
        read_parquet_body(body, RIDE_COLUMNS, 10)

