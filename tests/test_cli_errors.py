"""The first hour (issue 15, items 2 and 3): every common mistake is one line naming the input
and the fix, a non-zero exit and no traceback, from every command line; ``-v`` shows the trace.

Each command runs as a user runs it: a subprocess, from a folder without a ``.env``.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import requests
from click.testing import CliRunner

from ops.procs import free_port, start, stop, wait_for
from serve.cli import Command, Group
from serve.config import require_tracking_server
from serve.errors import InvalidInput, TrackingServerUnavailable

ROOT = Path(__file__).resolve().parents[1]
# Readiness bound of a command that must fail fast: python + mlflow imports on a busy 2-core
# machine, plus the bounded check (5 s). MLflow's own retries took 4 min 12 s before.
FAIL_FAST_S = 60
INFO_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ")  # serve.logs' format


def run(args: list[str], cwd: Path, env: dict | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd`` with the project importable and ``env`` on top."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for key, value in list(full.items()):
        if value is None:
            del full[key]
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with one line on stderr (besides INFO progress logs), no traceback,
    naming ``needles``."""
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "Traceback" not in out, out
    # Progress logged at INFO before the mistake showed up is not part of the error.
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not INFO_LOG.match(ln)]
    assert len(lines) == 1, out
    assert lines[0].startswith("Error: "), out
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def no_server() -> str:
    """A tracking URI where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


# -- item 2: forgetting to start the stack ---------------------------------------------------

@pytest.fixture(scope="module")
def streams(moto):
    """An input and an output stream on moto_server, so only the tracking server is missing."""
    from serve.stream.produce import ensure_stream

    kinesis = moto.client("kinesis")
    names = (f"rides-{secrets.token_hex(3)}", f"predictions-{secrets.token_hex(3)}")
    for name in names:
        ensure_stream(kinesis, name, 1)
    return names


def _no_server_commands(months, streams, moto, tmp_path) -> dict[str, tuple[list[str], dict]]:
    return {
        "train.py": ([str(ROOT / "train.py"), "--train", str(months.train), "--val",
                      str(months.val)], {}),
        "serve.batch": (["-m", "serve.batch", "--input", str(months.val), "--output",
                         str(tmp_path / "out")], {}),
        "serve.stream": (["-m", "serve.stream", "--input-stream", streams[0], "--output-stream",
                          streams[1], "--consumer", "c", "--endpoint-url", moto.endpoint,
                          "--checkpoint-dir", str(tmp_path / "ckpt"), "--idle-exit", "1"],
                         moto.env),
    }


@pytest.mark.parametrize("command", ["train.py", "serve.batch", "serve.stream"])
def test_no_tracking_server_is_one_line_within_seconds(command, months, streams, moto,
                                                       tmp_path):
    args, env = _no_server_commands(months, streams, moto, tmp_path)[command]
    uri = no_server()
    t0 = time.monotonic()
    res = run(args, tmp_path, {**env, "MLFLOW_TRACKING_URI": uri}, timeout=FAIL_FAST_S)
    took = time.monotonic() - t0
    line = one_error_line(res, f"no tracking server at {uri}", "ops/stack up",
                          "MLFLOW_TRACKING_URI")
    print(f"{command}: {took:.1f} s: {line}")


def test_the_check_is_bounded_when_the_server_never_answers():
    """A host that accepts the connection but never answers: the check gives up on time."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # never accepted, never answered
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(TrackingServerUnavailable, match="no answer within 1 s"):
            require_tracking_server(uri, timeout=1)
        assert time.monotonic() - t0 < 10  # readiness bound: 1 s of timeout, plenty of slack


def test_the_check_passes_a_running_server_and_local_stores(tracking_server, tmp_path):
    assert require_tracking_server(tracking_server.uri) == tracking_server.uri
    assert require_tracking_server(f"sqlite:///{tmp_path}/mlflow.db").startswith("sqlite")


def _web_log_once(tmp_path: Path, uri: str, model_uri: str, expected: str) -> str:
    """Start serve.web, wait for three failed polls, return its log; it says it once."""
    port = free_port()
    log_path = tmp_path / "web.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    proc = start([sys.executable, "-m", "serve.web", "--port", str(port), "--model-uri",
                  model_uri], log_path, env=env, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"

        def failed_polls() -> float:
            text = requests.get(f"{base}/metrics", timeout=2).text
            m = re.search(r"^duration_registry_poll_failures_total (\S+)$", text, re.M)
            return float(m[1]) if m and float(m[1]) >= 3 else 0

        wait_for(failed_polls, "three failed registry polls", timeout=120, proc=proc)
        assert requests.get(f"{base}/ready", timeout=2).status_code == 503
    finally:
        stop(proc.pid)
    text = log_path.read_text()
    assert "Traceback" not in text, text
    assert "urllib3" not in text, text
    assert text.count(expected) == 1, text
    return text


