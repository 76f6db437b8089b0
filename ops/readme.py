"""The README's sample outputs are what its commands print: run them, then compare or rewrite.

    python -m ops.readme check    # fails, listing each sample that drifted
    python -m ops.readme write    # rewrites README.md's sample outputs from the real output

The walkthrough copies the repository (its tracked and new files) into a temporary git
repository and runs, from its root, the README's own command lines, read from README.md so
that an edited command is what runs: ``ops/stack up``, the synthetic months, ``mlflow run .
--env-manager local``, ``python train.py`` (again, with the held-out month, and the forest),
``python -m serve.web`` and the curl requests, ``mlflow models serve`` and its request,
``serve.batch --output out/``, then ``make demo``'s program twice. Only ports change (free
ones, through the documented ``STACK_PORT``/``WEB_PORT`` or the command's port). It records
what they printed, where their runs landed and ``git status`` of the copy (issue 15).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import click

from ops.procs import free_port, http_ok, spawn, stop
from serve.atomic import write_atomic
from serve.cli import Group
from serve.logs import setup_logging

log = logging.getLogger("readme")
ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO = "python -m ops.demo"  # what `make demo` runs once .venv is installed
WRITTEN = (".stack", "data", "out", "predictions")  # the documented output paths run here
RUN_LINE = re.compile(r"^run ([0-9a-f]{8})[0-9a-f]*(\.\.\.)?: (version .*)$")
QUALITY = re.compile(r"RMSE (\S+) validation, \*\*(\S+) held-out\*\* minutes; `rf` (\S+) / "
                     r"(\S+) \(and the gate (promoted|did not promote) it over `lr`\)")
# Settings a developer's shell may hold that would point the copy elsewhere.
_FOREIGN = ("MLFLOW_", "STACK_", "WEB_", "BATCH_", "KINESIS_", "MODEL_", "AWS_", "POSTGRES_",
            "PREDICTIONS_", "DEAD_LETTER", "PYTHONPATH")


# -- reading the README --------------------------------------------------------------------
@dataclass
class Cmd:
    """One command of a ``bash`` block: its text, and the README line of its sample output."""

    text: str
    words: str  # the command without comments, normalized (for finding it)
    sample_line: int | None = None


def section(lines: list[str], name: str) -> range:
    """Line numbers (0-based) between ``<!-- section:NAME -->`` and its end marker."""
    start = lines.index(f"<!-- section:{name} -->")
    return range(start + 1, lines.index(f"<!-- /section:{name} -->", start))


def _complete(text: str) -> bool:
    if text.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:  # an open quote: the command goes on (a JSON body over two lines)
        return False
    return True


def commands(lines: list[str], name: str) -> list[Cmd]:
    """The commands of section ``name``'s ``bash`` blocks; a ``# {...}`` line right after a
    command is its sample output."""
    cmds: list[Cmd] = []
    pending: list[str] = []
    in_bash = False
    for i in section(lines, name):
        line = lines[i]
        if line.startswith("```"):
            in_bash = not in_bash and line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        if pending or (line.strip() and not line.lstrip().startswith("#")):
            pending.append(line)
            if _complete("\n".join(pending)):
                text = "\n".join(pending)
                words = shlex.split(text.replace("\\\n", " "), comments=True)
                cmds.append(Cmd(text, shlex.join(words)))
                pending = []
        elif line.lstrip().startswith("# {") and cmds and cmds[-1].sample_line is None:
            cmds[-1].sample_line = i
    return cmds


def find(cmds: list[Cmd], start: str) -> Cmd:
    """The one command that is ``start`` (or begins with it); the README must still have it."""
    found = [c for c in cmds if c.words == start] or [c for c in cmds if c.words.startswith(start)]
    if len(found) != 1:
        raise RuntimeError(f"README.md has {len(found)} commands starting with {start!r}: "
                           "update ops/readme.py with the README")
    return found[0]


def inline_code(lines: list[str], name: str, start: str) -> str:
    """The inline code span of section ``name`` that begins with ``start``."""
    text = "\n".join(lines[i] for i in section(lines, name))
    spans = [s for s in re.findall(r"`([^`\n]+)`", text) if s.startswith(start)]
    if len(spans) != 1:
        raise RuntimeError(f"README.md's {name} section has {len(spans)} spans {start!r}")
    return spans[0]


# -- running it ----------------------------------------------------------------------------
@dataclass
class Results:
    """What the walkthrough saw."""

    samples: dict[int, str] = field(default_factory=dict)  # README line -> output
    runs: dict[str, str] = field(default_factory=dict)  # step -> "run <id>: version ..." line
    experiments: dict[str, str] = field(default_factory=dict)  # step -> experiment name
    demos: list[str] = field(default_factory=list)  # each demo's output
    data_before_demo: dict[str, str] = field(default_factory=dict)  # data/ file -> sha256
    data_after_demo: dict[str, str] = field(default_factory=dict)
    git_status: str = ""
    written: list[str] = field(default_factory=list)  # which of WRITTEN the commands made


class Walkthrough:
    """A copy of the repository and the commands run in it, as a user runs them."""

    def __init__(self, work: Path, stack: ExitStack):
        self.repo, self.stack, self.logs = work / "repo", stack, work / "logs"
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], cwd=ROOT, capture_output=True,
                               check=True).stdout.decode().split("\0")
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (self.repo / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, self.repo / name)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)}
        self.env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + self.env["PATH"]
        self.sh("git init -q && git add -A && git -c user.name=readme "
                "-c user.email=readme@localhost commit -qm 'a copy'")

    def sh(self, cmd: str, timeout: float = 900) -> str:
        """Run ``cmd`` with bash in the copy; its stdout and stderr, or an error with both."""
        t0 = time.monotonic()
        res = subprocess.run(["bash", "-c", cmd], cwd=self.repo, env=self.env, text=True,
                             capture_output=True, timeout=timeout)
        log.info("%.0f s  %s", time.monotonic() - t0, " ".join(cmd.split())[:100])
        if res.returncode:
            raise RuntimeError(f"{cmd.splitlines()[0]} failed (exit {res.returncode}):\n"
                               + "\n".join((res.stdout + res.stderr).splitlines()[-20:]))
        return res.stdout + res.stderr

    def serve(self, cmd: str, ready_url: str, name: str) -> int:
        """Start a server command; it is stopped when the walkthrough ends (or by its pid)."""
        proc = spawn(["bash", "-c", f"exec {cmd}"], self.logs / f"{name}.log",
                     http_ok(ready_url), name, timeout=180, env=self.env, cwd=self.repo)
        self.stack.callback(stop, proc.pid)
        return proc.pid

    def data(self) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((self.repo / "data").glob("*"))}


def run_line(output: str) -> str:
    """The ``run <id>: version ...`` line train.py printed last."""
    return [ln for ln in output.splitlines() if RUN_LINE.match(ln)][-1]


def walkthrough(work: Path, demos: int = 2) -> Results:
    """Run the README's commands in a copy of the repository under ``work``."""
    from mlflow.tracking import MlflowClient

    lines = README.read_text().splitlines()
    train, online = commands(lines, "train"), commands(lines, "online")
    r = Results()
    with ExitStack() as stack:
        w = Walkthrough(work, stack)
        w.env["STACK_PORT"] = str(free_port())
        uri = re.search(r"MLFLOW_TRACKING_URI=(\S+)", w.sh(find(train, "ops/stack up").text))[1]
        stack.callback(w.sh, "ops/stack down")
        w.env["MLFLOW_TRACKING_URI"] = uri
        for month in ("2021-01", "2021-02"):
            w.sh(find(train, f"python -m ops.synth --taxi green --month {month}").text)
        r.runs["mlflow run"] = run_line(w.sh(find(train, "mlflow run . --env-manager local").text))
        r.runs["train.py"] = run_line(w.sh(find(train, "python train.py --train data/").text))
        w.sh(inline_code(lines, "performance", "for m in 1 2 3"))
        held_out = inline_code(lines, "performance", "python train.py --train")
        r.runs["held-out"] = run_line(w.sh(held_out))

        port = free_port()
        w.env["WEB_PORT"] = str(port)
        web = w.serve(find(online, "python -m serve.web").text, f"http://127.0.0.1:{port}/ready",
                      "serve-web")
        for cmd in online:
            if cmd.sample_line is not None:
                r.samples[cmd.sample_line] = w.sh(cmd.text.replace("localhost:9696",
                                                                   f"localhost:{port}"))
        stop(web)
        logged = find(online, "python -m serve.web --model-uri").text
        port = free_port()
        w.serve(logged.replace("--port 8080", f"--port {port}"),
                f"http://127.0.0.1:{port}/ready", "serve-web-logged")
        w.sh(f"curl -sf localhost:{port}/predict -H 'Content-Type: application/json' "
             "-d '{\"PULocationID\": 43, \"DOLocationID\": 151, \"trip_distance\": 1.8}'")

        port = free_port()
        serve = find(train, "mlflow models serve -m models:/duration/Production --env-manager "
                            "local").text
        w.serve(serve.replace("-p 5002", f"-p {port}"), f"http://127.0.0.1:{port}/ping",
                "mlflow-models-serve")
        request = find(train, "curl -s localhost:5002/invocations")
        r.samples[request.sample_line] = w.sh(request.text.replace("localhost:5002",
                                                                   f"localhost:{port}"))
        w.sh(find(commands(lines, "batch"), "python -m serve.batch").text)
        r.runs["rf"] = run_line(w.sh(f"{held_out} --model rf"))

        client = MlflowClient(uri)
        for step, line in r.runs.items():
            run = client.get_run(line.split(":")[0].split()[1])  # "run <id>: version ..."
            r.experiments[step] = client.get_experiment(run.info.experiment_id).name
    # The servers, then the stack, are stopped: the demo runs alone, as `make demo` does.
    r.data_before_demo = w.data()
    r.demos = [w.sh(DEMO) for _ in range(demos)]
    r.data_after_demo = w.data()
    r.written = sorted(p.name for p in w.repo.iterdir() if p.name in WRITTEN)
    r.git_status = w.sh("git status --porcelain --untracked-files=all")
    return r


