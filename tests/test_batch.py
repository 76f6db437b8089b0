"""Batch scoring: pure chunk logic, then the real thing against the tracking server,
moto (S3), PostgreSQL and a killed subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ops.synth import synth_month, write_month
from serve.batch.cli import main
from serve.batch.core import DROPOFF, OUTPUT_SCHEMA, PICKUP, REJECTS_SCHEMA, score_chunk
from serve.batch.months import (
    infer_from_name,
    month_input,
    month_range,
    parse_month,
    partition,
    ride_id_prefix,
)
from serve.batch.output import atomic_parquet
from serve.batch.run import BatchSettings, backfill, score_month
from serve.batch.sources import database_source, parquet_source
from serve.errors import InvalidInput
from serve.features import duration_mask

ROOT = Path(__file__).resolve().parents[1]


# -- pure logic ----------------------------------------------------------------------------
def test_month_range_and_partition():
    assert month_range("2021-11", "2022-02") == ["2021-11", "2021-12", "2022-01",
                                                      "2022-02"]
    assert partition("green", "2021-03") == "taxi_type=green/year=2021/month=03"
    assert ride_id_prefix("2021-03") == "2021/03_"
    with pytest.raises(InvalidInput, match="--to"):
        month_range("2021-03", "2021-01")
    with pytest.raises(InvalidInput, match="--month must be YYYY-MM"):
        parse_month("2021-13")


def test_month_input_and_names():
    assert month_input("d/green_tripdata_{month}.parquet", "green", "2021-04") == \
        "d/green_tripdata_2021-04.parquet"
    assert month_input(None, "yellow", "2021-04").endswith(
        "yellow_tripdata_2021-04.parquet")
    db = month_input("postgresql+psycopg2://u@h/db?table=rides", "green", "2021-04")
    assert "month=2021-04" in db and "table=rides" in db
    assert infer_from_name("s3://b/green_tripdata_2021-03.parquet") == ("green", "2021-03")
    assert infer_from_name("postgresql+psycopg2://u@h/db?table=r&month=2021-05") == \
        (None, "2021-05")
    # a backfill template still names the taxi type (yellow months must not land under green)
    assert infer_from_name("s3://b/tlc/yellow_tripdata_{month}.parquet") == ("yellow", None)


def test_prefect_flow_schedules_the_previous_month_without_prefect_installed():
    import datetime as dt

    from ops.flows.batch_flow import previous_month

    assert previous_month(dt.date(2021, 1, 2)) == "2020-12"
    assert previous_month(dt.date(2021, 3, 31)) == "2021-02"


def test_failed_write_leaves_neither_output_nor_temporary_file(tmp_path):
    target = tmp_path / "taxi_type=green/year=2021/month=03/predictions.parquet"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_parquet(str(target), OUTPUT_SCHEMA) as writer:
            writer.write_table(OUTPUT_SCHEMA.empty_table())
            raise RuntimeError("boom")
    assert list(target.parent.iterdir()) == []
    with atomic_parquet(str(target), OUTPUT_SCHEMA) as writer:
        writer.write_table(OUTPUT_SCHEMA.empty_table())
    assert [p.name for p in target.parent.iterdir()] == ["predictions.parquet"]


@pytest.fixture(scope="module")
def ride_model(months):
    """A tiny real RideDurationModel (no registry needed)."""
    from sklearn.linear_model import LinearRegression

    from serve.tlc import read_training_frame
    from train import fit_model

    return fit_model(read_training_frame(str(months.train)), LinearRegression())


def test_score_chunk_splits_rejects_and_counts(ride_model):
    chunk = pa.table({
        PICKUP: pa.array(pd.to_datetime(["2021-03-01 10:00"] * 5), pa.timestamp("us")),
        DROPOFF: pa.array(pd.to_datetime(["2021-03-01 10:12", "2021-03-01 10:30",
                                                "2021-03-01 12:00", "2021-03-01 10:05",
                                                None]), pa.timestamp("us")),
        "PULocationID": pa.array([43, 0, 43, None, 7], pa.int64()),
        "DOLocationID": pa.array([151, 151, 151, 20, 8], pa.int64()),
        "trip_distance": pa.array([1.8, 2.0, -1.0, 1.0, 3.0]),
    })
    scored = score_chunk(chunk, 100, ride_model, "7", "2021/03_")
    p, r = scored.predictions.to_pandas(), scored.rejects.to_pandas()
    assert scored.predictions.schema == OUTPUT_SCHEMA
    assert list(p["ride_id"]) == ["2021/03_100", "2021/03_104"]
    assert list(r["ride_id"]) == ["2021/03_101", "2021/03_102", "2021/03_103"]
    assert r["reason"].str.split(" ").str[0].tolist() == [
        "PULocationID", "trip_distance", "PULocationID"]
    expected = ride_model.predict_frame(pd.DataFrame(
        {"PULocationID": [43, 7], "DOLocationID": [151, 8], "trip_distance": [1.8, 3.0]}))
    np.testing.assert_array_equal(p["predicted_duration"], expected)
    assert p["actual_duration"].iloc[0] == 12.0 and pd.isna(p["actual_duration"].iloc[1])
    assert p["model_version"].tolist() == ["7", "7"]
    t = scored.totals
    assert (t.rows, t.scored, t.rejected, t.evaluated) == (5, 2, 3, 1)
    assert t.metrics()["rmse"] == pytest.approx(abs(expected[0] - 12.0))


def _open_fds(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path`` (Linux)."""
    target, n = os.path.realpath(path), 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:  # closed meanwhile
            pass
    return n


