"""``make demo``: the whole slice on one machine, then everything it started is stopped.

1. starts an embedded tracking server (sqlite + local artifacts, proxied) on 127.0.0.1;
2. writes two synthetic TLC months;
3. trains through ``mlflow run . --env-manager local`` (registers, gates, promotes);
4. serves ``models:/duration/Production`` with ``mlflow models serve`` and prints
   one prediction for a sample ride.

Everything it writes is under ``$STACK_HOME/demo`` (default ``.stack/demo``): the
months in ``data/`` (never the real TLC names under the repository's ``data/``), the
throwaway server's store in ``state/`` (wiped at each start, so every demo trains and
promotes version 1 from scratch), each step's output in ``logs/``. Ctrl-C or a failing
step still stops every process the demo started.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import requests

from ops.moto import start_moto
from ops.procs import free_port, http_ok, spawn, stop
from ops.stackctl.server import embedded_server_cmd, server_env
from ops.synth import write_month
from serve.config import stack_home
from serve.logs import setup_logging

log = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parents[1]
HOME = stack_home() / "demo"
SAMPLE_RIDE = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class Demo:
    """The demo's state: started processes are registered on ``stack`` and stopped at exit."""

    def __init__(self, stack: ExitStack):
        self.stack = stack
        self.logs = HOME / "logs"
        self.env = dict(os.environ)
        self.env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + self.env["PATH"]

    def spawn(self, name: str, cmd: list[str], ready_url: str, timeout: float = 120,
              env: dict | None = None):
        """Start a long-running process, stop it when the demo ends, wait until ready."""
        proc = spawn(cmd, self.logs / f"{name}.log", http_ok(ready_url), name, timeout=timeout,
                     env={**self.env, **(env or {})}, cwd=ROOT)
        self.stack.callback(stop, proc.pid)
        log.info("%s ready (logs: %s)", name, self.logs / f"{name}.log")
        return proc

    def run(self, name: str, cmd: list[str]) -> str:
        """Run a command to completion, fail with its log tail if it fails."""
        path = self.logs / f"{name}.log"
        with open(path, "w") as out:
            res = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                 cwd=ROOT)
        text = path.read_text(errors="replace")
        if res.returncode:
            raise SystemExit(f"{name} failed (exit {res.returncode}); last lines of {path}:\n"
                             + "\n".join(text.splitlines()[-15:]))
        return text

    # -- steps -------------------------------------------------------------------------
    def tracking_server(self) -> str:
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        self.spawn("mlflow-server", embedded_server_cmd(HOME / "state", "127.0.0.1", port),
                   f"{uri}/health", env=server_env())
        self.env["MLFLOW_TRACKING_URI"] = uri
        return uri

    def data(self) -> tuple[Path, Path]:
        data = HOME / "data"
        train = write_month("green", "2021-01", 200_000, data / "green_tripdata_2021-01.parquet")
        val = write_month("green", "2021-02", 200_000, data / "green_tripdata_2021-02.parquet", 1)
        log.info("synthetic months: %s, %s", train, val)
        return train, val

    def train(self, train: Path, val: Path) -> None:
        out = self.run("mlflow-run", [sys.executable, "-m", "mlflow", "run", str(ROOT),
                                      "--env-manager", "local", "--experiment-name", "duration",
                                      "-P", f"train={train}", "-P", f"val={val}"])
        summary = [ln for ln in out.splitlines() if ln.startswith("run ")]
        log.info("mlflow run: %s", summary[-1] if summary else "done")

    def mlflow_models_serve(self) -> float:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        self.spawn("mlflow-models-serve", [
            sys.executable, "-m", "mlflow", "models", "serve", "-m",
            "models:/duration/Production", "--env-manager", "local", "-h", "127.0.0.1",
            "-p", str(port)], f"{url}/ping")
        resp = requests.post(f"{url}/invocations", json={"dataframe_records": [SAMPLE_RIDE]},
                             timeout=30)
        resp.raise_for_status()
        return resp.json()["predictions"][0]

    def online(self) -> dict:
        """``python -m serve.web`` on the production alias; one ``POST /predict``."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        self.spawn("serve-web", [sys.executable, "-m", "serve.web", "--model-uri",
                                 "models:/duration@production", "--port", str(port)],
                   f"{url}/ready")
        resp = requests.post(f"{url}/predict", json=SAMPLE_RIDE, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def batch(self, val: Path) -> dict:
        """``python -m serve.batch`` on the validation month: predictions parquet + evaluation."""
        import pyarrow.parquet as pq

        out = self.run("serve-batch", [
            sys.executable, "-m", "serve.batch", "--model-uri", "models:/duration@production",
            "--input", str(val), "--month", "2021-02", "--output", str(HOME / "batch")])
        result = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
        first = pq.ParquetFile(result["predictions"]).read_row_group(0).slice(0, 1).to_pylist()[0]
        return {**result, "first": first}

    def stream(self) -> dict:
        """moto_server as Kinesis; one ride in, the local runner once, the prediction event out."""
        from serve.stream.produce import ensure_stream, payloads, read_stream

        moto = start_moto(self.logs / "moto-server.log")
        self.stack.callback(moto.stop)
        kinesis = moto.client("kinesis")
        for name in ("ride_events", "ride_predictions", "ride_dead_letters"):
            ensure_stream(kinesis, name, 1)
        kinesis.put_record(StreamName="ride_events", PartitionKey="256",
                           Data=json.dumps({"ride": SAMPLE_RIDE, "ride_id": 256}))
        checkpoints = HOME / "stream-checkpoints"
        shutil.rmtree(checkpoints, ignore_errors=True)  # a new moto starts at sequence 1 again
        saved, self.env = self.env, {**self.env, **moto.env}  # fake credentials, this step only
        try:
            self.run("stream-runner", [
                sys.executable, "-m", "serve.stream", "--input-stream", "ride_events",
                "--output-stream", "ride_predictions", "--endpoint-url", moto.endpoint,
                "--consumer", "demo", "--model-uri", "models:/duration@production",
                "--dead-letter", "ride_dead_letters", "--checkpoint-dir", str(checkpoints),
                "--idle-exit", "1"])
        finally:
            self.env = saved
        return payloads(read_stream(kinesis, "ride_predictions"))[0]


def main() -> None:
    setup_logging("INFO")
    signal.signal(signal.SIGTERM, _terminate)
    for old in ("logs", "state"):  # a throwaway server: nothing of the last demo is kept
        shutil.rmtree(HOME / old, ignore_errors=True)
    (HOME / "logs").mkdir(parents=True)
    try:
        run_demo()
    except KeyboardInterrupt:
        log.info("interrupted: stopped everything the demo started")
        raise SystemExit(130) from None
    log.info("stopped everything the demo started")


def run_demo() -> None:
    """Every step; the ExitStack stops each started process on the way out, whatever happens."""
    with ExitStack() as stack:
        demo = Demo(stack)
        uri = demo.tracking_server()
        log.info("tracking server: %s", uri)
        train, val = demo.data()
        demo.train(train, val)
        # One prediction per mode; each step prints its own result line.
        minutes = demo.mlflow_models_serve()
        print(f"\nmlflow models serve  models:/duration/Production  {json.dumps(SAMPLE_RIDE)}"
              f"  ->  {minutes:.2f} minutes\n", flush=True)
        online = demo.online()
        print(f"\nonline serve.web     models:/duration@production  {json.dumps(SAMPLE_RIDE)}"
              f"  ->  {online['duration']:.2f} minutes (version {online['model_version']})\n",
              flush=True)
        scored = demo.batch(val)
        ride = scored["first"]
        actual, metrics = ride["actual_duration"] or float("nan"), scored["metrics"]
        print(f"\nbatch serve.batch     models:/duration@production  {val.name}  ->  ride "
              f"{ride['ride_id']}: {ride['predicted_duration']:.2f} minutes (actual "
              f"{actual:.2f}); {metrics['rows_scored']:,} rows scored, evaluation RMSE "
              f"{metrics['rmse']:.2f} min (run {scored['run_id']} in duration-batch)\n",
              flush=True)
        event = demo.stream()
        print(f"\nstream serve.stream   models:/duration@production  ride_id 256 on Kinesis "
              f"(moto)  ->  {json.dumps(event)}\n", flush=True)


if __name__ == "__main__":
    main()
