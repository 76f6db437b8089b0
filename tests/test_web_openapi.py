"""``/openapi.json`` holds to the truth: every route of the app is in it and every documented
operation is routed, and schemathesis (property-based, a fixed example budget and seed, a
time bound) finds no 5xx and no answer off the document on a real server with batching on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from ops.procs import stop
from serve.web.app import create_app
from serve.web.openapi import openapi
from serve.web.settings import WebSettings
from tests.test_web import start_web

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")
EXAMPLES = 25  # per operation and phase
BOUND = 600  # seconds: the run takes ~30 s here; this only stops a hung one


def test_the_document_is_valid_openapi():
    from openapi_spec_validator import validate

    validate(openapi(10_000))


def test_every_route_is_documented_and_every_documented_operation_is_routed():
    app = create_app(WebSettings())
    doc = openapi(app.service.settings.web_max_rows)["paths"]
    documented = {(path, method.upper()) for path, ops in doc.items() for method in ops}
    routed = {(path, method) for path, (method, _) in app.routes.items()}
    v2 = set()
    for path, method in documented:
        if path.startswith("/v2"):
            concrete = path.replace("{model_name}", "duration").replace("{model_version}", "1")
            label, routed_method, _ = app.v2.route(concrete)
            assert (label.replace("{name}", "{model_name}")
                    .replace("{version}", "{model_version}"), routed_method) == (path, method)
            v2.add((path, method))
    assert documented - v2 == routed


@pytest.fixture(scope="module")
def web(registered_model, tracking_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("web-openapi")
    w = start_web(home, "models:/duration@production", tracking_server.uri,
                  "--max-batch-size", "8", "--max-batch-delay-ms", "1", "--max-rows", "1000")
    yield w
    stop(w.proc.pid)


@pytest.mark.integration
def test_the_served_document_is_the_one_in_the_code(web):
    assert requests.get(web.url + "/openapi.json", timeout=10).json() == json.loads(
        json.dumps(openapi(1000)))


@pytest.mark.integration
def test_schemathesis_finds_no_5xx_and_no_answer_off_the_document(web, tmp_path):
    config = tmp_path / "schemathesis.toml"
    # Path parameters fixed to what is served: the 404s of other names are tested in
    # test_web_v2.py; here every generated body reaches the model.
    config.write_text('[parameters]\nmodel_name = "duration"\nmodel_version = "1"\n')
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config),
           "run", web.url + "/openapi.json", "--checks", CHECKS, "-n", str(EXAMPLES),
           "--seed", "20261129", "--phases", "examples,coverage,fuzzing", "-w", "1",
           "--request-timeout", "30", "--no-color"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=BOUND, cwd=tmp_path)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-6000:]
    assert "generated" in report and " passed" in report, report[-3000:]
    log = web.log.read_text()
    assert "Traceback" not in log, log[-3000:]