def test_parquet_inputs_are_closed(months, tmp_path):
    from serve.stream.produce import read_ride_columns
    from serve.tlc import read_training_frame

    path = months.test
    source = parquet_source(str(path), 10_000)
    assert _open_fds(path) == 0  # the source keeps no file open between reads
    chunks = source.chunks()
    next(chunks)
    assert _open_fds(path) == 1
    chunks.close()  # the consumer stops early
    assert _open_fds(path) == 0
    assert sum(c.num_rows for c in source.chunks()) == source.rows
    assert _open_fds(path) == 0

    no_distance = tmp_path / "green_tripdata_2021-03.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["trip_distance"]), no_distance)
    with pytest.raises(InvalidInput, match="trip_distance"):
        parquet_source(str(no_distance), 10_000)
    assert _open_fds(no_distance) == 0

    read_training_frame(str(path))
    read_ride_columns(str(path), limit=10)
    assert _open_fds(path) == 0


def test_score_chunk_without_rejects_and_with_other_time_units(ride_model):
    times = pd.to_datetime(["2021-03-01 10:00", "2021-03-01 10:30"])
    chunk = pa.table({
        PICKUP: pa.array(times, pa.timestamp("ms")),
        DROPOFF: pa.array(times + pd.Timedelta(minutes=12), pa.timestamp("ns")),
        "PULocationID": pa.array([43, 7], pa.int64()),
        "DOLocationID": pa.array([151, 8], pa.int64()),
        "trip_distance": pa.array([1.8, 3.0]),
    })
    scored = score_chunk(chunk, 0, ride_model, "7", "2021/03_")
    assert scored.rejects.schema == REJECTS_SCHEMA and scored.rejects.num_rows == 0
    assert scored.predictions.schema == OUTPUT_SCHEMA
    assert scored.predictions.column("actual_duration").to_pylist() == [12.0, 12.0]
    assert scored.predictions.column("pickup_datetime").to_pylist() == list(times)


# -- against the real stack ----------------------------------------------------------------
@pytest.fixture(scope="module")
def model_uri(registered_model) -> str:
    return f"models:/duration/{registered_model['version']}"


def _read(uri: str, fs=None) -> pd.DataFrame:
    return pq.read_table(uri, filesystem=fs).to_pandas()


def _check_month(out: pd.DataFrame, input_path: Path, model_uri: str) -> pd.DataFrame:
    """The output matches the input row for row and the model's own predictions."""
    import mlflow

    src = pq.read_table(input_path).to_pandas()
    idx = out["ride_id"].str.split("_").str[1].astype(int).to_numpy()
    rows = src.iloc[idx]
    np.testing.assert_array_equal(out["PULocationID"], rows["PULocationID"])
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    np.testing.assert_allclose(
        out["predicted_duration"],
        pyfunc.predict(rows[["PULocationID", "DOLocationID", "trip_distance"]]), rtol=0, atol=1e-9)
    return src


