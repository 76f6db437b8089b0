"""Noise that looks like failure (issue 15): outside a terminal, waiting prints nothing and
MLflow's artifact progress bars are off, for every CLI (``serve.logs.setup_logging``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops.procs import wait_for

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import itertools, logging, os
from ops.procs import wait_for
from serve.logs import setup_logging

setup_logging("INFO")
attempts = itertools.count()
wait_for(lambda: next(attempts) >= 3, "something slow", timeout=30, interval=0.01)
print("bars", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"))
"""


def test_waiting_and_progress_bars_are_silent_in_a_log():
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "bars false"
    assert res.stderr == "", res.stderr  # three failed attempts, not one line about them


def test_a_wait_that_fails_says_why():
    with pytest.raises(TimeoutError, match=r"slow thing: not ready after 0 s \(OSError: nope\)"):
        wait_for(lambda: (_ for _ in ()).throw(OSError("nope")), "slow thing", timeout=0.05,
                 interval=0.01)
