"""The online service's request handling alone: one-ride requests through the ASGI app in this
process (no sockets, no HTTP parser, no load generator), so the cost of each protocol is seen
without the network noise of ``bench/online.py``. Prints microseconds per request on each
endpoint and V2's cost against ``/invocations``.

    python bench/asgi.py            (also part of ``make bench``)
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import click
from common import ROOT, load_line

from ops.synth import write_month
from serve.registry import LoadedModel, ModelRef
from serve.tlc import read_training_frame
from serve.web.app import create_app
from serve.web.holder import Active
from serve.web.settings import WebSettings

sys.path.insert(0, str(ROOT))  # train.py is a script at the top of the repository
from train import build_estimator, fit_model  # noqa: E402

RIDE = {"PULocationID": 43, "DOLocationID": 151, "trip_distance": 1.8}
V2_TYPES = {"PULocationID": "INT64", "DOLocationID": "INT64", "trip_distance": "FP64"}
REQUESTS = {
    "/invocations": {"dataframe_records": [RIDE]},
    "/predict": RIDE,
    "/v2/models/duration/infer": {"inputs": [
        {"name": c, "datatype": t, "shape": [1], "data": [RIDE[c]]} for c, t in V2_TYPES.items()]},
}


def linear_model(rows: int):
    """The linear model ``python train.py`` registers by default, fitted the same way on a
    synthetic month of ``rows`` rides (as bench/stream.py does)."""
    with tempfile.TemporaryDirectory() as tmp:
        month = write_month("green", "2021-01", rows, Path(tmp) / "train.parquet", 0)
        return fit_model(read_training_frame(str(month)), build_estimator("lr", 0, 0, 0))


def app_serving(model):
    app = create_app(WebSettings())
    ref = ModelRef("models:/duration/1", "models:/duration/1", "duration", "1")
    loaded = LoadedModel(python_model=model, load_pyfunc=lambda: None, ref=ref)
    app.service.holder.active = Active(loaded, model, "1")
    return app


async def one(app, path: str, body: bytes) -> None:
    """One POST through the app, as uvicorn hands it over; fails on anything but a 200."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop()

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": path,
               "headers": [(b"content-type", b"application/json"),
                           (b"content-length", str(len(body)).encode())]}, receive, send)
    if sent[0]["status"] != 200:
        raise SystemExit(f"{path}: {sent[0]['status']} {sent[1]['body'][:300]!r}")


async def per_request(app, path: str, body: bytes, calls: int, rounds: int) -> float:
    """Best of ``rounds`` rounds of ``calls`` requests: seconds per request."""
    for _ in range(calls // 2):  # warm-up
        await one(app, path, body)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            await one(app, path, body)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


@click.command()
@click.option("--calls", default=5_000, show_default=True, help="Requests per round.")
@click.option("--rounds", default=5, show_default=True, help="Rounds per endpoint (best kept).")
@click.option("--train-rows", default=60_000, show_default=True,
              help="Rows of the synthetic training month.")
def main(calls: int, rounds: int, train_rows: int) -> None:
    """Microseconds per one-ride request through the ASGI app, per endpoint."""
    app = app_serving(linear_model(train_rows))

    async def run() -> dict[str, float]:
        return {path: await per_request(app, path, json.dumps(body).encode(), calls, rounds)
                for path, body in REQUESTS.items()}

    took = asyncio.run(run())
    app.work.close()
    print(f"one-ride requests through the ASGI app in process, linear model trained on "
          f"{train_rows:,} synthetic rides, best of {rounds} x {calls:,} calls")
    for path, seconds in took.items():
        print(f"  {path:<28} {seconds * 1e6:6.1f} µs/request")
    v2, inv = took["/v2/models/duration/infer"], took["/invocations"]
    print(f"  V2 /infer / /invocations: {v2 * 1e6:.1f} / {inv * 1e6:.1f} µs = {v2 / inv:.2f}x "
          f"the handling cost (the HTTP layer, not counted here, is the same for both)")
    print(load_line("after"))


if __name__ == "__main__":
    main()