def test_local_month_end_to_end_with_evaluation_run(tmp_path, months, model_uri,
                                                    tracking_server):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    result = score_month(model_uri, str(months.test), str(out), "green", "2021-03")
    path = out / "taxi_type=green/year=2021/month=03/predictions.parquet"
    assert result.predictions == str(path) and path.is_file()
    table = pq.read_table(path)
    assert table.schema.names == OUTPUT_SCHEMA.names
    df = table.to_pandas()
    src = _check_month(df, months.test, model_uri)
    assert len(df) + result.metrics["rows_rejected"] == len(src) == result.metrics["rows"]
    assert df["ride_id"].is_unique and df["ride_id"].iloc[0] == "2021/03_0"
    assert (df["model_version"] == result.model_version).all()
    np.testing.assert_allclose(df["diff"], df["actual_duration"] - df["predicted_duration"])
    # no temporary file left behind, nothing else in the partition
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictions.parquet"]

    # the evaluation run: RMSE/MAE on 1 <= actual <= 60, counts, version, input
    run = MlflowClient().get_run(result.run_id)
    exp = MlflowClient().get_experiment(run.info.experiment_id)
    assert exp.name == "duration-batch"
    m = duration_mask(df["actual_duration"].to_numpy())
    err = (df["predicted_duration"] - df["actual_duration"]).to_numpy()[m]
    assert run.data.metrics["rmse"] == pytest.approx(np.sqrt(np.mean(err ** 2)), rel=1e-9)
    assert run.data.metrics["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-9)
    assert run.data.metrics["rows_evaluated"] == m.sum() < len(df)
    assert run.data.metrics["rows"] == len(src)
    assert run.data.params["model_version"] == result.model_version
    assert run.data.params["input_uri"] == str(months.test)

    # a re-run replaces the month with the same ride ids and predictions
    again = score_month(model_uri, str(months.test), str(out), "green", "2021-03",
                        evaluate=False)
    assert again.run_id is None
    pd.testing.assert_frame_equal(_read(str(path)), df)


def test_rejects_file_for_planted_bad_rows(tmp_path, model_uri, tracking_server):
    table = synth_month("yellow", "2021-04", 5_000, seed=3)
    df = table.to_pandas()
    df["PULocationID"] = df["PULocationID"].astype("float64")
    df.loc[[10, 20], "PULocationID"] = [0, np.nan]
    df.loc[30, "DOLocationID"] = 300
    df.loc[[40, 50], "trip_distance"] = [-2.0, np.inf]
    src = tmp_path / "yellow_tripdata_2021-04.parquet"
    df.to_parquet(src)
    result = score_month(model_uri, str(src), str(tmp_path / "out"), "yellow", "2021-04",
                         evaluate=False)
    rej = _read(result.rejects)
    assert result.rejects.endswith("_rejects/taxi_type=yellow/year=2021/month=04/rejects.parquet")
    assert rej["ride_id"].tolist() == [f"2021/04_{i}" for i in (10, 20, 30, 40, 50)]
    # each reason shows the value that broke the rule; location ids stay integers
    assert rej["reason"].tolist() == [
        "PULocationID must be an integer in 1..265, got 0",
        "PULocationID must be an integer in 1..265, got null",
        "DOLocationID must be an integer in 1..265, got 300",
        "trip_distance must be a finite number >= 0, got -2.0",
        "trip_distance must be a finite number >= 0, got inf"]
    assert pq.read_schema(result.rejects).field("PULocationID").type == pa.int64()
    assert rej["PULocationID"].tolist()[:1] == [0] and rej["DOLocationID"].iloc[2] == 300
    assert result.metrics["rows_rejected"] == 5
    assert len(_read(result.predictions)) == 5_000 - 5


def test_s3_input_and_output(tmp_path, months, model_uri, moto, monkeypatch):
    for k, v in moto.env.items():
        monkeypatch.setenv(k, v)
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="rides")
    s3.upload_file(str(months.test), "rides", "in/green_tripdata_2021-03.parquet")
    result = score_month(model_uri, "s3://rides/in/green_tripdata_2021-03.parquet",
                         "s3://rides/scored", "green", "2021-03", evaluate=False)
    # (pyarrow leaves empty "dir/" marker keys after deleting the temporary key: ignored)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="rides", Prefix="scored/")[
        "Contents"] if not o["Key"].endswith("/"))
    assert keys == ["scored/_rejects/taxi_type=green/year=2021/month=03/rejects.parquet",
                    "scored/taxi_type=green/year=2021/month=03/predictions.parquet"]
    s3.download_file("rides", keys[1], str(tmp_path / "p.parquet"))
    local = score_month(model_uri, str(months.test), str(tmp_path / "out"), "green",
                        "2021-03", evaluate=False)
    pd.testing.assert_frame_equal(_read(str(tmp_path / "p.parquet")), _read(local.predictions))
    assert result.metrics == local.metrics


