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
import os
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


V2_TYPES = {"PULocationID": "INT64", "DOLocationID": "INT64", "trip_distance": "FP64"}
V2_BODY = {"inputs": [{"name": c, "datatype": t, "shape": [1], "data": [RIDE[c]]}
                      for c, t in V2_TYPES.items()]}
FOREST = "duration-rf"


def ratio(what: str, a: Load, b: Load, target: str = "") -> str:
    """``what: a / b req/s = x`` with both numbers, the ratio and the target (flagged
    INVALID when either run had failed requests)."""
    invalid = "  INVALID: failed requests" if a.errors or b.errors else ""
    return (f"  {what}: {a.rps:,.0f} / {b.rps:,.0f} req/s = {a.rps / b.rps:.2f}x"
            f"{f'  ({target})' if target else ''}{invalid}")


class MLServers:
    """MLServer (ops/mlserver.py: its own virtualenv) on a registered version, one at a time."""

    def __init__(self, bench: Bench):
        self.bench = bench

    def start(self, model_uri: str, name: str, version: str, workers: int,
              batch: tuple[int, float] | None = None):
        """A ready MLServer, or None (the reason printed) if it never serves the model."""
        from ops.mlserver import start_mlserver

        size, delay = batch or (None, None)
        label = f"pw{workers}-{size}-{delay}"
        try:
            server = start_mlserver(model_uri, self.bench.home / f"mlserver-{name}-{label}",
                                    name=name, model_version=version, parallel_workers=workers,
                                    max_batch_size=size, max_batch_time=delay)
        except (TimeoutError, RuntimeError) as e:
            click.echo(f"  MLServer parallel_workers={workers} {label}: did not serve the "
                       f"model ({str(e)[:200]})")
            return None
        self.bench.stack.callback(server.stop)
        return server


@click.command()
@click.option("--seconds", type=int, default=10, show_default=True,
              help="Duration of each wrk run (and of the paced run).")
@click.option("--rate", type=float, default=1000, show_default=True,
              help="Requests/s of the fixed-rate latency run.")
@click.option("--train-rows", type=int, default=60_000, show_default=True,
              help="Rows of the synthetic training month.")
@click.option("--mlserver/--no-mlserver", default=True, show_default=True,
              help="Include MLServer (its virtualenv is created on first use).")
@click.option("--forest/--no-forest", default=True, show_default=True,
              help="Include the random-forest run at 64 connections.")
@click.option("--batch-delays-ms", default="2,10", show_default=True,
              help="Adaptive batching delays tried on both servers (the best of each counts).")
def main(seconds: int, rate: float, train_rows: int, mlserver: bool, forest: bool,
         batch_delays_ms: str) -> None:
    """Throughput and latency of serve.web vs mlflow models serve and MLServer."""
    need_wrk()
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp, ExitStack() as stack:
        home = Path(tmp)
        bench = Bench(stack, home)
        reg = bench.registry(train_rows)
        os.environ.update({k: reg.env[k] for k in ("MLFLOW_TRACKING_URI", "MODEL_CACHE_DIR")})
        lua = {name: home / f"{name}.lua" for name in ("one", "predict", "v2", "hundred")}
        for name, body in (("one", {"dataframe_records": [RIDE]}), ("predict", RIDE),
                           ("v2", V2_BODY), ("hundred", {"dataframe_records": [RIDE] * 100})):
            lua[name].write_text(LUA.format(body=json.dumps(body)))
        model = "models:/duration/1"
        click.echo(f"2 cores shared by the server and wrk -t1; {seconds} s per run; "
                   f"{load_line('before')}")

        def load(url: str, body: str, name: str, connections: int = 8) -> Load:
            wrk(url, lua[body], 2, "warm-up", connections)
            return wrk(url, lua[body], seconds, name, connections)

        mlflow_runs = {}
        for workers in (1, 2):
            for access_log in (True, False):
                name = (f"mlflow models serve -w {workers}"
                        f"{'' if access_log else ', no access log'}")
                url = bench.spawn(f"mlflow-w{workers}-{access_log}", [
                    sys.executable, "-m", "mlflow", "models", "serve", "-m", model,
                    "--env-manager", "local", "-h", "127.0.0.1", "-p", "{port}", "-w",
                    str(workers)], "/ping", env={"UVICORN_ACCESS_LOG": str(access_log).lower()})
                mlflow_runs[name] = (url, bench.pid, load(url + "/invocations", "one", name))
        best = max(mlflow_runs, key=lambda n: mlflow_runs[n][2].rps)
        for name, (_, pid, _) in mlflow_runs.items():
            if name != best:
                stop(pid)  # free the cores for the next runs
        mlflow_url, mlflow_pid, ref = mlflow_runs[best]

        mls: dict[str, Load] = {}
        if mlserver:
            servers = MLServers(bench)
            for workers in (0, 1):
                server = servers.start(model, "duration", "1", workers)
                if server is not None:
                    tag = f"MLServer parallel_workers={workers}"
                    mls[f"{tag} /invocations"] = load(server.url + "/invocations", "one",
                                                      f"{tag} /invocations")
                    mls[f"{tag} V2"] = load(server.infer_url(), "v2", f"{tag} V2 /infer")
                    server.stop()

        url = bench.spawn("serve-web", [sys.executable, "-m", "serve.web", "--model-uri", model,
                                        "--port", "{port}", "--log-level", "warning"], "/ready")
        ours = load(url + "/invocations", "one", "serve.web /invocations")
        ours_predict = load(url + "/predict", "predict", "serve.web /predict")
        ours_v2 = load(url + "/v2/models/duration/infer", "v2", "serve.web V2 /infer")

        click.echo("\nlinear model, one-ride requests, 8 keep-alive connections")
        for run in [r for _, _, r in mlflow_runs.values()] + list(mls.values()) + [
                ours, ours_predict, ours_v2]:
            click.echo("  " + run.line())
        click.echo(ratio(f"serve.web / best mlflow models serve ({best})", ours, ref,
                         "target >= 5x"))
        for proto, mine in (("/invocations", ours), ("V2", ours_v2)):
            theirs = {k: v for k, v in mls.items() if k.endswith(proto)}
            if theirs:
                top = max(theirs, key=lambda k: theirs[k].rps)
                click.echo(ratio(f"serve.web {proto} / best MLServer ({top})", mine,
                                 theirs[top], "target >= 15x"))
        click.echo(ratio("serve.web V2 / serve.web /invocations", ours_v2, ours,
                         "target >= 0.90x"))

        port = int(url.rsplit(":", 1)[1])
        fixed = paced("127.0.0.1", port, "/invocations",
                      json.dumps({"dataframe_records": [RIDE]}).encode(), rate, seconds)
        click.echo(f"\nfixed rate\n  {fixed.line()}  (target p99 < 2 ms)")

        batch_ours = load(url + "/invocations", "hundred", "serve.web")
        stop(bench.pid)
        batch_ref = load(mlflow_url + "/invocations", "hundred", best)
        stop(mlflow_pid)
        click.echo("\n100-ride POST /invocations, 8 keep-alive connections")
        click.echo("  " + batch_ref.line(100))
        click.echo("  " + batch_ours.line(100))
        click.echo(f"  rows/s ratio: {batch_ours.rps * 100:,.0f} / {batch_ref.rps * 100:,.0f} = "
                   f"{batch_ours.rps / batch_ref.rps:.1f}x")
        if forest:
            delays = [float(d) for d in batch_delays_ms.split(",")]
            forest_runs(bench, reg, load, delays, MLServers(bench) if mlserver else None,
                        [w for w in (0, 1) if f"MLServer parallel_workers={w} V2" in mls])
        click.echo(load_line("after"))


