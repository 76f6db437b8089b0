"""What the benchmarks share: a throwaway tracking server with models trained by ``train.py``,
process timing, and the load average line every benchmark prints."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from ops.procs import free_port, http_ok, spawn, stop
from ops.stackctl.server import embedded_server_cmd, server_env
from ops.synth import write_month

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


def bench_env(home: Path) -> dict[str, str]:
    """The environment of every process a benchmark starts: the venv's commands first, the
    version cache and temporary files inside the benchmark's own folder."""
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
                MODEL_CACHE_DIR=str(home / "model-cache"), TMPDIR=str(tmp),
                MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")


class Registry:
    """An embedded ``mlflow server`` on a free port (stopped with ``stack``) and the months
    the models are trained on."""

    def __init__(self, stack: ExitStack, home: Path, env: dict[str, str], rows: int = 60_000):
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        proc = spawn(embedded_server_cmd(home / "mlflow", "127.0.0.1", port),
                     home / "mlflow-server.log", http_ok(f"{self.uri}/health"), "mlflow server",
                     timeout=180, env=server_env(**{k: env[k] for k in ("PATH", "TMPDIR")}))
        stack.callback(stop, proc.pid)
        self.env = dict(env, MLFLOW_TRACKING_URI=self.uri)
        data = home / "data"
        self.train = write_month("green", "2021-01", rows, data / "train.parquet", 0)
        self.val = write_month("green", "2021-02", rows // 2, data / "val.parquet", 1)

    def train_model(self, *args: str) -> None:
        """``python train.py`` on the months (``args``: ``--model rf``, ``--registered-model``)."""
        out = subprocess.run([sys.executable, "train.py", "--train", str(self.train), "--val",
                              str(self.val), *args], env=self.env, cwd=ROOT,
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"train.py {' '.join(args)} failed:\n{out.stderr[-3000:]}")


def load_line(when: str) -> str:
    """``load average <when>: 1-min 5-min 15-min`` (the machine is shared)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {when}: {one:.2f} {five:.2f} {fifteen:.2f} (2 cores)"
