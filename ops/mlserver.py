"""MLServer (Seldon's, with its MLflow runtime) serving a registered model, in its own virtualenv.

MLServer pins its own dependencies (FastAPI, Starlette, protobuf, ...), so it never
goes into the project's venv. :func:`ensure_venv` creates a virtualenv keyed by the
pins below and the Python version under ``$DURATION_CACHE/mlserver-venv/`` once (with
``uv`` when it is installed: seconds instead of minutes on a fresh machine) and reuses
it afterwards; a file lock lets concurrent test sessions share it. :func:`start_mlserver`
downloads a model version from the registry (through the tracking server), writes
MLServer's ``settings.json`` / ``model-settings.json`` (``parallel_workers``, adaptive
batching with ``max_batch_size`` / ``max_batch_time``) and starts ``mlserver start``
until the model answers ``/v2/models/{name}/ready``. The tests and ``bench/online.py``
use it the same way::

    with start_mlserver("models:/duration/1", tmp, parallel_workers=0) as mls:
        requests.post(f"{mls.url}/v2/models/duration/infer", json=...)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from ops.procs import free_port, http_ok, spawn, stop

log = logging.getLogger(__name__)

# MLServer 1.7.1 is the newest release (2025-06); its MLflow runtime loads MLflow 3.17 models.
# uvloop 0.22+ raises in asyncio.get_event_loop() without a running loop, which MLServer's
# parallel workers call at start: with it, parallel_workers >= 1 never loads a model.
MLSERVER_PINS = ("mlserver==1.7.1", "mlserver-mlflow==1.7.1", "uvloop==0.21.0")
MLSERVER_RUNTIME = "mlserver_mlflow.MLflowRuntime"


def pins() -> list[str]:
    """MLServer's pins plus the versions the model needs to unpickle exactly as trained."""
    same = [f"{p}=={version(p)}" for p in ("mlflow", "scikit-learn", "numpy", "pandas", "scipy",
                                           "skops")]
    return [*MLSERVER_PINS, *same]


def venv_path(requirements: list[str]) -> Path:
    """Where the virtualenv for ``requirements`` lives (one per pin set and Python version)."""
    from serve.tlc import cache_dir

    key = hashlib.sha256("\n".join([sys.version, *sorted(requirements)]).encode()).hexdigest()
    return cache_dir() / "mlserver-venv" / key[:16]


def ensure_venv(requirements: list[str] | None = None) -> Path:
    """The MLServer virtualenv, created on first use; its path."""
    requirements = requirements or pins()
    path = venv_path(requirements)
    done = path / ".complete"
    if done.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be creating it right now
        if done.exists():
            return path
        shutil.rmtree(path, ignore_errors=True)  # a half-made one from an interrupted run
        log.info("creating MLServer's virtualenv %s (%s)", path, ", ".join(requirements))
        uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
        if uv:
            _run([uv, "venv", "-q", "-p", sys.executable, str(path)])
            _run([uv, "pip", "install", "-q", "-p", str(path / "bin" / "python"),
                  *requirements])
        else:
            _run([sys.executable, "-m", "venv", str(path)])
            _run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", *requirements])
        done.write_text("\n".join(requirements) + "\n")
    return path


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({out.returncode}):\n"
                           f"{(out.stderr or out.stdout)[-3000:]}")


def write_repository(model_uri: str, home: Path, name: str, model_version: str,
                     http_port: int, parallel_workers: int = 0,
                     max_batch_size: int | None = None,
                     max_batch_time: float | None = None) -> Path:
    """An MLServer model repository in ``home``: settings, model settings and the model files
    (downloaded from the registry now: MLServer then needs no tracking server)."""
    import mlflow

    repo = home / "repository"
    model_dir = repo / name
    if not (model_dir / "model" / "MLmodel").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                            dst_path=str(model_dir / "model"))
    settings = {"http_port": http_port, "grpc_port": free_port(), "metrics_port": free_port(),
                "parallel_workers": parallel_workers, "debug": False,
                "host": "127.0.0.1", "load_models_at_startup": True}
    model = {"name": name, "implementation": MLSERVER_RUNTIME,
             "parameters": {"uri": "./model", "version": model_version}}
    if max_batch_size:
        model["max_batch_size"] = max_batch_size
        model["max_batch_time"] = max_batch_time or 0.002  # seconds
    (repo / "settings.json").write_text(json.dumps(settings, indent=2))
    (model_dir / "model-settings.json").write_text(json.dumps(model, indent=2))
    return repo


@dataclass
class MLServer:
    """A running MLServer: base URL, model name and version, process, log."""

    url: str
    name: str
    version: str
    proc: subprocess.Popen
    log: Path

    def infer_url(self) -> str:
        """``POST`` V2 inference requests here."""
        return f"{self.url}/v2/models/{self.name}/infer"

    def stop(self) -> None:
        """Stop the server (and its worker processes)."""
        stop(self.proc.pid)

    def __enter__(self) -> MLServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_mlserver(model_uri: str, home: Path, name: str = "duration",
                   model_version: str = "1", parallel_workers: int = 0,
                   max_batch_size: int | None = None, max_batch_time: float | None = None,
                   timeout: float = 240.0) -> MLServer:
    """Create the venv if needed, write the repository and start MLServer until the model is
    ready (stopped again if it is not within ``timeout``)."""
    venv = ensure_venv()
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    repo = write_repository(model_uri, home, name, model_version, port, parallel_workers,
                            max_batch_size, max_batch_time)
    url = f"http://127.0.0.1:{port}"
    log_path = home / f"mlserver-{port}.log"
    proc = spawn([str(venv / "bin" / "mlserver"), "start", str(repo)], log_path,
                 http_ok(f"{url}/v2/models/{name}/ready"), "mlserver", timeout=timeout,
                 env=_env(venv), cwd=home)
    return MLServer(url, name, model_version, proc, log_path)


def _env(venv: Path) -> dict[str, str]:
    """The environment of MLServer: its venv first on PATH, and none of ours."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env