def test_web_says_once_that_there_is_no_tracking_server(tmp_path):
    """serve.web keeps polling by design (the server may come up later): it says so once."""
    uri = no_server()
    text = _web_log_once(tmp_path, uri, "models:/duration@production",
                         f"no tracking server at {uri}")
    assert "start it with `ops/stack up` or set MLFLOW_TRACKING_URI" in text


def test_web_says_once_that_the_model_does_not_exist(tmp_path, registered_model,
                                                     tracking_server):
    _web_log_once(tmp_path, tracking_server.uri, "models:/duraton@production",
                  "no registered model named 'duraton'")


# -- item 3: one line per mistake --------------------------------------------------------------

@pytest.mark.parametrize("month", ["202101", "2021-1", "2021-13"])
def test_synth_refuses_a_month_not_in_yyyy_mm(month, tmp_path):
    res = run(["-m", "ops.synth", "--month", month, "--rows", "10"], tmp_path)
    one_error_line(res, "--month", "YYYY-MM", month)
    assert not (tmp_path / "data").exists()  # nothing written under a name no reader finds


def test_train_names_a_missing_month_and_how_to_make_one(tmp_path, months, tracking_server):
    res = run([str(ROOT / "train.py"), "--train", "data/nope.parquet", "--val",
               str(months.val)], tmp_path)
    one_error_line(res, "--train", "data/nope.parquet", "python -m ops.synth")


def test_train_names_a_file_that_is_not_parquet(tmp_path, months, tracking_server):
    bad = tmp_path / "rides.parquet"
    bad.write_text("PULocationID,DOLocationID\n1,2\n")
    res = run([str(ROOT / "train.py"), "--train", str(months.train), "--val", str(bad)],
              tmp_path)
    one_error_line(res, "--val", str(bad), "parquet")


def test_train_names_a_month_it_cannot_download(tmp_path, months, tracking_server):
    url = f"{no_server()}/green_tripdata_2021-01.parquet"  # offline, or a wrong host
    res = run([str(ROOT / "train.py"), "--train", url, "--val", str(months.val)], tmp_path,
              {"DURATION_CACHE": str(tmp_path / "cache")})
    one_error_line(res, "--train", f"cannot download {url}", "network")


@pytest.mark.parametrize("uri, needles", [
    ("models:/duraton@production", ["models:/duraton@production",
                                    "no registered model named 'duraton'", "duration"]),
    ("models:/duration@prodution", ["no alias 'prodution'", "production"]),
    ("models:/duration/999", ["no version 999", "its versions: 1"]),
])
def test_batch_names_a_model_uri_typo_and_what_exists(uri, needles, tmp_path, months,
                                                      registered_model):
    res = run(["-m", "serve.batch", "--model-uri", uri, "--input", str(months.val),
               "--output", str(tmp_path / "out")], tmp_path)
    one_error_line(res, *needles)


def test_stream_runner_names_a_model_uri_typo(tmp_path, streams, moto, registered_model):
    res = run(["-m", "serve.stream", "--input-stream", streams[0], "--output-stream",
               streams[1], "--consumer", "c", "--endpoint-url", moto.endpoint,
               "--model-uri", "models:/duraton@production", "--checkpoint-dir",
               str(tmp_path / "ckpt"), "--idle-exit", "1"], tmp_path, moto.env)
    one_error_line(res, "no registered model named 'duraton'", "duration")


def test_no_registered_model_at_all_says_none_exist(tmp_path, months):
    """A fresh tracking server (no model registered yet): the line says how to get one."""
    from tests.conftest import start_tracking_server

    server = start_tracking_server(tmp_path / "mlflow")
    try:
        res = run(["-m", "serve.batch", "--model-uri", "models:/duration@production",
                   "--input", str(months.val), "--output", str(tmp_path / "out")], tmp_path,
                  {"MLFLOW_TRACKING_URI": server.uri})
    finally:
        stop(server.proc.pid)
    one_error_line(res, "no registered model named 'duration'", "none is registered yet",
                   "python train.py")


def _table(postgres: str, table: str) -> tuple[str, str]:
    """The README's form of a table input (no password in the URL) and the password."""
    head, _, host = postgres.rpartition("@")
    scheme_user, _, password = head.rpartition(":")
    return f"{scheme_user}@{host}?table={table}&month=2021-02", password


def test_batch_names_a_missing_database_table(tmp_path, postgres, registered_model):
    table = f"rides_{secrets.token_hex(3)}"
    url, password = _table(postgres, table)
    res = run(["-m", "serve.batch", "--input", url, "--taxi-type", "green", "--output",
               str(tmp_path / "out")], tmp_path, {"PGPASSWORD": password})
    one_error_line(res, table)


def test_batch_names_a_wrong_database_password_without_printing_it(tmp_path, postgres,
                                                                   registered_model):
    wrong = f"wrong{secrets.token_hex(6)}"
    url, _ = _table(postgres, "rides")
    res = run(["-m", "serve.batch", "--input", url, "--taxi-type", "green", "--output",
               str(tmp_path / "out")], tmp_path, {"PGPASSWORD": wrong})
    one_error_line(res, "password", "PGPASSWORD")
    assert wrong not in res.stdout + res.stderr