def forest_runs(bench: Bench, reg: Registry, load, delays: list[float],
                servers: MLServers | None, mls_workers: list[int]) -> None:
    """100-tree random forest, one-ride V2 requests at 64 connections: serve.web without and
    with adaptive batching, MLServer without and with its adaptive batching."""
    reg.train_model("--model", "rf", "--n-estimators", "100", "--registered-model", FOREST)
    model, infer = f"models:/{FOREST}/1", f"/v2/models/{FOREST}/infer"
    runs: dict[str, list[Load]] = {"ours": [], "ours batched": [], "MLServer": [],
                                   "MLServer batched": []}

    def ours(name: str, *args: str) -> Load:
        url = bench.spawn("forest-web", [sys.executable, "-m", "serve.web", "--model-uri", model,
                                         "--port", "{port}", "--log-level", "warning", *args],
                          "/ready")
        run = load(url + infer, "v2", name, 64)
        stop(bench.pid)
        return run

    runs["ours"].append(ours("serve.web, no batching"))
    for d in delays:
        runs["ours batched"].append(ours(
            f"serve.web --max-batch-size 64 --max-batch-delay-ms {d:g}", "--max-batch-size",
            "64", "--max-batch-delay-ms", f"{d:g}"))
    for workers in mls_workers if servers else []:
        for batch in [None] + [(64, d / 1000) for d in delays]:
            server = servers.start(model, FOREST, "1", workers, batch)
            if server is not None:
                tag = f"MLServer parallel_workers={workers}" + (
                    f", max_batch_size 64, max_batch_time {batch[1] * 1000:g} ms" if batch
                    else ", no batching")
                runs["MLServer batched" if batch else "MLServer"].append(
                    load(server.infer_url(), "v2", tag, 64))
                server.stop()
    click.echo("\nrandom forest (100 trees), one-ride V2 /infer, 64 keep-alive connections")
    for run in (r for kind in runs.values() for r in kind):
        click.echo("  " + run.line())
    top = {kind: max(rs, key=lambda r: r.rps) for kind, rs in runs.items() if rs}
    click.echo(ratio(f"best serve.web batched ({top['ours batched'].name}) / unbatched",
                     top["ours batched"], top["ours"], "target >= 3x"))
    if "MLServer batched" in top:
        click.echo(ratio(f"best serve.web batched / best MLServer batched "
                         f"({top['MLServer batched'].name})", top["ours batched"],
                         top["MLServer batched"], "target >= 2x"))
    click.echo(f"  best serve.web batched: p99 {top['ours batched'].p99:.1f} ms "
               f"(target < 50 ms)")


if __name__ == "__main__":
    main()
