"""The README's commands, run as written in a copy of the repository (issue 15, items 4, 6, 7):
their sample outputs are what they print, `mlflow run` lands in experiment `duration`, and
neither they nor two `make demo`s leave anything for `git status` to report."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from ops import readme

# One walkthrough (about 5 min on an idle 2-core machine: months, four trainings, servers, two
# demos) feeds every test here; its bound is a readiness bound for a busy machine.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[1]
# Options through which a README command writes files, and the commands' default output folders.
OUTPUT_OPTIONS = ("--output", "--out", "--log-predictions", "--checkpoint-dir", "-d")


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> readme.Results:
    return readme.walkthrough(tmp_path_factory.mktemp("readme"), demos=2)


def test_sample_outputs_are_what_the_commands_print(walk):
    problems = readme.drift(readme.README.read_text().splitlines(), walk)
    assert not problems, ("README.md drifted from the code (python -m ops.readme write):\n"
                          + "\n".join(problems))


def test_every_sample_output_was_checked(walk):
    """Each `# {...}` line under a README command, and the gate's line, came from a run."""
    lines = readme.README.read_text().splitlines()
    documented = {c.sample_line for name in ("train", "online", "batch", "stream")
                  for c in readme.commands(lines, name) if c.sample_line is not None}
    assert documented == set(walk.samples)
    assert len(documented) == 7  # every documented answer, V2 /infer included


def test_mlflow_run_lands_in_the_duration_experiment_like_train_py(walk):
    assert walk.experiments == {"mlflow run": "duration", "train.py": "duration",
                                "held-out": "duration", "rf": "duration"}


@pytest.mark.parametrize("step, verdict", [("mlflow run", "version 1 "),
                                           ("train.py", "version 2 ")])
def test_the_gate_sees_the_same_model_twice(walk, step, verdict):
    assert verdict in walk.runs[step]
    assert ("not promoted" in walk.runs[step]) == (step == "train.py")


def test_git_status_is_clean_after_the_readme_commands_and_two_demos(walk):
    # The documented output paths were really written: the check below is not vacuous.
    assert walk.written == [".stack", "data", "out", "predictions"]
    assert walk.git_status == ""


def test_demo_leaves_the_real_month_names_alone(walk):
    assert set(walk.data_before_demo) >= {"green_tripdata_2021-01.parquet",
                                          "green_tripdata_2021-02.parquet"}
    assert walk.data_after_demo == walk.data_before_demo


def test_every_demo_starts_a_fresh_throwaway_server(walk):
    assert len(walk.demos) == 2
    for output in walk.demos:
        trained = [ln for ln in output.splitlines() if "mlflow run: run " in ln]
        assert trained and "version 1 " in trained[-1], output[-3000:]
        assert "promoted (first production version)" in trained[-1], trained[-1]


def _documented_outputs() -> list[str]:
    """Local paths the README's commands write to, from their output options."""
    lines = readme.README.read_text().splitlines()
    sections = re.findall(r"<!-- section:(\w+) -->", "\n".join(lines))
    paths = []
    for name in sections:
        for cmd in readme.commands(lines, name):
            words = shlex.split(cmd.words)
            if words[0] in ("curl", "printf", "docker"):  # -d: a request body; docker: detach
                continue
            paths += [words[i + 1] for i, w in enumerate(words[:-1]) if w in OUTPUT_OPTIONS]
            if words[:3] == ["python", "-m", "ops.synth"] and "--out" not in words:
                paths.append("data/")  # ops.synth's default output folder
    return [p for p in paths if "://" not in p and not p.startswith("$")]


def test_every_documented_output_path_is_ignored():
    paths = _documented_outputs()
    assert {"out/", "predictions/", "data/", "build/mlflow-image"} <= set(paths), paths
    for path in paths:
        probe = str(Path(path) / "probe.parquet")
        res = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
        assert res.returncode == 0, f"{path} (documented in README.md) is not git-ignored"
