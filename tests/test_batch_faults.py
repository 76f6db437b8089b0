"""Batch under hostile input and faults (issue 14 items 5, 7-10; issue 12 items 3, 9;
issue 15 items 3, 9): other column types, refused publishes, wrong months, broken files,
backfills with holes, two runs of one month, passwords, database mistakes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ops.synth import synth_month
from serve.batch.cli import main
from serve.batch.run import backfill, score_month
from serve.errors import InvalidInput

# What did not exist before these fixes is imported by the tests that use it, so that the
# others run (and fail) against the code before them too.
PICKUP, DROPOFF = "pickup_datetime", "dropoff_datetime"

ROOT = Path(__file__).resolve().parents[1]
ROWS = 2_000


# -- pure: coercion, reasons, refusals -----------------------------------------------------
def test_coercion_reads_every_plausible_column_type():
    from serve.batch.coerce import coerce_table
    from serve.batch.core import check_table

    ts = pd.to_datetime(["2021-03-01 10:00", "2021-03-01 11:00", "2021-03-01 12:00"])
    table = pa.table({
        PICKUP: pa.array(ts.tz_localize("America/New_York"),
                         pa.timestamp("ms", tz="America/New_York")),
        DROPOFF: pa.array(["2021-03-01 10:12:00", "2021-03-01T11:30:30", "yesterday"]),
        "PULocationID": pa.array([" 43 ", "7", "abc"]).dictionary_encode(),
        "DOLocationID": pa.array([151, 8, 300], pa.uint16()),
        "trip_distance": pa.array([1.8, 3, 2], pa.float64()).cast(pa.decimal128(10, 2)),
    })
    out = coerce_table(table)
    # wall-clock times of the zone, as TLC times are; text parsed; ids and distances numbers
    assert out.column(PICKUP).type == pa.timestamp("us")
    assert out.column(PICKUP).to_pylist() == list(ts)
    assert out.column(DROPOFF).to_pylist()[:2] == [pd.Timestamp("2021-03-01 10:12"),
                                                   pd.Timestamp("2021-03-01 11:30:30")]
    assert out.column("PULocationID").to_pylist()[:2] == [43.0, 7.0]
    assert out.column("DOLocationID").type == pa.int64()
    assert out.column("trip_distance").to_pylist() == [1.8, 3.0, 2.0]
    # unreadable cells: null, and their raw text kept for the reason
    assert out.column("_raw_PULocationID").to_pylist() == [None, None, "'abc'"]
    assert out.column("_raw_dropoff_datetime").to_pylist() == [None, None, "'yesterday'"]

    _, reasons = check_table(out)
    assert reasons.tolist() == [
        "", "", "PULocationID must be an integer in 1..265, got 'abc'"]

    # a date has no time of day: the ride keeps its day but its duration is unknown
    dated = coerce_table(table.set_column(0, PICKUP, pc.cast(table.column(PICKUP).cast(
        pa.timestamp("ms")), pa.date32())))
    assert dated.column(PICKUP).to_pylist()[0] == pd.Timestamp("2021-03-01")
    assert dated.column(DROPOFF).null_count == 3

    with pytest.raises(InvalidInput, match="column PULocationID is bool, not a number"):
        coerce_table(pa.table({"PULocationID": pa.array([True])}))
    with pytest.raises(InvalidInput, match="pickup_datetime is int64, not a timestamp"):
        coerce_table(pa.table({PICKUP: pa.array([1614592800])}))


def test_reject_reasons_show_the_value_the_rejects_file_shows(ride_model):
    from serve.batch.coerce import coerce_table
    from serve.batch.core import REJECTS_SCHEMA, score_chunk

    chunk = coerce_table(pa.table({
        PICKUP: pa.array(["2021-03-01 10:00", "not a time", "2021-03-01 10:00",
                          "2021-03-01 10:00", "2021-03-01 10:00", "2021-03-01 10:00"]),
        DROPOFF: pa.array(pd.to_datetime(["2021-03-01 10:10"] * 6), pa.timestamp("us")),
        "PULocationID": pa.array([43.0, 43.0, 0.0, None, 43.5, 43.0]),
        "DOLocationID": pa.array(["151", "151", "151", "151", "151", "n/a"]),
        "trip_distance": pa.array([1.0, 1.0, 1.0, 1.0, 1.0, -2.0]),
    }))
    scored = score_chunk(chunk, 0, ride_model, "7", "2021/03_")
    rej = scored.rejects
    assert rej.schema == REJECTS_SCHEMA  # location ids are integers (issue 15 item 9)
    assert rej.column("reason").to_pylist() == [
        "pickup_datetime must be a timestamp, got 'not a time'",
        "PULocationID must be an integer in 1..265, got 0",
        "PULocationID must be an integer in 1..265, got null",
        "PULocationID must be an integer in 1..265, got 43.5",
        "DOLocationID must be an integer in 1..265, got 'n/a'",
    ]
    assert rej.column("PULocationID").to_pylist() == [43, 0, None, None, 43]
    assert rej.column("DOLocationID").to_pylist() == [151, 151, 151, 151, None]
    assert scored.predictions.column("ride_id").to_pylist() == ["2021/03_0"]


def _totals(**kw):
    from serve.batch.core import Totals

    base = dict(rows=100, scored=100, rejected=0, dated=100, in_month=100)
    return Totals(**{**base, **kw})


def test_refusal_guards_a_month_output():
    from serve.batch.core import refusal

    assert refusal(_totals(), "2021-03", 0.5) is None
    assert "no rows" in refusal(_totals(rows=0, scored=0, dated=0, in_month=0), "2021-03", 0.5)
    why = refusal(_totals(scored=0, rejected=100, first_reject="PULocationID ..., got 'x'"),
                  "2021-03", 0.5)
    assert why.startswith("no ride could be scored: all 100 rows rejected (first: PULocationID")
    assert refusal(_totals(scored=50, rejected=50), "2021-03", 0.5) is None  # not more than
    assert "51 of 100 rows rejected (51.0%), more than --max-reject-ratio 0.5" in refusal(
        _totals(scored=49, rejected=51), "2021-03", 0.5)
    assert refusal(_totals(scored=49, rejected=51), "2021-03", 0.6) is None
    t = _totals(in_month=49)
    t.other_months.update({"2021-05": 51})
    assert "only 49 of 100 pickups fall in 2021-03 (± 1 day); the input's pickups are in " \
           "2021-05 (51)" in refusal(t, "2021-03", 0.5)


# -- against the real stack ----------------------------------------------------------------
@pytest.fixture(scope="module")
def model_uri(registered_model) -> str:
    return f"models:/duration/{registered_model['version']}"


@pytest.fixture(scope="module")
def loaded(model_uri):
    from serve.registry import load_model

    return load_model(model_uri)


@pytest.fixture(scope="module")
def ride_model(loaded):
    """The registered model's RideDurationModel (what score_chunk takes)."""
    return loaded.python_model


