"""Throughput of the synthetic TLC month generator: ``python bench/synth.py [--rows 3000000]``."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import pyarrow.parquet as pq

from ops.synth import write_month


@click.command()
@click.option("--rows", type=int, default=3_000_000, show_default=True, help="Rows in the month.")
@click.option("--taxi", type=click.Choice(["green", "yellow"]), default="yellow",
              show_default=True, help="Taxi type (schema).")
def main(rows: int, taxi: str) -> None:
    """Generate one month to a temporary parquet file and print rows/s."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "month.parquet"
        t0 = time.perf_counter()
        write_month(taxi, "2021-03", rows, out)
        dt = time.perf_counter() - t0
        meta = pq.read_metadata(out)
        size = out.stat().st_size / 2**20
    click.echo(f"synth {taxi} {meta.num_rows:,} rows x {meta.num_columns} cols, {size:.0f} MiB: "
               f"{dt:.2f} s, {meta.num_rows / dt:,.0f} rows/s")


if __name__ == "__main__":
    main()