# -- comparing and rewriting ---------------------------------------------------------------
def rendered(lines: list[str], r: Results) -> list[str]:
    """README lines with every sample output replaced by what the walkthrough printed."""
    new = list(lines)
    for i, output in r.samples.items():
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        new[i] = f"{indent}# {output.strip()}"
    m = RUN_LINE.match(r.runs["train.py"])
    for i in section(lines, "train"):
        if RUN_LINE.match(lines[i]):
            new[i] = f"run {m[1]}...: {m[3]}"
    lr, rf = _rmse(r.runs["held-out"]), _rmse(r.runs["rf"])
    verdict = "did not promote" if "not promoted" in r.runs["rf"] else "promoted"
    for i in section(lines, "performance"):
        new[i] = QUALITY.sub(f"RMSE {lr[0]:.2f} validation, **{lr[1]:.2f} held-out** minutes; "
                             f"`rf` {rf[0]:.2f} / {rf[1]:.2f} (and the gate {verdict} it over "
                             "`lr`)", lines[i])
    return new


def _rmse(line: str) -> tuple[float, float]:
    return (float(re.search(r"val_rmse=(\S+)", line)[1]),
            float(re.search(r"test_rmse=(\S+)", line)[1]))


def same(old: str, new: str) -> bool:
    """Whether a README line still says what the command printed: run ids aside, and JSON
    compared by value (floats to 1e-9, which BLAS builds may differ by)."""
    old, new = (RUN_LINE.sub(r"run <id>: \3", s.strip()) for s in (old, new))
    if old == new:
        return True
    try:
        return _close(json.loads(old.lstrip("# ")), json.loads(new.lstrip("# ")))
    except ValueError:
        return False


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, int | float) and isinstance(b, int | float)
                and math.isclose(a, b, rel_tol=1e-9))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_close, a, b))
    return a == b