@pytest.fixture(scope="module")
def march() -> pa.Table:
    return synth_month("green", "2021-03", ROWS, seed=11)


def _set(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _other_types(table: pa.Table) -> pa.Table:
    """The same rides as a database export or another TLC writer may type them: NUMERIC
    distance, text location ids (one dictionary-encoded), pickup in ms with a time zone."""
    t = _set(table, "trip_distance", pc.cast(table["trip_distance"], pa.decimal128(12, 3)))
    t = _set(t, "PULocationID", pc.cast(t["PULocationID"], pa.string()))
    t = _set(t, "DOLocationID", pc.cast(t["DOLocationID"], pa.string()).dictionary_encode())
    local = pc.assume_timezone(pc.cast(t["lpep_pickup_datetime"], pa.timestamp("ms")),
                               "America/New_York")
    return _set(t, "lpep_pickup_datetime", local)


class Place:
    """An output root (local folder or s3:// prefix) and how to read and list it."""

    def __init__(self, root: str, fs=None):
        self.root, self.fs = root, fs

    def path(self, uri: str) -> str:
        return uri.removeprefix("s3://")

    def read(self, uri: str) -> pd.DataFrame:
        return pq.read_table(self.path(uri), filesystem=self.fs).to_pandas()

    def raw(self, uri: str) -> bytes:
        if self.fs is None:
            return Path(uri).read_bytes()
        with self.fs.open_input_stream(self.path(uri)) as f:
            return f.read()

    def names(self, uri: str) -> list[str]:
        import pyarrow.fs as pafs

        fs = self.fs or pafs.LocalFileSystem()
        folder = self.path(uri).rpartition("/")[0]
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(folder)))


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path, monkeypatch):
    if request.param == "local":
        return Place(str(tmp_path / "out"))
    moto = request.getfixturevalue("moto")
    for k, v in moto.env.items():
        monkeypatch.setenv(k, v)
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    from serve.tlc import s3_filesystem

    return Place(f"s3://{bucket}/out", s3_filesystem())