def test_https_style_input_is_downloaded_once_and_scored(tmp_path, months, model_uri,
                                                         monkeypatch):
    """The TLC URL path, against a local HTTP server (no internet in CI)."""
    from ops.procs import free_port, http_ok, spawn, stop

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = spawn([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                    "--directory", str(months.test.parent)], tmp_path / "http.log",
                   http_ok(f"{base}/"), "http.server", timeout=30)
    try:
        monkeypatch.setenv("DURATION_CACHE", str(tmp_path / "cache"))
        url = f"{base}/{months.test.name}"
        result = score_month(model_uri, url, str(tmp_path / "out"), "green", "2021-03",
                             evaluate=False)
    finally:
        stop(server.pid)
    assert result.metrics["rows"] == 40_000
    assert len(list((tmp_path / "cache").iterdir())) == 1


def _load_table(url: str, path: Path, name: str) -> None:
    """Put a TLC month into a PostgreSQL table with COPY (fast), plus an index on pickup."""
    import io

    import sqlalchemy as sa

    df = pq.read_table(path).to_pandas()
    engine = sa.create_engine(url)
    df.head(0).to_sql(name, engine, index=False, if_exists="replace")
    buf = io.StringIO()
    df.to_csv(buf, index=False, header=False)
    buf.seek(0)
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.copy_expert(f'COPY "{name}" FROM STDIN WITH (FORMAT csv)', buf)
            cur.execute(f'CREATE INDEX ON "{name}" (lpep_pickup_datetime)')
        raw.commit()
    finally:
        raw.close()
        engine.dispose()


def test_postgres_table_input(tmp_path, months, model_uri, postgres, tracking_server):
    _load_table(postgres, months.val, "rides")  # 2021-02: must be filtered out
    _append = months.test
    import sqlalchemy as sa

    _load_table(postgres, _append, "rides_03")
    engine = sa.create_engine(postgres)
    with engine.begin() as conn:
        conn.execute(sa.text('INSERT INTO rides SELECT * FROM rides_03'))
        # NUMERIC arrives as Decimal: still scored (synthetic distances have 2 decimals)
        conn.execute(sa.text('ALTER TABLE rides ALTER COLUMN trip_distance TYPE numeric(10, 2)'))
    engine.dispose()
    url = f"{postgres}?table=rides&month=2021-03"
    result = score_month(model_uri, url, str(tmp_path / "out"), "green", "2021-03",
                         evaluate=False, settings=BatchSettings(batch_rows=7_000))
    assert "?table=rides&month=2021-03" in result.input
    password = postgres.rpartition("@")[0].rpartition(":")[2]
    assert len(password) == 24 and password in url
    assert password not in result.input  # not in logs and runs
    out = _read(result.predictions)
    ref = _read(score_month(model_uri, str(months.test), str(tmp_path / "ref"), "green",
                            "2021-03", evaluate=False).predictions)
    assert len(out) == len(ref)
    assert out["pickup_datetime"].is_monotonic_increasing  # ordered, so ride ids are stable
    key = ["pickup_datetime", "PULocationID", "DOLocationID", "predicted_duration"]
    a = out[key].sort_values(key).reset_index(drop=True)
    b = ref[key].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-9, rtol=0)


def test_postgres_source_releases_its_connections(postgres):
    """The engine is disposed on a missing column and when the chunks stop early."""
    import secrets

    import sqlalchemy as sa

    from ops.procs import wait_for

    app = f"leak_{secrets.token_hex(4)}"
    admin = sa.create_engine(postgres)
    rides = pd.DataFrame({
        "lpep_pickup_datetime": pd.to_datetime(["2021-03-01 10:00", "2021-03-02 10:00",
                                                "2021-03-03 10:00"]),
        "lpep_dropoff_datetime": pd.to_datetime(["2021-03-01 10:10", "2021-03-02 10:20",
                                                 "2021-03-03 10:30"]),
        "PULocationID": [43, 74, 7], "DOLocationID": [151, 75, 260],
        "trip_distance": [1.8, 0.9, 11.5]})
    rides.to_sql("leak_rides", admin, index=False, if_exists="replace")
    rides.drop(columns="trip_distance").to_sql("leak_nodist", admin, index=False,
                                                if_exists="replace")

    def open_connections() -> int:
        with admin.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity "
                                        "WHERE application_name = :a"), {"a": app}).scalar()

    def none_open() -> bool:
        return open_connections() == 0

    try:
        with pytest.raises(InvalidInput, match="trip_distance"):
            database_source(f"{postgres}?application_name={app}&table=leak_nodist",
                            "2021-03", 1)
        wait_for(none_open, "connections closed after a missing column", timeout=10)
        source = database_source(f"{postgres}?application_name={app}&table=leak_rides",
                                 "2021-03", 1)
        assert source.rows is None  # no tty: no COUNT(*) just for a progress bar
        chunks = source.chunks()
        assert next(chunks).num_rows == 1
        assert open_connections() == 1
        chunks.close()  # the consumer stops early
        wait_for(none_open, "connections closed after an early stop", timeout=10)
        assert sum(c.num_rows for c in source.chunks()) == 3
        wait_for(none_open, "connections closed after the last chunk", timeout=10)
    finally:
        admin.dispose()


