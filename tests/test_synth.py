"""The synthetic TLC months: real schema, the dirt real months have, determinism."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ops import synth
from serve.features import duration_mask, ride_durations

COMMON = {"VendorID": pa.int64(), "PULocationID": pa.int64(), "DOLocationID": pa.int64(),
          "trip_distance": pa.float64(), "passenger_count": pa.float64(),
          "RatecodeID": pa.float64(), "store_and_fwd_flag": pa.string(),
          "fare_amount": pa.float64(), "total_amount": pa.float64()}


@pytest.fixture(scope="module")
def green() -> pd.DataFrame:
    return synth.synth_month("green", "2021-02", 50_000, seed=3).to_pandas()


@pytest.mark.parametrize(("taxi", "prefix"), [("green", "lpep"), ("yellow", "tpep")])
def test_schema_matches_tlc(taxi, prefix):
    table = synth.synth_month(taxi, "2021-01", 1000)
    for name, typ in COMMON.items():
        assert table.schema.field(name).type == typ, name
    for col in (f"{prefix}_pickup_datetime", f"{prefix}_dropoff_datetime"):
        assert pa.types.is_timestamp(table.schema.field(col).type)
    assert ("ehail_fee" in table.schema.names) == (taxi == "green")
    assert ("airport_fee" in table.schema.names) == (taxi == "yellow")


def test_pickups_inside_the_month_and_sorted(green):
    pickup = green["lpep_pickup_datetime"]
    assert pickup.min() >= pd.Timestamp("2021-02-01")
    assert pickup.max() < pd.Timestamp("2021-03-01")
    assert pickup.is_monotonic_increasing


def test_dirt_of_real_months_is_present(green):
    minutes = ride_durations(green["lpep_pickup_datetime"], green["lpep_dropoff_datetime"])
    n = len(green)
    assert (green["trip_distance"] == 0).sum() > 0.005 * n
    assert ((minutes >= 0) & (minutes < 1)).sum() > 0.005 * n
    assert (minutes > 60).sum() > 0.005 * n
    assert (minutes < 0).sum() > 0
    assert green["passenger_count"].isna().sum() > 0.02 * n
    assert green["store_and_fwd_flag"].isna().sum() > 0.02 * n
    kept = duration_mask(minutes).mean()
    assert 0.9 < kept < 0.99  # the filter matters, but most rides survive it


def test_duration_driven_by_distance_and_hour(green):
    minutes = ride_durations(green["lpep_pickup_datetime"], green["lpep_dropoff_datetime"])
    ok = duration_mask(minutes)
    df = green[ok].assign(minutes=minutes[ok])
    assert df["minutes"].corr(df["trip_distance"]) > 0.5
    # per mile, rush hour (17-18h) is slower than the night (2-4h)
    hour = df["lpep_pickup_datetime"].dt.hour
    per_mile = df["minutes"] / df["trip_distance"].clip(lower=0.5)
    assert per_mile[hour.isin([17, 18])].median() > 1.3 * per_mile[hour.isin([2, 3, 4])].median()


def test_deterministic_for_a_seed():
    a = synth.synth_month("yellow", "2021-03", 5000, seed=7)
    b = synth.synth_month("yellow", "2021-03", 5000, seed=7)
    c = synth.synth_month("yellow", "2021-03", 5000, seed=8)
    assert a.equals(b)
    assert not a.equals(c)


def test_cli_writes_parquet(tmp_path):
    out = tmp_path / "m.parquet"
    res = CliRunner().invoke(synth.main, ["--taxi", "yellow", "--month", "2022-12", "--rows",
                                          "1234", "--out", str(out)])
    assert res.exit_code == 0, res.output
    meta = pq.read_metadata(out)
    assert meta.num_rows == 1234
    assert "tpep_pickup_datetime" in meta.schema.names


@pytest.mark.parametrize(("taxi", "prefix"), [("green", "lpep"), ("yellow", "tpep")])
def test_every_reader_finds_the_trip_columns_of_both_schemas(taxi, prefix):
    from serve.errors import InvalidInput
    from serve.tlc import trip_columns

    names = synth.synth_month(taxi, "2021-01", 10).schema.names
    assert trip_columns(names, "m") == (f"{prefix}_pickup_datetime", f"{prefix}_dropoff_datetime")
    with pytest.raises(InvalidInput, match="missing column 'DOLocationID'"):
        trip_columns([n for n in names if n != "DOLocationID"], "m")
    with pytest.raises(InvalidInput, match="no pickup/dropoff"):
        trip_columns(["PULocationID", "DOLocationID", "trip_distance"], "m")
