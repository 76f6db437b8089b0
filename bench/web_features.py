"""serve.web's protocol, batching and process options, measured: ``python bench/web_features.py``.

On a throwaway embedded tracking server it registers the linear model (``duration``) and a
100-tree random forest (``duration-rf``, ``train.py --model rf``), then loads each server
with wrk (one thread; wrk and the server share the 2 cores) and prints, from this one run:

* V2 ``/v2/models/duration/infer`` vs ``/invocations``, one ride, 8 connections (target:
  V2 within 10%; best of 3 alternated runs each);
* adaptive batching on the linear model, 8 connections (it should not pay: default off);
* the random forest at 64 connections, unbatched vs ``--max-batch-size 64``;
* ``--workers 2`` (a ``SO_REUSEPORT`` socket per process) vs one process vs
  ``uvicorn --workers 2`` (one shared socket) on the linear model, 8 connections.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import click
from online import LUA, RIDE, ROOT, Bench, need_wrk, wrk

from ops.procs import stop

V2_BODY = {"inputs": [{"name": c, "datatype": t, "shape": [1], "data": [RIDE[c]]} for c, t in (
    ("PULocationID", "INT64"), ("DOLocationID", "INT64"), ("trip_distance", "FP64"))]}
FACTORY = '''from serve.web.app import create_app
from serve.web.settings import WebSettings


def app():
    return create_app(WebSettings())
'''


def ratio(a, b, what: str) -> str:
    return f"  ratio {what}: {a.rps / b.rps:.2f}x"


@click.command()
@click.option("--seconds", type=int, default=8, show_default=True, help="Duration of each run.")
@click.option("--train-rows", type=int, default=60_000, show_default=True,
              help="Rows of the synthetic training month.")
def main(seconds: int, train_rows: int) -> None:
    """V2 vs /invocations, batching (linear, forest), --workers 2 vs uvicorn --workers 2."""
    need_wrk()
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp, ExitStack() as stack:
        home = Path(tmp)
        bench = Bench(stack, home)
        bench.registry(train_rows)
        data = home / "data"
        subprocess.run([sys.executable, "train.py", "--train", str(data / "train.parquet"),
                        "--val", str(data / "val.parquet"), "--model", "rf", "--n-estimators",
                        "100", "--registered-model", "duration-rf"], env=bench.env, cwd=ROOT,
                       check=True, capture_output=True)
        inv, v2 = home / "inv.lua", home / "v2.lua"
        inv.write_text(LUA.format(body=json.dumps({"dataframe_records": [RIDE]})))
        v2.write_text(LUA.format(body=json.dumps(V2_BODY)))
        (home / "factory.py").write_text(FACTORY)
        click.echo(f"2 cores shared by the server and wrk -t1; {seconds} s per run; load "
                   f"average before: {os.getloadavg()[0]:.2f}")

        def serve(name: str, *args: str, model: str = "models:/duration/1") -> str:
            return bench.spawn(name, [sys.executable, "-m", "serve.web", "--model-uri", model,
                                      "--port", "{port}", "--log-level", "warning", *args],
                               "/ready")

        def load(url, lua, name, connections=8):
            wrk(url, lua, 2, "warm-up", connections)
            return wrk(url, lua, seconds, name, connections)

        def done() -> None:
            stop(bench.pid)  # free the cores for the next server

        url = serve("serve-web")
        # The control: /invocations with its body padded to the V2 body's size (an ignored
        # params entry), to tell the protocol's extra bytes from the V2 code's cost.
        pad = {"dataframe_records": [RIDE], "params": {"pad": ""}}
        pad["params"]["pad"] = "x" * max(0, len(json.dumps(V2_BODY)) - len(json.dumps(pad)))
        padded = home / "padded.lua"
        padded.write_text(LUA.format(body=json.dumps(pad)))
        rounds = [(load(url + "/invocations", inv, "linear /invocations"),
                   load(url + "/v2/models/duration/infer", v2, "linear V2 /infer"),
                   load(url + "/invocations", padded, "linear /invocations, V2-sized body"))
                  for _ in range(3)]  # alternated: the machine's noise hits all alike
        done()
        a, b, p = (max((r[i] for r in rounds), key=lambda x: x.rps) for i in range(3))
        click.echo(f"\none ride, 8 keep-alive connections, {len(json.dumps(V2_BODY))}-byte V2 "
                   "body (best of 3 alternated runs each: "
                   + ", ".join("/".join(f"{x.rps:,.0f}" for x in r) for r in rounds) + ")")
        click.echo("  " + a.line() + "\n  " + b.line() + "\n  " + p.line())
        click.echo(ratio(b, a, "V2 / invocations") + " (target >= 0.90)")
        click.echo(ratio(b, p, "V2 / invocations with a V2-sized body"))

        url = serve("serve-web-batched", "--max-batch-size", "64", "--max-batch-delay-ms", "2")
        c = load(url + "/invocations", inv, "linear, batching 64 / 2 ms")
        done()
        click.echo("\nlinear model, adaptive batching, 8 connections\n  " + a.line() + "\n  "
                   + c.line())
        click.echo(ratio(c, a, "batched / unbatched"))

        rf = "models:/duration-rf/1"
        url = serve("rf", model=rf)
        d = load(url + "/invocations", inv, "forest, unbatched", 64)
        done()
        url = serve("rf-batched", "--max-batch-size", "64", "--max-batch-delay-ms", "2",
                    model=rf)
        e = load(url + "/invocations", inv, "forest, batching 64 / 2 ms", 64)
        f = load(url + "/v2/models/duration-rf/infer", v2, "forest, batching, V2", 64)
        done()
        click.echo("\nrandom forest (100 trees), one ride, 64 connections\n  " + d.line()
                   + "\n  " + e.line() + "\n  " + f.line())
        click.echo(ratio(e, d, "batched / unbatched") + " (target >= 3x, p99 < 50 ms)")

        url = serve("serve-web-workers", "--workers", "2")
        g = load(url + "/invocations", inv, "serve.web --workers 2")
        done()
        uv = bench.spawn("uvicorn-workers", [
            str(Path(sys.executable).parent / "uvicorn"), "--factory", "factory:app", "--port",
            "{port}", "--workers", "2", "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning"], "/ready",
            env={"PYTHONPATH": f"{home}{os.pathsep}{ROOT}",
                 "MODEL_URI": "models:/duration/1"})
        h = load(uv + "/invocations", inv, "uvicorn --workers 2 (shared socket)")
        done()
        click.echo("\nprocesses, linear model, one ride, 8 connections\n  " + a.line() + "\n  "
                   + g.line() + "\n  " + h.line())
        click.echo(ratio(g, a, "--workers 2 / one process"))
        click.echo(ratio(g, h, "--workers 2 / uvicorn --workers 2"))


if __name__ == "__main__":
    main()