def test_backfill_skips_done_months_unless_forced(tmp_path, months, model_uri, tracking_server):
    template = str(months.val.parent / "green_tripdata_{month}.parquet")
    out = str(tmp_path / "out")
    runner = CliRunner()
    args = ["--model-uri", model_uri, "--input", template, "--output", out,
            "--from", "2021-02", "--to", "2021-03", "--no-evaluate"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "out/taxi_type=green/year=2021/month=02/predictions.parquet").is_file()
    assert (tmp_path / "out/taxi_type=green/year=2021/month=03/predictions.parquet").is_file()
    results = backfill(model_uri, template, out, "green", ["2021-02", "2021-03"],
                       evaluate=False)
    assert [r.skipped for r in results] == [True, True]
    forced = backfill(model_uri, template, out, "green", ["2021-03"], force=True,
                      evaluate=False)
    assert not forced[0].skipped and forced[0].metrics["rows"] == 40_000
    bad = runner.invoke(main, [*args[:2], "--input", str(months.val), "--output", out,
                                     "--from", "2021-02", "--to", "2021-03"])
    assert bad.exit_code == 2 and "{month}" in bad.output


def test_killed_run_leaves_no_output_and_rerun_completes(tmp_path, model_uri, tracking_server):
    src = write_month("green", "2021-05", 1_000_000, tmp_path / "green_tripdata_2021-05.parquet",
                      seed=5)
    out = tmp_path / "out"
    part = out / "taxi_type=green/year=2021/month=05"
    cmd = [sys.executable, "-m", "serve.batch", "--model-uri", model_uri, "--input", str(src),
           "--output", str(out), "--batch-rows", "20000", "--no-evaluate"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server.uri}
    log = open(tmp_path / "batch.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def writing() -> bool:
        # the hidden temporary predictions file exists and has row groups in it
        tmps = list(part.glob(".predictions.parquet.*.tmp")) if part.is_dir() else []
        return any(p.stat().st_size > 1_000_000 for p in tmps)

    deadline = time.monotonic() + 120
    while not writing():
        assert proc.poll() is None, (tmp_path / "batch.log").read_text()
        assert time.monotonic() < deadline, "batch never started writing"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    log.close()
    assert not (part / "predictions.parquet").exists()
    assert list(part.glob(".predictions.parquet.*.tmp"))  # it really was killed mid-write
    assert not list(out.rglob("*.parquet"))  # neither predictions nor rejects published

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in part.iterdir()) == ["predictions.parquet"]
    meta = pq.ParquetFile(part / "predictions.parquet").metadata
    rejects = pq.ParquetFile(out / "_rejects" / part.relative_to(out) / "rejects.parquet")
    assert meta.num_rows + rejects.metadata.num_rows == 1_000_000


def test_cli_finds_the_tracking_server_in_dotenv(tmp_path, months, model_uri, tracking_server,
                                                monkeypatch):
    """Like every mode, serve.batch takes MLFLOW_TRACKING_URI from `.env` when the environment
    has none (before, MLflow's own default, a ./mlflow.db, was used silently)."""
    import mlflow

    (tmp_path / ".env").write_text(f"MLFLOW_TRACKING_URI={tracking_server.uri}\n")
    monkeypatch.chdir(tmp_path)
    # Recorded first, so the teardown restores the server's URI, not the wrong one below.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.uri)
    # MLflow's own fallback in this process (set_tracking_uri also exports the variable,
    # so drop it afterwards: the CLI must find the server in .env alone).
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'wrong.db'}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    try:
        res = CliRunner().invoke(main, ["--model-uri", model_uri, "--input",
                                              str(months.val), "--output", "out",
                                              "--no-evaluate"])
    finally:
        mlflow.set_tracking_uri(tracking_server.uri)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out/taxi_type=green/year=2021/month=02/predictions.parquet").is_file()
    assert not (tmp_path / "wrong.db").exists()