def drift(lines: list[str], r: Results) -> list[str]:
    """One message per README line whose sample differs from the real output."""
    return [f"README.md:{i + 1}: says   {old.strip()}\n{' ' * len(str(i + 1))}           "
            f"printed {new.strip()}"
            for i, (old, new) in enumerate(zip(lines, rendered(lines, r), strict=True))
            if not same(old, new)]


@click.group(cls=Group)
def cli() -> None:
    """Check or rewrite README.md's sample outputs by running its commands."""
    setup_logging("INFO")


@cli.command()
def check() -> None:
    """Run the README's commands; fail listing every sample output that drifted."""
    with tempfile.TemporaryDirectory() as tmp:
        problems = drift(README.read_text().splitlines(), walkthrough(Path(tmp), demos=0))
    for p in problems:
        click.echo(p)
    if problems:
        raise click.ClickException(f"{len(problems)} sample(s) drifted: python -m ops.readme "
                                   "write")
    click.echo("README.md: every sample output is what its command prints")


@cli.command()
def write() -> None:
    """Run the README's commands and rewrite README.md's sample outputs from their output."""
    with tempfile.TemporaryDirectory() as tmp:
        lines = README.read_text().splitlines()
        new = rendered(lines, walkthrough(Path(tmp), demos=0))
    write_atomic(README, "\n".join(new) + "\n")
    click.echo(f"README.md: {sum(a != b for a, b in zip(lines, new, strict=True))} line(s) "
               "rewritten")


if __name__ == "__main__":
    cli(prog_name="python -m ops.readme")