def _write(table: pa.Table, folder: Path, name: str = "green_tripdata_2021-03.parquet") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name)
    return str(folder / name)


def test_other_column_types_score_and_bad_runs_never_replace_a_month(
        place, tmp_path, march, model_uri, loaded):
    """Issue 14 item 5 on real files, local and S3: decimal/text/tz-typed columns give the
    same predictions; a run that scores nothing or rejects too much publishes nothing."""
    good = score_month(model_uri, _write(march, tmp_path / "a"), place.root, "green",
                       "2021-03", loaded=loaded, evaluate=False)
    reference = place.read(good.predictions)
    assert len(reference) > 0.99 * ROWS

    typed = score_month(model_uri, _write(_other_types(march), tmp_path / "b"), place.root,
                        "green", "2021-03", loaded=loaded, evaluate=False)
    assert typed.metrics["rows_scored"] == good.metrics["rows_scored"]  # was 0: all rejected
    assert typed.metrics == pytest.approx(good.metrics, rel=1e-12)
    pd.testing.assert_frame_equal(place.read(typed.predictions), reference, check_exact=False,
                                  rtol=0, atol=1e-9)
    before = place.raw(good.predictions)

    # nothing scorable: every location id is text that is no number
    junk = _set(march, "PULocationID", pa.array(["n/a"] * ROWS))
    res = CliRunner().invoke(main, ["--model-uri", model_uri, "--input",
                                    _write(junk, tmp_path / "c"), "--output", place.root,
                                    "--no-evaluate"])
    assert res.exit_code == 1, res.output
    assert "no ride could be scored: all 2,000 rows rejected (first: PULocationID must be " \
           "an integer in 1..265, got 'n/a')" in res.output
    assert "output is left as it was" in res.output and "Traceback" not in res.output
    assert json.loads(res.stdout.splitlines()[0])["error"]
    assert place.raw(good.predictions) == before
    assert place.names(good.predictions) == ["predictions.parquet"]  # no temporary left

    # 60% rejected: refused at the default ratio (0.5), published when the user allows it
    bad_ids = np.where(np.arange(ROWS) % 5 < 3, 0, march["PULocationID"].to_numpy())
    mostly_bad = _write(_set(march, "PULocationID", pa.array(bad_ids)), tmp_path / "d")
    with pytest.raises(Exception, match=r"more than --max-reject-ratio 0\.5") as refused:
        score_month(model_uri, mostly_bad, place.root, "green", "2021-03", loaded=loaded,
                    evaluate=False)
    assert type(refused.value).__name__ == "MonthRefused"
    assert place.raw(good.predictions) == before
    allowed = score_month(model_uri, mostly_bad, place.root, "green", "2021-03",
                          loaded=loaded, evaluate=False, max_reject_ratio=0.7)
    rej = place.read(allowed.rejects)
    assert len(rej) == allowed.metrics["rows_rejected"] == 1_200
    assert (rej["PULocationID"] == 0).all() and rej["PULocationID"].dtype == "int64"
    assert set(rej["reason"]) == {"PULocationID must be an integer in 1..265, got 0"}


def test_date_pickups_are_scored_but_not_evaluated(tmp_path, march, model_uri, loaded):
    """A date32 pickup used to give durations from midnight (RMSE 26.6 instead of 5.4)."""
    dates = _set(march, "lpep_pickup_datetime", pc.cast(march["lpep_pickup_datetime"],
                                                         pa.date32()))
    res = score_month(model_uri, _write(dates, tmp_path / "in"), str(tmp_path / "out"),
                      "green", "2021-03", loaded=loaded, evaluate=False)
    out = pq.read_table(res.predictions).to_pandas()
    assert res.metrics["rows_evaluated"] == 0 and "rmse" not in res.metrics
    assert out["actual_duration"].isna().all() and len(out) == res.metrics["rows_scored"]
    assert (out["pickup_datetime"].dt.month == 3).all()


