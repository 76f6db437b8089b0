"""serve.web vs ``mlflow models serve`` on the same registered model: ``python bench/online.py``.

Everything runs on a throwaway embedded tracking server: synthetic months are
written, ``train.py`` registers version 1 of ``duration``, then each server is
loaded by ``wrk -t1 -c8`` (8 keep-alive connections, C, not the bottleneck) with
the same one-ride ``/invocations`` body for ``--seconds``:
``mlflow models serve -w 1`` and ``-w 2``, each with its per-request access log
(uvicorn's default, what users run) and without it (``UVICORN_ACCESS_LOG=false``;
the best of the four is the reference), and ``python -m serve.web`` (no access
log: it counts requests in ``/metrics``). Then serve.web at a fixed rate
(a paced client that measures from the scheduled send time, so a stall is not
hidden), and 100-ride requests on both (rows/s). Prints both numbers of every
comparison and their ratio, from this one run on this one machine.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from common import Registry, bench_env, load_line

from ops.procs import free_port, http_ok, spawn, stop

ROOT = Path(__file__).resolve().parents[1]
RIDE = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}
LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{body}]]
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass
class Load:
    """One load run: throughput and latency percentiles (ms)."""

    name: str
    rps: float
    p50: float
    p99: float
    errors: int

    def line(self, rows: int = 1) -> str:
        extra = f", {self.rps * rows:>9,.0f} rows/s" if rows > 1 else ""
        return (f"{self.name:<44} {self.rps:>8,.0f} req/s{extra}  p50 {self.p50:6.2f} ms  "
                f"p99 {self.p99:6.2f} ms  errors {self.errors}")


def need_wrk() -> str:
    """Path of wrk, or a clear message on how to get it."""
    path = shutil.which("wrk")
    if not path:
        raise click.ClickException("wrk is not installed: run `make bench` (installs it) or "
                                   "`apt-get install -y wrk`")
    return path


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m[1]) * UNITS[m[2]]


def wrk(url: str, lua: Path, seconds: int, name: str, connections: int = 8) -> Load:
    """Run ``wrk -t1 -c{connections}`` and parse requests/s, p50, p99 and non-2xx answers."""
    out = subprocess.run([need_wrk(), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", str(lua), url], capture_output=True, text=True,
                         check=True).stdout
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))  # "1.03s "
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    return Load(name, rps, _ms(pct["50"]), _ms(pct["99"]), errors)


def paced(host: str, port: int, path: str, body: bytes, rate: float, seconds: float,
          connections: int = 8) -> Load:
    """A fixed request rate over keep-alive connections; latency from the scheduled send time."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    t0 = time.monotonic() + 0.2
    headers = {"Content-Type": "application/json"}

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        interval = connections / rate
        mine, bad = [], 0
        k = 0
        while (due := t0 + (k + i / connections) * interval) < t0 + seconds:
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                resp.read()
                bad += resp.status != 200
            except OSError:
                bad += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
            mine.append(time.monotonic() - due)
            k += 1
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array(latencies) * 1e3
    return Load(f"serve.web at {rate:.0f} req/s (paced)", len(ms) / seconds,
                float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), errors[0])


class Bench:
    """Processes started by the benchmark are stopped when it ends, also on failure."""

    def __init__(self, stack: ExitStack, home: Path):
        self.stack, self.home = stack, home
        self.env = bench_env(home)

    def spawn(self, name: str, cmd: list[str], ready: str, env: dict | None = None) -> str:
        """Start ``cmd`` ({port} replaced by a free port), wait until ``ready`` answers 200."""
        port = free_port()
        cmd = [c.replace("{port}", str(port)) for c in cmd]
        url = f"http://127.0.0.1:{port}"
        try:
            proc = spawn(cmd, self.home / f"{name}.log", http_ok(url + ready), name, timeout=180,
                         env={**self.env, **(env or {})}, cwd=ROOT)
        except (TimeoutError, RuntimeError) as e:
            log = (self.home / f"{name}.log").read_text(errors="replace")[-2000:]
            raise click.ClickException(f"{name} did not start: {e}\n{log}") from e
        self.stack.callback(stop, proc.pid)
        self.pid = proc.pid
        return url

    def registry(self, rows: int) -> Registry:
        """Throwaway tracking server + version 1 of ``duration`` trained by train.py."""
        reg = Registry(self.stack, self.home, self.env, rows)
        self.env = reg.env
        reg.train_model()
        return reg