def test_producer_names_a_missing_stream(tmp_path, months, moto):
    missing = f"nope-{secrets.token_hex(3)}"
    res = run(["-m", "serve.stream.produce", "--rides", str(months.val), "--stream", missing,
               "--endpoint-url", moto.endpoint, "--limit", "10", "--rate", "0"],
              tmp_path, moto.env)
    one_error_line(res, missing)


def test_runner_names_a_missing_input_stream(tmp_path, streams, moto, registered_model):
    missing = f"nope-{secrets.token_hex(3)}"
    res = run(["-m", "serve.stream", "--input-stream", missing, "--output-stream", streams[1],
               "--consumer", "c", "--endpoint-url", moto.endpoint, "--checkpoint-dir",
               str(tmp_path / "ckpt"), "--idle-exit", "1"], tmp_path, moto.env)
    one_error_line(res, missing)


def test_stream_runner_without_an_aws_region(tmp_path, streams, moto):
    env = {**moto.env, "AWS_DEFAULT_REGION": None, "AWS_REGION": None,
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_PROFILE": None}
    res = run(["-m", "serve.stream", "--input-stream", streams[0], "--output-stream",
               streams[1], "--consumer", "c", "--endpoint-url", moto.endpoint,
               "--checkpoint-dir", str(tmp_path / "ckpt"), "--idle-exit", "1"], tmp_path, env)
    one_error_line(res, "AWS_DEFAULT_REGION")


@pytest.mark.skipif(__import__("importlib").util.find_spec("prefect") is not None,
                    reason="prefect is installed here: the mistake cannot happen")
def test_flow_without_prefect_says_how_to_install_it(tmp_path):
    res = run(["-m", "ops.flows.batch_flow", "--output", str(tmp_path / "out"), "--once",
               "--month", "2021-02"], tmp_path)
    one_error_line(res, "prefect", "pip install")


def test_verbose_shows_the_trace(tmp_path):
    res = run(["-m", "ops.synth", "--month", "202101", "--rows", "10", "--verbose"], tmp_path)
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "InvalidInput" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1].startswith("Error: --month must be YYYY-MM")


# -- the convention itself, in-process -------------------------------------------------------

@click.group(cls=Group)
def _group():
    """A group with one command that fails as asked."""


@_group.command()
@click.argument("kind")
def fail(kind):
    if kind == "user":
        raise InvalidInput("--thing: no such thing\nat all")
    if kind == "usage":
        raise click.UsageError("bad usage")
    raise KeyError("a bug")


@pytest.mark.parametrize("args, code, last_line", [
    (["fail", "user"], 1, "Error: --thing: no such thing at all"),
    (["fail", "usage"], 2, "Error: bad usage"),
])
def test_user_errors_are_one_line(args, code, last_line):
    res = CliRunner().invoke(_group, args)
    assert res.exit_code == code
    assert res.output.strip().splitlines()[-1] == last_line
    assert "Traceback" not in res.output


def test_a_bug_keeps_its_traceback():
    res = CliRunner().invoke(_group, ["fail", "bug"])
    assert isinstance(res.exception, KeyError)


@pytest.mark.parametrize("args", [["-v", "fail", "user"], ["fail", "user", "--verbose"]])
def test_verbose_prints_the_trace_then_the_line(args):
    res = CliRunner().invoke(_group, args)
    assert res.exit_code == 1
    assert "Traceback" in res.output and "InvalidInput" in res.output
    assert res.output.strip().splitlines()[-1] == "Error: --thing: no such thing at all"


def _entry_points():
    import ops.aws.__main__
    import ops.flows.batch_flow
    import ops.stackctl.cli
    import ops.synth
    import serve.batch.cli
    import serve.stream.cli
    import serve.stream.produce
    import serve.web.cli
    import train

    return {"train.py": train.main, "ops/synth": ops.synth.main,
            "serve.batch": serve.batch.cli.main, "serve.stream": serve.stream.cli.cli,
            "serve.stream.produce": serve.stream.produce.cli, "serve.web": serve.web.cli.main,
            "ops/stack": ops.stackctl.cli.cli, "ops.aws": ops.aws.__main__.cli,
            "ops/flows": ops.flows.batch_flow.main}


@pytest.mark.parametrize("name", list(_entry_points()))
def test_every_command_line_follows_the_convention(name):
    cmd = _entry_points()[name]
    commands = [cmd, *getattr(cmd, "commands", {}).values()]
    for c in commands:
        assert isinstance(c, (Command, Group)), (name, c.name)
        assert any("--verbose" in p.opts for p in c.params), (name, c.name)


def test_ops_stack_usage_names_ops_stack():
    res = subprocess.run([str(ROOT / "ops" / "stack"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: ops/stack "), res.stdout
