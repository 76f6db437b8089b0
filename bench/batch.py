"""Batch scoring benchmark: the course-style script vs ``serve.batch`` on a 3M-row month.

    .venv/bin/python bench/batch.py [--rows 3000000]

Starts a throw-away tracking server, trains and registers a small model
(``duration-bench``), writes a synthetic TLC month, then runs each contender in
its own subprocess (peak memory is that process's own ``VmHWM``) on the same
input with the same registered model:

(a) baseline, as in the MLOps Zoomcamp ``score.py``: ``pd.read_parquet``, duration and
    1..60 min filter, ``df[categorical].astype(str)``, ``to_dict(orient="records")``,
    ``DictVectorizer + LinearRegression`` pipeline predict, ``to_parquet``;
(b) ``serve.batch.run.score_month`` (chunked, vectorized; evaluation run off, the baseline
    has none).

Prints the read parquet -> write parquet time (after imports and model load,
identical for both), peak memory, the process wall time, the ratios and the max abs
prediction difference on the rows
both scored (joined on ride_id).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `serve`, `ops`, `train` importable
MODEL_NAME = "duration-bench"


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM).

    Not ``ru_maxrss``: Linux carries the parent's high-water mark into a forked child
    across exec, so a child of this (big) bench process would report the parent's peak.
    """
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


# -- the two contenders, each run in a fresh process ---------------------------------------
def run_baseline(model_uri: str, input_path: str, output: str, month: str) -> dict:
    """The course's score.py, with the pipeline made of the registered model's own parts."""
    t0 = time.perf_counter()
    import mlflow
    import pandas as pd
    from sklearn.pipeline import make_pipeline

    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    pipeline = make_pipeline(model.vectorizer, model.estimator)
    t1, loaded_mb = time.perf_counter(), _peak_mb()
    year, mm = (int(x) for x in month.split("-"))
    df = pd.read_parquet(input_path)
    df["duration"] = df.lpep_dropoff_datetime - df.lpep_pickup_datetime
    df.duration = df.duration.dt.total_seconds() / 60
    df = df[(df.duration >= 1) & (df.duration <= 60)].copy()
    df["ride_id"] = f"{year:04d}/{mm:02d}_" + df.index.astype("str")
    categorical = ["PULocationID", "DOLocationID"]
    df[categorical] = df[categorical].astype(str)
    df["PU_DO"] = df["PULocationID"] + "_" + df["DOLocationID"]
    dicts = df[["PU_DO", "trip_distance"]].to_dict(orient="records")
    y_pred = pipeline.predict(dicts)
    result = pd.DataFrame()
    result["ride_id"] = df["ride_id"]
    result["pickup_datetime"] = df["lpep_pickup_datetime"]
    result["PULocationID"] = df["PULocationID"]
    result["DOLocationID"] = df["DOLocationID"]
    result["actual_duration"] = df["duration"]
    result["predicted_duration"] = y_pred
    result["diff"] = result["actual_duration"] - result["predicted_duration"]
    result["model_version"] = model_uri.rsplit("/", 1)[-1]
    result.to_parquet(output, index=False)
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "score_s": t2 - t1, "rows_out": len(result), "output": output,
            "loaded_mb": loaded_mb, "peak_mb": _peak_mb()}


def run_serve_batch(model_uri: str, input_path: str, output: str, month: str) -> dict:
    """serve.batch.run.score_month on the same input."""
    t0 = time.perf_counter()
    from serve.batch.run import score_month
    from serve.registry import load_model

    loaded = load_model(model_uri)
    t1, loaded_mb = time.perf_counter(), _peak_mb()
    res = score_month(model_uri, input_path, output, "green", month, loaded=loaded,
                      evaluate=False)
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "score_s": t2 - t1, "rows_out": res.metrics["rows_scored"],
            "output": res.predictions, "loaded_mb": loaded_mb, "peak_mb": _peak_mb()}


CONTENDERS = {"baseline": run_baseline, "serve.batch": run_serve_batch}


def measure(kind: str, model_uri: str, input_path: str, output: str, month: str) -> dict:
    """Run one contender in a fresh subprocess; its wall time and its own peak memory."""
    cmd = [sys.executable, __file__, "--child", kind, "--model-uri", model_uri,
           "--input", input_path, "--output", output, "--month", month]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=os.environ.copy(), cwd=ROOT)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed (exit {proc.returncode})")
    return {**json.loads(out.decode().strip().splitlines()[-1]), "wall_s": wall}


