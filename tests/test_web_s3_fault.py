"""The S3 endpoint down while serve.web sees the production alias move (issue 13, web fault).

A production-mode tracking server (PostgreSQL backend, artifacts proxied to S3 on a
moto_server) and serve.web polling it every second under a steady load. S3 stops, the alias
moves from version 1 to 2: serve.web keeps answering with version 1, /ready stays 200, every
failed load of version 2 is counted in /metrics; once S3 is back (same port, same objects: a
real S3 keeps them, moto keeps nothing in memory, so the test puts them back) it serves
version 2. No request fails at any point.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from ops.moto import start_moto
from ops.procs import free_port, http_ok, spawn, stop, wait_for
from ops.stackctl.server import server_cmd, server_env
from tests.loadgen import OpenLoop, Summary, post
from tests.test_web import RIDE, start_web
from tests.test_web_hardening import metric
from tests.test_web_hotswap import served_version, tracking_uri
from tests.test_web_load import address

pytestmark = pytest.mark.integration

NAME = "duration-s3fault"
BUCKET = "duration-s3fault"


@pytest.fixture(scope="module")
def production(tmp_path_factory, postgres, months):
    """moto_server as S3, a tracking server on PostgreSQL proxying artifacts to it, and two
    versions of ``duration-s3fault`` (alias ``production`` on 1)."""
    from mlflow.tracking import MlflowClient

    from train import run_training

    home = tmp_path_factory.mktemp("s3fault")
    moto = start_moto(home / "moto.log")
    moto.client("s3").create_bucket(Bucket=BUCKET)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = spawn(server_cmd("127.0.0.1", port, f"s3://{BUCKET}/mlartifacts"),
                   home / "server.log", http_ok(f"{uri}/health"), "mlflow server", timeout=180,
                   env=server_env(MLFLOW_BACKEND_STORE_URI=postgres,
                                  MLFLOW_S3_ENDPOINT_URL=moto.endpoint, **moto.env))
    try:
        with tracking_uri(uri):
            first = run_training(str(months.train), str(months.val), registered_model=NAME)
            second = run_training(str(months.train), str(months.val), registered_model=NAME,
                                  train_rows=5_000, seed=1)
        assert (first["version"], second["version"]) == ("1", "2")
        client = MlflowClient(tracking_uri=uri)
        client.set_registered_model_alias(NAME, "production", "1")
        objects = moto.client("s3").list_objects_v2(Bucket=BUCKET)["KeyCount"]
        assert objects > 0  # the artifacts really are in the bucket
        yield home, uri, client, moto
    finally:
        stop(server.pid)


def bucket_snapshot(moto) -> dict[str, bytes]:
    s3 = moto.client("s3")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for page in pages for o in page.get("Contents", [])}


def test_s3_down_while_the_alias_moves_keeps_the_old_version_serving(production):
    home, uri, client, moto = production
    w = start_web(home, f"models:/{NAME}@production", uri, "--poll-interval", "1")
    load = OpenLoop(*address(w), lambda i: post("/predict", json.dumps(RIDE).encode()),
                    [(40, 600)])
    back_moto = None
    try:
        assert served_version(w.url) == "1"
        load.start()
        wait_for(lambda: load.sent() >= 80, "load under way", timeout=30)
        objects = bucket_snapshot(moto)
        port = int(moto.endpoint.rsplit(":", 1)[1])
        failures_before = metric(w, "duration_model_load_failures_total")
        moto.stop()
        down = time.monotonic()
        client.set_registered_model_alias(NAME, "production", "2")
        wait_for(lambda: metric(w, "duration_model_load_failures_total") >= failures_before + 5,
                 "five failed loads of version 2", timeout=300)
        ready = requests.get(w.url + "/ready", timeout=10)
        assert (ready.status_code, ready.json()["model_version"]) == (200, "1")
        assert served_version(w.url) == "1"
        back_moto = start_moto(home / "moto-back.log", port=port)  # S3 back on the same port
        s3 = back_moto.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        for key, body in objects.items():
            s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        back = time.monotonic()
        wait_for(lambda: served_version(w.url) == "2", "version 2 served", timeout=180)
        recovered = time.monotonic()
        failed_loads = metric(w, "duration_model_load_failures_total") - failures_before
        shots = load.stop()
    finally:
        load.stop()
        stop(w.proc.pid)
        if back_moto is not None:
            back_moto.stop()

    summary = Summary(shots)
    versions = [json.loads(s.body)["model_version"] for s in shots if s.status == 200]
    between = [json.loads(s.body)["model_version"] for s in shots
               if s.status == 200 and down < s.due and s.due + s.latency < back]
    print(f"\nS3 down {back - down:.1f} s (alias moved to 2 at once): {failed_loads:.0f} failed "
          f"loads counted, version 1 served meanwhile; S3 back -> version 2 served after "
          f"{recovered - back:.1f} s; load: {summary.line(recovered - load.t0)}")
    assert summary.by_status == {200: len(shots)}, summary.by_status  # nothing failed
    assert between and set(between) == {"1"}
    assert {"1", "2"} <= set(versions) and versions[-1] == "2"
    assert failed_loads >= 5
