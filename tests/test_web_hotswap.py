"""Hot swap under load: the ``production`` alias moves twice during a 60 s steady load, then the
tracking server goes away; clients see no failed request and every answer names its version.

This module has its own tracking server (it is stopped on purpose) and its own registered
model name, so the session's ``duration`` model and server are never disturbed.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import requests

from ops.procs import stop, wait_for
from tests.conftest import start_tracking_server
from tests.test_web import RIDE, start_web

pytestmark = pytest.mark.integration

NAME = "duration-hotswap"
RATE = 40  # requests/s, steady: well under capacity, so a stall would show as a failure


@contextmanager
def tracking_uri(uri: str):
    """Point MLflow at ``uri`` for the block, then back at the session's server.

    ``mlflow.set_experiment`` leaves the experiment id in ``MLFLOW_EXPERIMENT_ID`` (and a
    module global); an id from the session's server means nothing on this one.
    """
    import mlflow
    from mlflow.tracking import fluent

    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    saved_experiment = fluent._active_experiment_id
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = None
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
        fluent._active_experiment_id = saved_experiment
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def registry(tmp_path_factory, months):
    """An own tracking server with two versions of ``duration-hotswap`` (alias on 1)."""
    from mlflow.tracking import MlflowClient

    from train import run_training

    server = start_tracking_server(tmp_path_factory.mktemp("hotswap-mlflow"))
    with tracking_uri(server.uri):
        first = run_training(str(months.train), str(months.val), registered_model=NAME)
        second = run_training(str(months.train), str(months.val), registered_model=NAME,
                              train_rows=5_000, seed=1)
    assert (first["version"], second["version"]) == ("1", "2")
    client = MlflowClient(tracking_uri=server.uri)
    client.set_registered_model_alias(NAME, "production", "1")
    yield server, client
    stop(server.proc.pid)


@pytest.fixture(scope="module")
def web(registry, tmp_path_factory):
    server, _ = registry
    w = start_web(tmp_path_factory.mktemp("hotswap-web"), f"models:/{NAME}@production",
                  server.uri, "--poll-interval", "1")
    yield w
    stop(w.proc.pid)


@dataclass
class Result:
    started: float
    status: int  # 0 = no HTTP answer at all
    version: str | None
    error: str = ""


@dataclass
class SteadyLoad:
    """``rate`` requests/s spread over a few keep-alive connections, each on a fixed schedule."""

    url: str
    rate: float
    seconds: float
    connections: int = 4
    results: list[Result] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True)
                         for i in range(self.connections)]

    def start(self) -> SteadyLoad:
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def join(self) -> list[Result]:
        for t in self._threads:
            t.join(self.seconds + 60)
        return self.results

    def _worker(self, i: int) -> None:
        session = requests.Session()
        interval = self.connections / self.rate
        k = 0
        while True:
            due = self.t0 + (k + i / self.connections) * interval
            if due - self.t0 >= self.seconds:
                return
            time.sleep(max(0.0, due - time.monotonic()))  # pacing, not synchronisation
            started = time.monotonic()
            try:
                if k % 4 == 3:  # every 4th request through the MLflow protocol
                    r = session.post(self.url + "/invocations",
                                     json={"dataframe_records": [RIDE]}, timeout=10)
                    ok = r.status_code == 200 and len(r.json()["predictions"]) == 1
                    res = Result(started, r.status_code, None, "" if ok else r.text[:200])
                else:
                    r = session.post(self.url + "/predict", json=RIDE, timeout=10)
                    body = r.json()
                    res = Result(started, r.status_code, body.get("model_version"),
                                 "" if r.status_code == 200 else r.text[:200])
            except Exception as e:  # noqa: BLE001 - any failure is recorded, not raised
                res = Result(started, 0, None, f"{type(e).__name__}: {e}")
            with self._lock:
                self.results.append(res)
            k += 1

    def done(self) -> int:
        with self._lock:
            return len(self.results)


def served_version(url: str) -> str:
    return requests.get(url + "/version", timeout=5).json()["version"]


def failures(results: list[Result]) -> list[Result]:
    return [r for r in results if r.status != 200 or r.error]


def test_alias_moved_twice_under_steady_load(web, registry):
    _, client = registry
    assert served_version(web.url) == "1"
    load = SteadyLoad(web.url, RATE, seconds=60).start()
    marks = {}
    for at, version in ((RATE * 15, "2"), (RATE * 35, "1")):
        wait_for(lambda at=at: load.done() >= at, f"{at} responses", timeout=90)
        marks[f"moved-{version}"] = time.monotonic()
        client.set_registered_model_alias(NAME, "production", version)
        wait_for(lambda v=version: served_version(web.url) == v, f"version {version} served",
                 timeout=60)
        marks[f"serving-{version}"] = time.monotonic()
    results = load.join()

    assert len(results) >= RATE * 60 * 0.95, len(results)
    assert failures(results) == []
    versions = [r for r in results if r.version]
    assert {r.version for r in versions} == {"1", "2"}
    # Requests started once a version was being served were answered by that version.
    assert all(r.version == "2" for r in versions
               if marks["serving-2"] <= r.started < marks["moved-1"])
    assert all(r.version == "1" for r in versions
               if r.started < marks["moved-2"] or r.started >= marks["serving-1"])
    m = web.metrics()
    assert m[("duration_model_reloads_total", ())] == 3  # first load + two swaps


def test_tracking_server_stopped_mid_run_changes_nothing_for_clients(web, registry):
    server, _ = registry
    load = SteadyLoad(web.url, RATE, seconds=15).start()
    wait_for(lambda: load.done() >= RATE * 3, "load under way", timeout=30)
    before = web.metrics()[("duration_registry_poll_failures_total", ())]
    stop(server.proc.pid)
    stopped_at = time.monotonic()
    wait_for(lambda: web.metrics()[("duration_registry_poll_failures_total", ())] > before,
             "a failed registry poll", timeout=60)
    results = load.join()

    assert failures(results) == []
    after_stop = [r for r in results if r.started > stopped_at and r.version]
    assert after_stop and {r.version for r in after_stop} == {"1"}
    ready = requests.get(web.url + "/ready", timeout=5)
    assert ready.status_code == 200 and ready.json()["model_version"] == "1"
    assert "Traceback" not in web.log.read_text()