@click.command()
@click.option("--seconds", type=int, default=10, show_default=True,
              help="Duration of each wrk run (and of the paced run).")
@click.option("--rate", type=float, default=1000, show_default=True,
              help="Requests/s of the fixed-rate latency run.")
@click.option("--train-rows", type=int, default=60_000, show_default=True,
              help="Rows of the synthetic training month.")
def main(seconds: int, rate: float, train_rows: int) -> None:
    """Throughput, latency and batch rows/s of serve.web vs mlflow models serve."""
    need_wrk()
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp, ExitStack() as stack:
        home = Path(tmp)
        bench = Bench(stack, home)
        bench.registry(train_rows)
        one = home / "one.lua"
        one.write_text(LUA.format(body=json.dumps({"dataframe_records": [RIDE]})))
        hundred = home / "hundred.lua"
        hundred.write_text(LUA.format(body=json.dumps({"dataframe_records": [RIDE] * 100})))
        model = "models:/duration/1"
        click.echo(f"2 cores shared by server and wrk -t1 -c8; {seconds} s per run; "
                   f"{load_line('before')}")

        mlflow_runs = {}
        for workers in (1, 2):
            for access_log in (True, False):
                name = (f"mlflow models serve -w {workers}"
                        f"{'' if access_log else ', no access log'}")
                url = bench.spawn(f"mlflow-w{workers}-{access_log}", [
                    sys.executable, "-m", "mlflow", "models", "serve", "-m", model,
                    "--env-manager", "local", "-h", "127.0.0.1", "-p", "{port}", "-w",
                    str(workers)], "/ping", env={"UVICORN_ACCESS_LOG": str(access_log).lower()})
                wrk(url + "/invocations", one, 2, "warm-up")
                mlflow_runs[name] = (url, bench.pid, wrk(url + "/invocations", one, seconds,
                                                         name))
        best = max(mlflow_runs, key=lambda n: mlflow_runs[n][2].rps)
        for name, (_, pid, _) in mlflow_runs.items():
            if name != best:
                stop(pid)  # free the cores for the next runs
        mlflow_url, _, ref = mlflow_runs[best]

        url = bench.spawn("serve-web", [sys.executable, "-m", "serve.web", "--model-uri", model,
                                        "--port", "{port}", "--log-level", "warning"], "/ready")
        wrk(url + "/invocations", one, 2, "warm-up")
        ours = wrk(url + "/invocations", one, seconds, "serve.web")
        ours_predict = wrk(url + "/predict", _predict_lua(home), seconds, "serve.web /predict")

        click.echo("\none-ride POST /invocations, 8 keep-alive connections")
        for _, _, run in mlflow_runs.values():
            click.echo("  " + run.line())
        click.echo("  " + ours.line())
        click.echo("  " + ours_predict.line())
        click.echo(f"  throughput ratio serve.web / best baseline ({best}): "
                   f"{ours.rps:,.0f} / {ref.rps:,.0f} req/s = {ours.rps / ref.rps:.1f}x "
                   f"(target >= 5x)")

        port = int(url.rsplit(":", 1)[1])
        fixed = paced("127.0.0.1", port, "/invocations",
                      json.dumps({"dataframe_records": [RIDE]}).encode(), rate, seconds)
        click.echo(f"\nfixed rate\n  {fixed.line()}  (target p99 < 2 ms)")

        batch_ref = wrk(mlflow_url + "/invocations", hundred, seconds, best)
        batch_ours = wrk(url + "/invocations", hundred, seconds, "serve.web")
        click.echo("\n100-ride POST /invocations, 8 keep-alive connections")
        click.echo("  " + batch_ref.line(100))
        click.echo("  " + batch_ours.line(100))
        click.echo(f"  rows/s ratio: {batch_ours.rps * 100:,.0f} / {batch_ref.rps * 100:,.0f} = "
                   f"{batch_ours.rps / batch_ref.rps:.1f}x")
        click.echo(load_line("after"))


def _predict_lua(home: Path) -> Path:
    lua = home / "predict.lua"
    lua.write_text(LUA.format(body=json.dumps(RIDE)))
    return lua


if __name__ == "__main__":
    main()