def test_month_is_checked_against_the_pickups(tmp_path, march, model_uri, loaded):
    """Issue 14 item 7: a March file written as May is refused (and May stays to do)."""
    src = _write(march, tmp_path / "in")
    res = CliRunner().invoke(main, ["--model-uri", model_uri, "--input", src, "--month",
                                    "2021-05", "--output", str(tmp_path / "out"),
                                    "--no-evaluate"])
    assert res.exit_code == 1, res.output
    assert f"only 0 of {ROWS:,} pickups fall in 2021-05 (± 1 day); the input's pickups " \
           f"are in 2021-03 ({ROWS:,}): wrong file or wrong --month" in res.output
    assert not list((tmp_path / "out").rglob("*.parquet"))

    # rides crossing midnight at the month's ends, and a few TLC-style outliers: accepted
    pickups = march["lpep_pickup_datetime"].to_numpy().copy()
    n = len(pickups)
    pickups[: n // 10] = np.datetime64("2021-02-28T23:50")
    pickups[n // 10: n // 5] = np.datetime64("2021-04-01T00:05")
    pickups[n // 5: n // 5 + n // 20] = np.datetime64("2008-12-31T23:00")
    edges = _set(march, "lpep_pickup_datetime", pa.array(pickups, pa.timestamp("us")))
    ok = score_month(model_uri, _write(edges, tmp_path / "edges"), str(tmp_path / "out"),
                     "green", "2021-03", loaded=loaded, evaluate=False)
    assert ok.metrics["rows"] == ROWS and ok.error is None


def _broken_files(folder: Path, march: pa.Table) -> dict[str, tuple[Path, str]]:
    folder.mkdir()
    good = folder / "good.parquet"
    pq.write_table(march, good, row_group_size=500)
    data = good.read_bytes()
    files = {"empty": (b"", "not a readable parquet file: Parquet file size is 0 bytes"),
             "truncated": (data[: len(data) // 2], "not a readable parquet file"),
             "not-parquet": (b"ride,duration\n1,2\n" * 10, "not a readable parquet file")}
    # a page cut in the middle of the file: the footer reads, the rows do not
    middle = bytearray(data)
    meta = pq.ParquetFile(good).metadata
    start = meta.row_group(1).column(0).data_page_offset
    middle[start: start + 400] = os.urandom(400)
    files["corrupt-page"] = (bytes(middle), "cannot read the file")
    cols = march.select(["lpep_pickup_datetime", "lpep_dropoff_datetime", "PULocationID",
                         "DOLocationID", "trip_distance"])
    dup = pa.Table.from_arrays([*cols.columns, cols["trip_distance"]],
                               names=[*cols.column_names, "trip_distance"])
    buf = io.BytesIO()
    pq.write_table(dup, buf)
    files["duplicated-column"] = (buf.getvalue(), "column 'trip_distance' appears 2 times")
    out = {}
    for name, (content, message) in files.items():
        path = folder / f"{name}_green_tripdata_2021-03.parquet"
        path.write_bytes(content)
        out[name] = (path, message)
    out["missing"] = (folder / "nope_green_tripdata_2021-03.parquet", "no such file")
    return out


def test_broken_files_fail_in_one_line_naming_the_file(tmp_path, march, model_uri):
    """Issue 14 item 8: 0-byte, cut, non-parquet, corrupt, duplicated columns."""
    cases = _broken_files(tmp_path / "in", march)
    for name, (path, message) in cases.items():
        res = CliRunner().invoke(main, ["--model-uri", model_uri, "--input", str(path),
                                        "--output", str(tmp_path / "out"), "--no-evaluate"])
        assert res.exit_code == 1, (name, res.output)
        # (the corrupt page is met after the model loaded: MLflow's download bars before it)
        last = res.stderr.strip().splitlines()[-1:]
        assert last[0].startswith(f"Error: green 2021-03: {path}: " if name != "missing" else
                                  f"Error: green 2021-03: no such file: {path}"), last
        assert message in last[0], (name, last[0])
        assert "Traceback" not in res.output
    assert not list((tmp_path / "out").rglob("*.parquet"))

    # the real command: one line on stderr, no traceback (0-byte file)
    proc = subprocess.run([sys.executable, "-m", "serve.batch", "--model-uri", model_uri,
                           "--input", str(cases["empty"][0]), "--output",
                           str(tmp_path / "out"), "--no-evaluate"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: green 2021-03: {cases['empty'][0]}: not a readable parquet file: Parquet "
        f"file size is 0 bytes"]


def test_an_unparseable_timestamp_is_a_reject_not_a_failed_month(tmp_path, march, loaded,
                                                                  model_uri):
    text = pc.strftime(march["lpep_pickup_datetime"], "%Y-%m-%d %H:%M:%S").to_pylist()
    text[7] = "31/02/2021 25:61"
    src = _write(_set(march, "lpep_pickup_datetime", pa.array(text)), tmp_path / "in")
    res = score_month(model_uri, src, str(tmp_path / "out"), "green", "2021-03",
                      loaded=loaded, evaluate=False)
    rej = pq.read_table(res.rejects).to_pandas()
    assert rej["ride_id"].tolist() == ["2021/03_7"]
    assert rej["reason"].tolist() == [
        "pickup_datetime must be a timestamp, got '31/02/2021 25:61'"]
    assert res.metrics["rows_scored"] == ROWS - 1


def test_backfill_scores_every_month_it_can_and_reports_the_others(tmp_path, months,
                                                                   model_uri):
    """Issue 14 item 9: a missing and a broken month do not stop the others."""
    data = tmp_path / "in"
    data.mkdir()
    for m in (months.val, months.test):
        (data / m.name).symlink_to(m)
    (data / "green_tripdata_2021-05.parquet").write_bytes(b"")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["--model-uri", model_uri, "--input",
                                    str(data / "green_tripdata_{month}.parquet"),
                                    "--output", str(out), "--from", "2021-02", "--to",
                                    "2021-05", "--no-evaluate"])
    assert res.exit_code == 1, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["month"] for x in lines] == ["2021-02", "2021-03", "2021-04", "2021-05"]
    assert [x["error"] is None for x in lines] == [True, True, False, False]
    assert lines[2]["error"].startswith("no such file: ")
    assert "not a readable parquet file" in lines[3]["error"]
    assert lines[1]["metrics"]["rows"] == 40_000
    assert (out / "taxi_type=green/year=2021/month=03/predictions.parquet").is_file()
    summary = res.stderr.strip().splitlines()[-1:]  # (after MLflow's download bars)
    assert summary[0].startswith(
        "Error: 2 of 4 months not scored (their output is left as it was): 2021-04: no such")


def test_a_second_run_of_a_month_is_told_and_deletes_nothing(place, tmp_path, march,
                                                             model_uri, loaded, monkeypatch):
    """Issue 14 item 10: the second run no longer deletes the first's temporary files."""
    from serve.batch.months import predictions_uri
    from serve.batch.output import MonthLocked, month_lock

    src = _write(march, tmp_path / "in")
    pred = predictions_uri(place.root, "green", "2021-03")
    first_tmp = pred.rpartition("/")[0] + "/.predictions.parquet.first-run.tmp"
    with month_lock(pred):  # the first run, still writing
        fs_path = place.path(first_tmp)
        if place.fs is None:
            Path(first_tmp).write_bytes(b"half a month")
        else:
            with place.fs.open_output_stream(fs_path) as f:
                f.write(b"half a month")
        res = CliRunner().invoke(main, ["--model-uri", model_uri, "--input", src,
                                        "--output", place.root, "--no-evaluate"])
        assert res.exit_code == 1, res.output
        assert f"another run is writing this month (pid {os.getpid()} on " in res.output
        assert "this run did nothing" in res.output
        assert place.names(pred) == [".predictions.parquet.first-run.tmp",
                                     ".predictions.parquet.lock"]
    # the first run is gone (and left its temporary file): the next run cleans and publishes
    done = score_month(model_uri, src, place.root, "green", "2021-03", loaded=loaded,
                       evaluate=False)
    assert done.metrics["rows"] == ROWS
    assert place.names(pred) == ["predictions.parquet"]

    if place.fs is not None:  # S3: a lock nobody refreshes (its run was killed) expires
        import boto3

        import serve.batch.output as output

        bucket, _, key = place.path(pred).partition("/")
        lock_key = key.rpartition("/")[0] + "/.predictions.parquet.lock"
        s3 = boto3.client("s3")  # the moto endpoint, from the environment
        s3.put_object(Bucket=bucket, Key=lock_key, Body=b'{"pid": 1, "host": "gone"}')
        with pytest.raises(MonthLocked, match="if it was killed, its lock expires in"):
            score_month(model_uri, src, place.root, "green", "2021-03", loaded=loaded,
                        evaluate=False)
        monkeypatch.setattr(output, "LOCK_STALE_SECONDS", 0.0)  # now it is stale
        assert score_month(model_uri, src, place.root, "green", "2021-03", loaded=loaded,
                           evaluate=False).error is None
        assert place.names(pred) == ["predictions.parquet"]


# -- passwords and database mistakes (issue 12 items 3 and 9, issue 15 item 3) ------------
@pytest.fixture(scope="module")
def rides_table(postgres, march) -> str:
    """``faults_rides``: the March rides in a PostgreSQL table."""
    import sqlalchemy as sa

    engine = sa.create_engine(postgres)
    march.select(["lpep_pickup_datetime", "lpep_dropoff_datetime", "PULocationID",
                  "DOLocationID", "trip_distance"]).to_pandas().to_sql(
        "faults_rides", engine, index=False, if_exists="replace")
    engine.dispose()
    return "faults_rides"


def _without_password(url: str) -> tuple[str, str]:
    """``postgresql+psycopg2://user:pw@host/db`` -> (``...//user@host/db``, ``pw``)."""
    head, _, host = url.rpartition("@")
    scheme_user, _, password = head.rpartition(":")
    return f"{scheme_user}@{host}", password


def _cmdlines() -> list[bytes]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:  # gone meanwhile
            pass
    return out


def test_database_password_never_on_a_command_line_or_in_output(tmp_path, postgres,
                                                               rides_table, model_uri):
    """The password comes from PGPASSWORD in `.env` (or the environment, ~/.pgpass); no
    command line (scanned in /proc while the run lasts) and no output line carries it."""
    url, password = _without_password(postgres)
    (tmp_path / ".env").write_text(f"PGPASSWORD={password}\n")
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    cmd = [sys.executable, "-m", "serve.batch", "--model-uri", model_uri, "--input",
           f"{url}?table={rides_table}&month=2021-03", "--taxi-type", "green", "--output",
           str(tmp_path / "out"), "--no-evaluate"]
    with open(tmp_path / "out.txt", "wb") as stdout, open(tmp_path / "err.txt", "wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
        seen, deadline = [], time.monotonic() + 180
        while time.monotonic() < deadline:
            seen += _cmdlines()  # every process of the machine, while the batch runs
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
    out, err = (tmp_path / "out.txt").read_bytes(), (tmp_path / "err.txt").read_bytes()
    assert proc.wait(timeout=60) == 0, err.decode()[-2000:]
    assert any(b"serve.batch" in c for c in seen)  # the scan saw the batch itself
    assert not [c for c in seen if password.encode() in c]
    assert password.encode() not in out + err
    line = json.loads(out.decode().splitlines()[-1])
    assert line["metrics"]["rows"] == ROWS and line["input"].startswith(f"{url}?table=")

    # a password in --input is refused before anything runs, and not echoed back
    res = CliRunner().invoke(main, ["--input", f"{postgres}?table={rides_table}",
                                    "--taxi-type", "green", "--output", str(tmp_path / "x")])
    assert res.exit_code == 2 and "must not carry a password" in res.output
    assert "PGPASSWORD" in res.output and password not in res.output
    # the months a backfill skips show their input masked (the API still takes such URLs)
    [skipped] = backfill(model_uri, f"{postgres}?table={rides_table}", str(tmp_path / "out"),
                         "green", ["2021-03"], evaluate=False)
    assert skipped.skipped and password not in skipped.line()
    assert skipped.input.startswith(postgres.replace(password, "***"))


def test_database_and_taxi_type_mistakes_are_one_line(tmp_path, postgres, rides_table,
                                                      model_uri, monkeypatch):
    url, password = _without_password(postgres)
    monkeypatch.setenv("PGPASSWORD", password)

    def run(*args: str):
        res = CliRunner().invoke(main, ["--model-uri", model_uri, "--output",
                                        str(tmp_path / "out"), "--no-evaluate", *args])
        assert "Traceback" not in res.output and res.exception is None or \
            isinstance(res.exception, SystemExit), res.output
        return res.exit_code, res.stderr.strip().splitlines()[-1]

    table = f"{url}?table={rides_table}&month=2021-03"
    code, line = run("--input", f"{url}?table=nope&month=2021-03", "--taxi-type", "green")
    assert code == 1 and line == (f"Error: green 2021-03: {url}?table=nope&month=2021-03: "
                                  f"no table 'nope' in that database")
    monkeypatch.setenv("PGPASSWORD", "not-the-password")
    code, line = run("--input", table, "--taxi-type", "green")
    assert code == 1 and "cannot read table 'faults_rides': " in line
    assert "password authentication failed" in line and "PGPASSWORD" in line
    assert "not-the-password" not in line
    # a table does not say its taxi type (it used to land under green silently)
    code, line = run("--input", table)
    assert code == 2 and "a database input does not say which taxi type" in line
    # fhv/fhvhv records have no trip_distance: refused up front, whoever says it
    code, line = run("--input", table, "--taxi-type", "fhv")
    assert code == 2 and "TLC fhv trip records have no trip_distance" in line
    code, line = run("--input", "data/fhvhv_tripdata_2021-03.parquet")
    assert code == 2 and "fhvhv trip records have no trip_distance" in line


def test_prefect_flow_has_its_options_and_reads_model_uri(tmp_path, monkeypatch):
    from ops.flows import batch_flow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MODEL_URI", raising=False)
    (tmp_path / ".env").write_text("MODEL_URI=models:/duration@challenger\n")
    tasks = batch_flow.plan("out", "d/green_tripdata_{month}.parquet", first="2021-11",
                            last="2022-01")
    assert [t["month"] for t in tasks] == ["2021-11", "2021-12", "2022-01"]
    assert {t["model_uri"] for t in tasks} == {"models:/duration@challenger"}
    monkeypatch.setenv("MODEL_URI", "models:/duration/7")
    assert batch_flow.plan("out", month="2021-03")[0]["model_uri"] == "models:/duration/7"
    assert batch_flow.plan("out", model_uri="runs:/r/m", month="2021-03")[0][
        "model_uri"] == "runs:/r/m"

    args = ["--output", "out", "--input", "d/green_tripdata_{month}.parquet", "--once",
            "--from", "2021-01", "--to", "2021-03"]
    res = CliRunner().invoke(batch_flow.main, args)
    try:
        import prefect  # noqa: F401
    except ImportError:  # one line naming the install command, no traceback
        assert res.exit_code == 1, res.output
        assert res.output.strip() == f"Error: {batch_flow.NO_PREFECT}"
    res = CliRunner().invoke(batch_flow.main, [*args[:4], "--taxi-type", "fhv", "--once"])
    assert res.exit_code == 2 and "no trip_distance" in res.output


def test_two_runs_of_a_month_at_once_the_second_is_refused(tmp_path, model_uri,
                                                           tracking_server):
    """Issue 14 item 10 as it happened: the second run used to delete the first's
    temporary files as stale, and the first failed after all its work."""
    from ops.synth import write_month

    rows = 200_000
    src = write_month("green", "2021-05", rows, tmp_path / "green_tripdata_2021-05.parquet",
                      seed=5)
    out = tmp_path / "out"
    part = out / "taxi_type=green/year=2021/month=05"
    args = ["--model-uri", model_uri, "--input", str(src), "--output", str(out),
            "--batch-rows", "1000", "--no-evaluate"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server.uri}
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "serve.batch", *args], cwd=ROOT,
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (part.is_dir() and list(part.glob(".predictions.parquet.*.tmp"))):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the first run never started writing"
            time.sleep(0.005)
        second = CliRunner().invoke(main, args)  # in-process: at the lock within milliseconds
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-2000:]
    assert second.exit_code == 1, second.output
    assert f"another run is writing this month (pid {first.pid} on " in second.output
    assert sorted(p.name for p in part.iterdir()) == ["predictions.parquet"]
    assert pq.ParquetFile(part / "predictions.parquet").metadata.num_rows == rows


def test_an_output_bucket_that_does_not_exist_is_one_line(tmp_path, march, model_uri, moto,
                                                          monkeypatch):
    for k, v in moto.env.items():
        monkeypatch.setenv(k, v)
    src = _write(march, tmp_path / "in")
    res = CliRunner().invoke(main, ["--model-uri", model_uri, "--input", src, "--output",
                                    "s3://no-such-bucket-here/out", "--no-evaluate"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert res.stderr.strip().splitlines()[-1].startswith(
        "Error: green 2021-03: OSError: s3://no-such-bucket-here/out/taxi_type=green/year=2021/"
        "month=03/.predictions.parquet.lock: cannot create the month's lock: ")
    assert "NoSuchBucket" in res.stderr
