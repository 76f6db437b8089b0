"""Cold start of every mode, from process start to first prediction: ``python bench/coldstart.py``.

A throwaway embedded tracking server; ``train.py`` registers version 1 of
``duration`` (linear, alias ``production``); a 10,000-row synthetic month; a
moto_server as the Lambda's Kinesis. Every contender is a fresh process, timed
by this script from just before it is started to its first prediction:

* ``python -m serve.web``: until ``/ready`` answers 200, then until the first
  ``POST /predict`` answer;
* the Lambda handler: a fresh interpreter imports ``serve.lambda_function`` and
  handles one 100-record Kinesis event (PutRecords to moto) — until it returns;
* ``python -m serve.batch`` on the 10,000-row month, the whole process (with
  ``--no-evaluate`` and with its MLflow evaluation run);
* for comparison: ``mlflow models serve`` until its first ``/invocations``
  answer, and the course-style batch script (``bench/batch.py``'s baseline:
  ``mlflow.pyfunc.load_model`` + DictVectorizer pipeline) as a whole process.

Our modes run ``--runs`` times each with no version cache (``MODEL_CACHE_DIR=off``:
every start downloads the version through the tracking server and loads it with
MLflow, as every start did before the cache) and with the version cached (the
first start of the web service fills it). Medians are printed, every run in
brackets, each comparison with both numbers and their ratio.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import click
from common import ROOT, Registry, bench_env, load_line

from ops.moto import start_moto
from ops.procs import free_port, start, stop

MODEL = "models:/duration@production"
RIDE = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}
TARGET_S = 2.0
LAMBDA_CHILD = """import json, sys
from serve.lambda_function import lambda_handler
result = lambda_handler(json.load(open(sys.argv[1])), None)
print(json.dumps(result), flush=True)
"""


def _request(port: int, method: str, path: str, body: bytes | None = None,
             content_type: str = "application/json") -> int | None:
    """Status of one request, None if nothing answers yet."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body, {"Content-Type": content_type} if body else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return None
    finally:
        conn.close()


def time_server(cmd: list[str], port: int, ready: str, predict: tuple[str, bytes], env: dict,
                log: Path, limit: float = 300.0) -> tuple[float, float]:
    """Seconds from start to ``ready`` answering 200, and to the first prediction (200)."""
    t0 = time.perf_counter()
    proc = start(cmd, log, env=env, cwd=ROOT)
    try:
        while _request(port, "GET", ready) != 200:
            if proc.poll() is not None or time.perf_counter() - t0 > limit:
                raise SystemExit(f"{cmd[:4]} did not become ready; see {log}")
            time.sleep(0.005)
        t_ready = time.perf_counter() - t0
        status = _request(port, "POST", predict[0], predict[1])
        if status != 200:
            raise SystemExit(f"{cmd[:4]}: first prediction answered {status}; see {log}")
        return t_ready, time.perf_counter() - t0
    finally:
        stop(proc.pid)


def time_process(cmd: list[str], env: dict, log: Path, first_line: bool = False) -> float:
    """Seconds from start to exit (or to its first line on stdout); fails on a non-zero exit."""
    t0 = time.perf_counter()
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
        line = proc.stdout.readline() if first_line else b""
        elapsed = time.perf_counter() - t0
        rest, _ = proc.communicate(timeout=600)
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed (exit {proc.returncode}); see {log}")
    if first_line and json.loads(line).get("batchItemFailures"):
        raise SystemExit(f"the handler reported failures: {line[:300]!r}")
    return elapsed if first_line else time.perf_counter() - t0


def lambda_event(path: Path, month: Path) -> Path:
    """One 100-record Kinesis event of rides from ``month``, as AWS delivers it."""
    from serve.stream.produce import read_ride_columns, ride_events
    from serve.stream.runner import kinesis_event

    events = list(ride_events(read_ride_columns(str(month), limit=100)))
    records = [{"SequenceNumber": str(i), "PartitionKey": str(e["ride_id"]),
                "Data": json.dumps(e).encode()} for i, e in enumerate(events)]
    event = kinesis_event(records, "shardId-000000000000",
                          "arn:aws:kinesis:us-east-1:123456789012:stream/rides", "us-east-1")
    path.write_text(json.dumps(event))
    return path


def median(xs: list[float]) -> str:
    """``1.23 s [1.20 1.23 1.31]``."""
    return f"{statistics.median(xs):.2f} s [{' '.join(f'{x:.2f}' for x in xs)}]"


def ratio_line(what: str, a_name: str, a: list[float], b_name: str, b: list[float]) -> str:
    ma, mb = statistics.median(a), statistics.median(b)
    return f"  {what}: {a_name} {ma:.2f} s / {b_name} {mb:.2f} s = {ma / mb:.1f}x"


@click.command()
@click.option("--runs", type=int, default=3, show_default=True,
              help="Starts of each contender in each cache state (medians are reported).")
@click.option("--rows", type=int, default=10_000, show_default=True,
              help="Rows of the month serve.batch and the course-style script score.")