def prediction_diff(baseline_out: str, batch_out: str) -> tuple[float, int]:
    """Max abs difference of the predictions on the rides both scored, and how many."""
    import numpy as np
    import pandas as pd

    a = pd.read_parquet(baseline_out, columns=["ride_id", "predicted_duration"])
    b = pd.read_parquet(batch_out, columns=["ride_id", "predicted_duration"])
    joined = a.merge(b, on="ride_id", suffixes=("_a", "_b"), validate="one_to_one")
    if len(joined) != len(a):
        raise SystemExit(f"only {len(joined)} of {len(a)} baseline rides found in serve.batch")
    diff = np.abs(joined["predicted_duration_a"] - joined["predicted_duration_b"])
    return float(diff.max()), len(joined)


@click.command()
@click.option("--rows", type=int, default=3_000_000, show_default=True,
              help="Rows of the scored synthetic month.")
@click.option("--child", type=click.Choice(list(CONTENDERS)), default=None, hidden=True,
              help="Internal: run one contender and print its timings as JSON.")
@click.option("--model-uri", default=None, hidden=True, help="Internal (child).")
@click.option("--input", "input_path", default=None, hidden=True, help="Internal (child).")
@click.option("--output", default=None, hidden=True, help="Internal (child).")
@click.option("--month", default="2021-03", hidden=True, help="Internal (child).")
def main(rows, child, model_uri, input_path, output, month) -> None:
    """Benchmark the course-style batch script against serve.batch."""
    if child:
        print(json.dumps(CONTENDERS[child](model_uri, input_path, output, month)), flush=True)
        return
    from ops.procs import free_port, http_ok, spawn, stop
    from ops.stackctl.server import embedded_server_cmd, server_env
    from ops.synth import write_month
    from serve.logs import setup_logging

    setup_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        tmp = Path(tmp)
        os.environ["MODEL_CACHE_DIR"] = str(tmp / "model-cache")  # not the user's cache
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        server = spawn(embedded_server_cmd(tmp / "mlflow", "127.0.0.1", port),
                       tmp / "server.log", http_ok(f"{uri}/health"), "mlflow server",
                       timeout=120, env=server_env())
        try:
            os.environ["MLFLOW_TRACKING_URI"] = uri
            from train import run_training

            train = write_month("green", "2021-01", 200_000, tmp / "train.parquet", 0)
            val = write_month("green", "2021-02", 100_000, tmp / "val.parquet", 1)
            summary = run_training(str(train), str(val), registered_model=MODEL_NAME)
            model = f"models:/{MODEL_NAME}/{summary['version']}"
            src = write_month("green", "2021-03", rows, tmp / "green_tripdata_2021-03.parquet",
                              2)
            print(f"batch scoring {rows:,} rows of {src.name}, model {model} (linear)")
            a = measure("baseline", model, str(src), str(tmp / "baseline.parquet"), "2021-03")
            b = measure("serve.batch", model, str(src), str(tmp / "out"), "2021-03")
            diff, n = prediction_diff(a["output"], b["output"])
        finally:
            stop(server.pid)
    for name, r in (("(a) course-style baseline", a), ("(b) serve.batch", b)):
        print(f"{name:27s} read->write {r['score_s']:6.2f} s "
              f"({r['rows_out'] / r['score_s']:>9,.0f} rows/s)  peak {r['peak_mb']:5.0f} MB "
              f"({r['loaded_mb']:3.0f} MB after imports + model load {r['load_s']:4.2f} s)  "
              f"process wall {r['wall_s']:5.2f} s  rows out {r['rows_out']:,}")
    print(f"speed-up end to end, read parquet -> write parquet (a/b): "
          f"{a['score_s'] / b['score_s']:.1f}x;  peak memory (b/a): "
          f"{b['peak_mb'] / a['peak_mb']:.2f};  process wall incl. python start, imports and "
          f"model load (a/b): {a['wall_s'] / b['wall_s']:.1f}x")
    print(f"max abs prediction difference on the {n:,} rides both scored: {diff:.3g} "
          f"({'OK' if diff <= 1e-9 else 'FAIL'} <= 1e-9)")
    if diff > 1e-9:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
