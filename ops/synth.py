"""TLC-schema trip months made offline: ``python -m ops.synth --taxi green --month 2021-01``.

The real NYC TLC files cannot be downloaded on every machine (CI has no
internet), so this writes a parquet file with the same columns and types as a
real green (``lpep_*``) or yellow (``tpep_*``) month, and with the structure a
model can learn and a pipeline must survive:

* the city is fixed (zone positions, popularity, congestion and per-pair
  effects come from a constant seed), so a model trained on one month
  generalizes to the next; ``--seed`` only changes which rides are drawn;
* duration is driven by distance, by the zone pair and by the hour of day
  (rush-hour speeds), with heavy-tailed noise;
* the dirt of real months: zero distances, rides under 1 minute and over an
  hour, dropoffs before pickups, nulls in the optional columns.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from serve.atomic import atomic_path
from serve.batch.months import parse_month
from serve.cli import Command
from serve.logs import setup_logging

log = logging.getLogger(__name__)

N_ZONES = 265
CITY_SEED = 265  # fixed: the "geography" is the same in every month and every seed
ROW_GROUP_SIZE = 262_144

# Share of rows carrying each kind of dirt (roughly what real green/yellow months show).
DIRT = {
    "zero_distance": 0.015,
    "under_a_minute": 0.015,
    "over_an_hour": 0.01,
    "negative_duration": 0.001,
    "null_optional": 0.05,
}

PICKUP = {"green": "lpep_pickup_datetime", "yellow": "tpep_pickup_datetime"}
DROPOFF = {"green": "lpep_dropoff_datetime", "yellow": "tpep_dropoff_datetime"}

# Relative ride intensity per hour of day and the speed (mph) traffic allows at that hour.
HOURLY_RIDES = np.array(
    [2, 1.5, 1, .8, .7, 1, 2.5, 4.5, 5.5, 5, 4.5, 4.5, 5, 5, 5.5, 6, 6.5, 7, 7, 6.5, 5.5, 5, 4, 3]
)
HOURLY_SPEED = np.array(
    [24, 25, 26, 26, 26, 24, 19, 14, 12, 13, 14, 14, 14, 14, 13, 12, 11, 11, 12, 14, 17, 19, 21, 23]
)


class City:
    """The fixed geography: zone positions, popularity, congestion and pair effects."""

    def __init__(self) -> None:
        rng = np.random.default_rng(CITY_SEED)
        # Zones spread over a ~12 x 14 mile area, denser in the middle ("Manhattan").
        centre = rng.normal(0, 1, (N_ZONES, 2)) * np.array([1.2, 2.0])
        outer = rng.uniform(-6, 7, (N_ZONES, 2))
        is_core = rng.random(N_ZONES) < 0.35
        self.xy = np.where(is_core[:, None], centre, outer)
        pop = rng.pareto(1.2, N_ZONES) + 0.05
        pop[is_core] *= 4
        self.popularity = pop / pop.sum()
        self.congestion = np.where(is_core, rng.uniform(1.2, 1.6, N_ZONES),
                                   rng.uniform(0.8, 1.1, N_ZONES))
        d = np.linalg.norm(self.xy[:, None, :] - self.xy[None, :, :], axis=-1)
        self.neighbours = np.argsort(d, axis=1)[:, 1:12]
        # Pair effects (minutes): bridges, one-way grids, pickup waits. Indexed [pu-1, do-1].
        self.pair_minutes = rng.gamma(2.0, 1.5, (N_ZONES, N_ZONES)) - 1.0
        self.distance = d


def synth_month(taxi: str, month: str, rows: int, seed: int = 0) -> pa.Table:
    """A TLC-schema table for one month (``YYYY-MM``) of ``taxi`` ('green' or 'yellow') rides."""
    if taxi not in PICKUP:
        raise click.BadParameter(f"taxi must be green or yellow, got {taxi!r}")
    year, mm = parse_month(month)  # 2021-1 or 202101 would write a name no reader finds
    start = pd.Timestamp(year=year, month=mm, day=1)
    end = start + pd.offsets.MonthBegin(1)
    city = City()
    rng = np.random.default_rng([seed, start.year, start.month, 0 if taxi == "green" else 1])
    n = rows

    # When: days uniform, hours by intensity, seconds uniform; sorted like the real files.
    days = rng.integers(0, (end - start).days, n)
    hours = rng.choice(24, n, p=HOURLY_RIDES / HOURLY_RIDES.sum())
    secs = rng.integers(0, 3600, n)
    pickup_s = np.sort(days * 86_400 + hours * 3_600 + secs)
    hours = (pickup_s // 3600) % 24

    # Where: pickup by popularity; dropoff near the pickup most of the time.
    pu = rng.choice(N_ZONES, n, p=city.popularity)
    near = rng.random(n) < 0.7
    do = np.where(near, city.neighbours[pu, rng.integers(0, city.neighbours.shape[1], n)],
                  rng.choice(N_ZONES, n, p=city.popularity))
    same = rng.random(n) < 0.08
    do[same] = pu[same]

    # How far: centroid distance with a detour factor; short hops inside a zone.
    detour = rng.lognormal(np.log(1.25), 0.15, n)
    distance = city.distance[pu, do] * detour
    distance[pu == do] = rng.exponential(0.9, int((pu == do).sum()))
    distance = np.round(distance + rng.exponential(0.2, n), 2)

    # How long: distance at the hour's speed, slowed by congestion at both ends, plus the
    # pair's own effect, with heavy-tailed noise (traffic incidents, waiting, detours).
    congestion = np.sqrt(city.congestion[pu] * city.congestion[do])
    speed = HOURLY_SPEED[hours] / congestion
    minutes = distance / speed * 60 + 2.0 + city.pair_minutes[pu, do]
    minutes *= rng.lognormal(0, 0.18, n)
    minutes += rng.standard_t(3, n) * 1.5
    minutes = np.clip(minutes, 1.05, None)

    # Dirt.
    u = rng.random(n)
    edges = np.cumsum([0.0] + [DIRT[k] for k in
                               ("zero_distance", "under_a_minute", "over_an_hour",
                                "negative_duration")])
    zero_d = (u >= edges[0]) & (u < edges[1])
    short = (u >= edges[1]) & (u < edges[2])
    long_ = (u >= edges[2]) & (u < edges[3])
    negative = (u >= edges[3]) & (u < edges[4])
    distance[zero_d] = 0.0
    minutes[short] = rng.uniform(0.0, 0.99, int(short.sum()))
    minutes[long_] = rng.uniform(61, 24 * 60, int(long_.sum()))
    minutes[negative] = -rng.uniform(1, 120, int(negative.sum()))

    pickup = start.to_datetime64().astype("datetime64[us]") + pickup_s.astype("timedelta64[s]")
    dropoff = pickup + (minutes * 60e6).astype("timedelta64[us]")

    fare = np.round(3.0 + 2.5 * distance + 0.5 * np.clip(minutes, 0, 120), 2)
    tip = np.round(np.where(rng.random(n) < 0.6, fare * rng.uniform(0.1, 0.25, n), 0.0), 2)
    tolls = np.where(rng.random(n) < 0.04, 6.55, 0.0)
    extra = np.where((hours >= 16) & (hours < 20), 1.0, np.where(hours >= 20, 0.5, 0.0))
    congestion_fee = np.where(city.congestion[pu] > 1.15, 2.75, 0.0)
    total = np.round(fare + tip + tolls + extra + 0.5 + 0.3 + congestion_fee, 2)

    nulls = rng.random(n) < DIRT["null_optional"]

    def nullable(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        return pa.array(values, type=typ, mask=nulls)

    cols = {
        "VendorID": pa.array(rng.choice([1, 2], n, p=[0.3, 0.7]), pa.int64()),
        PICKUP[taxi]: pa.array(pickup, pa.timestamp("us")),
        DROPOFF[taxi]: pa.array(dropoff, pa.timestamp("us")),
        "store_and_fwd_flag": nullable(np.where(rng.random(n) < 0.005, "Y", "N"), pa.string()),
        "RatecodeID": nullable(np.where(rng.random(n) < 0.97, 1.0, 5.0), pa.float64()),
        "PULocationID": pa.array(pu + 1, pa.int64()),
        "DOLocationID": pa.array(do + 1, pa.int64()),
        "passenger_count": nullable(rng.choice([1.0, 2.0, 3.0, 5.0], n, p=[.75, .15, .05, .05]),
                                    pa.float64()),
        "trip_distance": pa.array(distance, pa.float64()),
        "fare_amount": pa.array(fare, pa.float64()),
        "extra": pa.array(extra, pa.float64()),
        "mta_tax": pa.array(np.full(n, 0.5), pa.float64()),
        "tip_amount": pa.array(tip, pa.float64()),
        "tolls_amount": pa.array(tolls, pa.float64()),
        "improvement_surcharge": pa.array(np.full(n, 0.3), pa.float64()),
        "total_amount": pa.array(total, pa.float64()),
        "payment_type": nullable(rng.choice([1.0, 2.0], n, p=[0.6, 0.4]), pa.float64()),
        "congestion_surcharge": nullable(congestion_fee, pa.float64()),
    }
    if taxi == "green":
        cols["ehail_fee"] = pa.nulls(n, pa.float64())
        cols["trip_type"] = nullable(np.where(rng.random(n) < 0.98, 1.0, 2.0), pa.float64())
        order = ["VendorID", "lpep_pickup_datetime", "lpep_dropoff_datetime",
                 "store_and_fwd_flag", "RatecodeID", "PULocationID", "DOLocationID",
                 "passenger_count", "trip_distance", "fare_amount", "extra", "mta_tax",
                 "tip_amount", "tolls_amount", "ehail_fee", "improvement_surcharge",
                 "total_amount", "payment_type", "trip_type", "congestion_surcharge"]
    else:
        cols["airport_fee"] = nullable(np.where(rng.random(n) < 0.08, 1.25, 0.0), pa.float64())
        order = ["VendorID", "tpep_pickup_datetime", "tpep_dropoff_datetime",
                 "passenger_count", "trip_distance", "RatecodeID", "store_and_fwd_flag",
                 "PULocationID", "DOLocationID", "payment_type", "fare_amount", "extra",
                 "mta_tax", "tip_amount", "tolls_amount", "improvement_surcharge",
                 "total_amount", "congestion_surcharge", "airport_fee"]
    return pa.table({k: cols[k] for k in order})


def write_month(taxi: str, month: str, rows: int, out: str | Path, seed: int = 0) -> Path:
    """Generate one month and write it as parquet (row groups like the real files)."""
    out = Path(out)
    table = synth_month(taxi, month, rows, seed)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE)
    return out


@click.command(cls=Command)
@click.option("--taxi", type=click.Choice(["green", "yellow"]), default="green", show_default=True,
              help="Taxi type: sets the lpep_*/tpep_* schema.")
@click.option("--month", required=True, help="Month to generate, YYYY-MM.")
@click.option("--rows", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Number of rides.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for which rides are drawn (the city itself is fixed).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Output parquet path [default: data/<taxi>_tripdata_<month>.parquet].")
def main(taxi: str, month: str, rows: int, seed: int, out: str | None) -> None:
    """Write a synthetic TLC-schema month of taxi trips as parquet."""
    setup_logging("INFO")
    out = out or f"data/{taxi}_tripdata_{month}.parquet"
    t0 = time.perf_counter()
    path = write_month(taxi, month, rows, out, seed)
    dt = time.perf_counter() - t0
    log.info("wrote %s: %d rows in %.1f s (%.0f rows/s)", path, rows, dt, rows / dt)


if __name__ == "__main__":
    main()
