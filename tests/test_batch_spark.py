"""``--engine spark``: the same month on Spark (local[2]) gives the local engine's output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ops.synth import synth_month
from serve.batch.run import score_month
from serve.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[1]
pyspark = pytest.importorskip("pyspark")

pytestmark = [pytest.mark.spark, pytest.mark.integration]


@pytest.fixture(scope="session")
def spark():
    from serve.batch.spark import spark_session

    session = spark_session("local[2]", "duration-batch-test")
    yield session
    session.stop()


def test_spark_engine_output_equals_local_engine(tmp_path, registered_model, spark):
    # A small month with planted bad rows, so both engines also reject the same rows.
    df = synth_month("green", "2021-06", 3_000, seed=6).to_pandas()
    df["PULocationID"] = df["PULocationID"].astype("float64")
    df.loc[[5, 6], "PULocationID"] = [0, np.nan]
    df.loc[7, "trip_distance"] = -1.0
    src = tmp_path / "green_tripdata_2021-06.parquet"
    df.to_parquet(src)
    model_uri = f"models:/duration/{registered_model['version']}"

    local = score_month(model_uri, str(src), str(tmp_path / "local"), "green", "2021-06",
                        evaluate=False)
    on_spark = score_month(model_uri, str(src), str(tmp_path / "spark"), "green",
                           "2021-06", engine="spark", evaluate=True, spark=spark)

    # same partition path under each root, same columns and types, same values
    assert on_spark.predictions.replace("/spark/", "/local/") == local.predictions
    a, b = pq.read_table(local.predictions), pq.read_table(on_spark.predictions)
    assert b.schema.names == a.schema.names
    assert [f.type for f in b.schema] == [f.type for f in a.schema]
    pd.testing.assert_frame_equal(b.to_pandas(), a.to_pandas(), check_exact=False, rtol=0,
                                  atol=1e-9)
    ra, rb = pq.read_table(local.rejects).to_pandas(), pq.read_table(on_spark.rejects).to_pandas()
    pd.testing.assert_frame_equal(rb, ra)
    assert len(ra) == 3
    for k, v in local.metrics.items():
        assert on_spark.metrics[k] == pytest.approx(v, rel=1e-9), k
    assert on_spark.run_id is not None  # the evaluation run is logged for Spark too


def test_spark_engine_stops_only_the_session_it_started(tmp_path, spark):
    from serve.batch.spark import score_with_spark

    # Fails right after the session is up (no trip_distance): no model needed.
    bad = tmp_path / "green_tripdata_2021-06.parquet"
    synth_month("green", "2021-06", 50, seed=6).to_pandas().drop(
        columns="trip_distance").to_parquet(bad)
    args = (None, str(bad), "2021-06", str(tmp_path / "p.parquet"), str(tmp_path / "r.parquet"))
    # A session already running in the process is used and left running ...
    with pytest.raises(InvalidInput, match="trip_distance"):
        score_with_spark(*args, master="local[1]")
    assert spark.range(3).count() == 3
    # ... one started for the call is stopped (in a fresh process: none is running there).
    code = ("import sys; from pyspark.sql import SparkSession; "
            "from serve.batch.spark import score_with_spark; "
            "from serve.errors import InvalidInput\n"
            "try:\n    score_with_spark(None, *sys.argv[1:], master='local[1]')\n"
            "except InvalidInput:\n    pass\n"
            "print('active:', SparkSession.getActiveSession() is not None)")
    res = subprocess.run([sys.executable, "-c", code, *args[1:]], capture_output=True,
                         text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "active: False"