def main(runs: int, rows: int) -> None:
    """Process start to first prediction for web, Lambda and batch, cached and not, against
    mlflow models serve and the course-style batch script."""
    from ops.synth import write_month

    with tempfile.TemporaryDirectory(prefix="bench-coldstart-") as tmp, ExitStack() as stack:
        home = Path(tmp)
        env = bench_env(home)
        reg = Registry(stack, home, env)
        reg.train_model()
        env = reg.env
        month = write_month("green", "2021-03", rows, home / "green_tripdata_2021-03.parquet", 2)
        moto = start_moto(home / "moto.log")
        stack.callback(moto.stop)
        kinesis = moto.client("kinesis")
        kinesis.create_stream(StreamName="predictions", ShardCount=1)
        event = lambda_event(home / "event.json", month)
        lambda_env = dict(env, **moto.env, MODEL_URI=MODEL, KINESIS_ENDPOINT_URL=moto.endpoint,
                          PREDICTIONS_STREAM_NAME="predictions")
        click.echo(f"cold start, process start -> first prediction; {runs} runs each; "
                   f"{load_line('before')}")

        results: dict[str, list[float]] = {}

        def web(name: str, cache: dict) -> None:
            port = free_port()
            cmd = [sys.executable, "-m", "serve.web", "--model-uri", MODEL, "--port", str(port),
                   "--log-level", "warning"]
            ready, first = time_server(cmd, port, "/ready", ("/predict", json.dumps(RIDE)
                                                             .encode()),
                                       dict(env, **cache), home / "web.log")
            results.setdefault(f"web ready {name}", []).append(ready)
            results.setdefault(f"web {name}", []).append(first)

        def handler(name: str, cache: dict) -> None:
            results.setdefault(f"lambda {name}", []).append(time_process(
                [sys.executable, "-c", LAMBDA_CHILD, str(event)], dict(lambda_env, **cache),
                home / "lambda.log", first_line=True))

        def batch(name: str, cache: dict, evaluate: bool) -> None:
            out = Path(tempfile.mkdtemp(prefix="out-", dir=home))
            results.setdefault(f"batch{'+eval' if evaluate else ''} {name}", []).append(
                time_process([sys.executable, "-m", "serve.batch", "--model-uri", MODEL,
                              "--input", str(month), "--output", str(out),
                              "--evaluate" if evaluate else "--no-evaluate"],
                             dict(env, **cache), home / "batch.log"))

        off = {"MODEL_CACHE_DIR": "off"}
        web("fill", {})  # the first start with an empty cache fills it
        for _ in range(runs):  # interleaved, so that load changes hit every contender alike
            for name, cache in (("off", off), ("cached", {})):
                web(name, cache)
                handler(name, cache)
                batch(name, cache, evaluate=False)
                batch(name, cache, evaluate=True)
            results.setdefault("course", []).append(time_process(
                [sys.executable, str(ROOT / "bench" / "batch.py"), "--child", "baseline",
                 "--model-uri", "models:/duration/1", "--input", str(month), "--output",
                 str(home / "course.parquet"), "--month", "2021-03"], env, home / "course.log"))
            port = free_port()
            ready, first = time_server(
                [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL, "--env-manager",
                 "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], port, "/ping",
                ("/invocations", json.dumps({"dataframe_records": [RIDE]}).encode()), env,
                home / "mlflow-serve.log")
            results.setdefault("mlflow ready", []).append(ready)
            results.setdefault("mlflow", []).append(first)
        report(results, rows)
        click.echo(load_line("after"))


def report(r: dict[str, list[float]], rows: int) -> None:
    """Medians, both numbers of every comparison and their ratio, the targets."""
    ok = {True: "OK", False: "MISSED"}
    web_c, lam_c = statistics.median(r["web cached"]), statistics.median(r["lambda cached"])
    click.echo(f"\nweb, python -m serve.web (first start, fills the cache: "
               f"{r['web fill'][0]:.2f} s)")
    for name in ("off", "cached"):
        click.echo(f"  {'no cache' if name == 'off' else 'version cached':15s} /ready "
                   f"{median(r[f'web ready {name}'])}  first /predict {median(r[f'web {name}'])}")
    click.echo(ratio_line("first /predict", "no cache", r["web off"], "cached", r["web cached"]))
    click.echo(f"  target < {TARGET_S:.0f} s with the version cached: {web_c:.2f} s "
               f"{ok[web_c < TARGET_S]}")
    click.echo(f"  mlflow models serve -w 1: /ping {median(r['mlflow ready'])}  first "
               f"/invocations {median(r['mlflow'])}")
    click.echo(ratio_line("first answer", "mlflow models serve", r["mlflow"], "serve.web cached",
                          r["web cached"]))
    click.echo("\nLambda handler, import + first 100-record Kinesis event (PutRecords to moto)")
    click.echo(f"  no cache        {median(r['lambda off'])}\n"
               f"  version cached  {median(r['lambda cached'])}")
    click.echo(ratio_line("first event", "no cache", r["lambda off"], "cached",
                          r["lambda cached"]))
    click.echo(f"  target < {TARGET_S:.0f} s with the version cached: {lam_c:.2f} s "
               f"{ok[lam_c < TARGET_S]}")
    click.echo(f"\nbatch, {rows:,}-row month, whole process (python start to exit)")
    click.echo(f"  course-style script (mlflow.pyfunc.load_model + DictVectorizer pipeline) "
               f"{median(r['course'])}")
    for name in ("off", "cached"):
        label = "no cache" if name == "off" else "version cached"
        click.echo(f"  python -m serve.batch --no-evaluate, {label:15s} "
                   f"{median(r[f'batch {name}'])}")
        click.echo(f"  python -m serve.batch (evaluation run), {label:15s} "
                   f"{median(r[f'batch+eval {name}'])}")
    click.echo(ratio_line("serve.batch --no-evaluate", "course-style", r["course"], "cached",
                          r["batch cached"]))
    click.echo(ratio_line("serve.batch with its evaluation run", "course-style", r["course"],
                          "cached", r["batch+eval cached"]))
    batch_c = statistics.median(r["batch cached"])
    click.echo(f"  target: faster than the course-style script: "
               f"{ok[batch_c < statistics.median(r['course'])]}")


if __name__ == "__main__":
    main()
