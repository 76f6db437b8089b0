"""Docker plumbing of the container tests (``tests/test_containers.py``).

* ``ensure_engine``: runs ``../shared/tools/docker-offline`` (Docker Engine + the
  ``python:3.11*-slim`` stand-ins) when the repository sits next to ``shared/`` as it does
  here and in CI; without the tool it needs a running engine, and skips with one reason
  when there is neither.
* ``Images``: every image is built once per session, in a thread of its own, so the builds
  overlap each other and the rest of the suite (``conftest.container_images`` starts them
  with the session when container tests are selected); each build is timed and measured,
  and every tag and container of the session is removed at its end.
  ``DOCKER_BUILD_NO_CACHE=1`` builds without the layer cache (a CI machine's cold start).
* ``Container``: ``docker run -d`` under a unique name; secrets go to ``docker run`` through
  its environment (``-e NAME``), never on a command line.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SESSION = secrets.token_hex(3)  # suffix of every image tag and container name of this session
# Env keys and history lines that would carry a credential.
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE", re.I)
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def docker_offline() -> Path | None:
    """``shared/tools/docker-offline`` next to this repository (or, for a git worktree, next
    to its main repository), or ``$DOCKER_OFFLINE``; None when there is no such tool."""
    candidates = [os.environ.get("DOCKER_OFFLINE"), ROOT.parent / "shared/tools/docker-offline"]
    try:
        common = subprocess.run(["git", "rev-parse", "--path-format=absolute",
                                 "--git-common-dir"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        if common:
            candidates.append(Path(common).parent.parent / "shared/tools/docker-offline")
    except (OSError, subprocess.SubprocessError):
        pass
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def engine_answers() -> bool:
    """Whether a Docker engine answers the client on PATH."""
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def ensure_engine(*extra_tags: str) -> str | None:
    """Start the engine (and tag ``extra_tags`` stand-ins) with docker-offline when it is
    there; returns the reason to skip, or None when an engine answers. A tool that fails is
    an error, not a skip."""
    tool = docker_offline()
    if tool is not None:
        proc = subprocess.run(["bash", str(tool), *extra_tags], capture_output=True, text=True,
                              timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        return None
    if engine_answers():
        return None
    return ("no Docker engine answers and no shared/tools/docker-offline next to the "
            "repository to start one")


def docker(*args: str, env: dict | None = None, timeout: float = 120, check: bool = True,
           input_text: str | None = None) -> subprocess.CompletedProcess:
    """Run the docker client; on failure raise with its output."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, input=input_text)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def buildkit_client() -> tuple[str, dict[str, str]]:
    """A docker client that builds with BuildKit (our Dockerfiles use cache mounts): one with
    the buildx plugin, or a 20.10 client (Debian's docker.io) with DOCKER_BUILDKIT=1."""
    clients = [c for c in dict.fromkeys([shutil.which("docker"), "/usr/bin/docker"])
               if c and Path(c).exists()]
    for client in clients:
        if subprocess.run([client, "buildx", "version"], capture_output=True).returncode == 0:
            return client, {}
        version = subprocess.run([client, "version", "--format", "{{.Client.Version}}"],
                                 capture_output=True, text=True).stdout.strip()
        if version and int(version.split(".")[0]) < 23:
            return client, {"DOCKER_BUILDKIT": "1"}
    raise RuntimeError(f"no docker client with BuildKit among {clients}: install the buildx "
                       "plugin or Debian's docker.io")


@dataclass
class Image:
    """A built image: its tag, how long the build took, its size (as ``docker images``)."""

    tag: str
    seconds: float
    size_mb: float

    def history(self) -> str:
        """Every layer's command, untruncated."""
        return docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", self.tag).stdout

    def config(self) -> dict:
        return json.loads(docker("image", "inspect", self.tag).stdout)[0]["Config"]


def image_of(tag: str, seconds: float) -> Image:
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.strip())
    return Image(tag, seconds, size / 1e6)


def no_cache() -> list[str]:
    """``--no-cache`` when ``DOCKER_BUILD_NO_CACHE=1`` (to measure cold builds)."""
    return ["--no-cache"] if os.environ.get("DOCKER_BUILD_NO_CACHE") == "1" else []


@dataclass
class Images:
    """The session's images, built in parallel threads, each at most once, after the engine."""

    logs: Path
    futures: dict[str, Future] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    # Two builds at a time on 2 cores: the first images are ready (and their tests running)
    # sooner than when four builds share the CPU, and the whole takes no longer.
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2))
    _engine_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _engine: Future | None = None

    def start_engine(self) -> None:
        """Start (or find) the engine in the background: ``ensure_engine``."""
        self._engine = self._engine_pool.submit(ensure_engine)

    def engine_ready(self, timeout: float = 1500) -> str | None:
        """Wait for the engine; the reason to skip, or None."""
        return self._engine.result(timeout=timeout)

    def tag(self, name: str) -> str:
        """A tag only this session uses; removed at its end."""
        tag = f"{name}:test-{SESSION}"
        with self._lock:
            self.tags.append(tag)
        return tag

    def submit(self, key: str, build: Callable[[], Image]) -> None:
        """Start ``build`` in the background once the engine answers (unless ``key`` is
        already built or building)."""
        def task() -> Image:
            reason = self.engine_ready()
            if reason:
                raise RuntimeError(reason)
            return build()

        with self._lock:
            if key not in self.futures:
                self.futures[key] = self._pool.submit(task)

    def get(self, key: str, timeout: float = 1500) -> Image:
        """The image of ``key``, waiting for its build."""
        return self.futures[key].result(timeout=timeout)

    def build(self, key: str, dockerfile: str, context: Path = ROOT, target: str | None = None,
              **build_args: str) -> Image:
        """``docker build`` with BuildKit (blocking); the output goes to ``logs/<key>.log``."""
        client, extra_env = buildkit_client()
        tag = self.tag(f"duration-{key}")
        cmd = [client, "build", "--progress=plain", *no_cache(), "-f", dockerfile, "-t", tag]
        if target:
            cmd += ["--target", target]
        for k, v in build_args.items():
            cmd += ["--build-arg", f"{k}={v}"]
        return self.run_build(key, tag, [*cmd, str(context)], dict(os.environ, **extra_env))

    def run_build(self, key: str, tag: str, cmd: list[str], env: dict | None = None,
                  cwd: Path = ROOT) -> Image:
        """Run a build command that tags ``tag``; raise with the log's tail on failure."""
        log = self.logs / f"{key}.log"
        t0 = time.monotonic()
        with open(log, "w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  timeout=1500)
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"building {key} failed ({proc.returncode}); {log}:\n"
                               f"{log.read_text(errors='replace')[-4000:]}")
        return image_of(tag, seconds)

    def run(self, image: str, *args: str, env: dict[str, str] | None = None,
            network: str = "host", options: tuple[str, ...] = (),
            name: str = "duration") -> Container:
        """``docker run -d`` with a unique name; ``env`` is passed as ``-e NAME`` so no value
        (secret or not) appears on a command line."""
        cname = f"{name}-{SESSION}-{secrets.token_hex(2)}"
        with self._lock:
            self.containers.append(cname)
        env = env or {}
        flags = [f"--name={cname}", f"--network={network}", *options]
        for key in env:
            flags += ["-e", key]
        docker("run", "-d", *flags, image, *args, env=dict(os.environ, **env), timeout=120)
        return Container(cname)

    def cleanup(self) -> list[str]:
        """Remove the session's containers and tags (builds still running are waited for);
        one line per image built: tag, size, build time."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._engine_pool.shutdown(wait=True)
        lines = []
        for key, future in self.futures.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                image = future.result()
                lines.append(f"{key:7s} {image.tag:36s} {image.size_mb:5.0f} MB, "
                             f"built in {image.seconds:5.1f} s")
            elif future.done() and not future.cancelled():
                lines.append(f"{key:7s} build failed: {str(future.exception())[:200]}")
        for name in self.containers:
            docker("rm", "-f", "-v", name, check=False)
        for tag in self.tags:
            docker("rmi", "-f", tag, check=False, timeout=300)
        return lines


def start_session_builds(images: Images, keys: set[str], tracking_uri: str | None) -> None:
    """The engine, then the images named by ``keys``, in the background: the first tested
    (web) and the longest (MLflow's) first."""
    builds = {
        "web": lambda: images.build("web", "serve/Dockerfile"),
        "model": lambda: build_model_image(images, tracking_uri),
        "mlflow": lambda: images.build("mlflow", "ops/Dockerfile"),
        "lambda": lambda: images.build("lambda", "serve/lambda.Dockerfile"),
    }
    images.start_engine()
    for key, build in builds.items():
        if key in keys:
            images.submit(key, build)


def mlflow_cli(*args: str, env: dict | None = None, cwd: Path = ROOT,
               timeout: float = 1500) -> subprocess.CompletedProcess:
    """The venv's ``mlflow`` command; on failure raise with its output."""
    proc = subprocess.run([str(VENV_BIN / "mlflow"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"mlflow {' '.join(args[:3])} failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def build_model_image(images: Images, tracking_uri: str) -> Image:
    """MLflow's own image of the production model, both ways the README gives: the
    generated Dockerfile with ``docker build``, then ``build-docker`` (same layers, cached).

    ``--env-manager local``: the model's requirements in ``python:<version>-slim``, as
    generate-dockerfile does by default (build-docker's default, virtualenv, builds on
    ubuntu:24.04 with pyenv cloned from GitHub: bigger, and neither can be fetched here)."""
    t0 = time.monotonic()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri)
    env.pop("DOCKER_BUILDKIT", None)  # as a user's shell: the client's default builder
    gen = images.logs / "mlflow-image"
    mlflow_cli("models", "generate-dockerfile", "-m", "models:/duration@production",
               "-d", str(gen), env=env)
    base = re.search(r"^FROM (\S+)", (gen / "Dockerfile").read_text(), re.M).group(1)
    reason = ensure_engine(base)  # the stand-in for python:<the model's python>-slim
    if reason:
        raise RuntimeError(reason)
    generated = images.tag("duration-model-generated")
    images.run_build("model-generated", generated,
                     ["docker", "build", *no_cache(), "-t", generated, "."], env=env, cwd=gen)
    tag = images.tag("duration-model")
    images.run_build("model", tag, [str(VENV_BIN / "mlflow"), "models", "build-docker",
                                    "-m", "models:/duration@production", "-n", tag,
                                    "--env-manager", "local"], env=env)
    return image_of(tag, time.monotonic() - t0)  # both builds (the second is cached)


@dataclass
class Container:
    """A container started by ``Images.run``."""

    name: str

    def inspect(self) -> dict:
        return json.loads(docker("inspect", self.name).stdout)[0]

    def state(self) -> dict:
        return self.inspect()["State"]

    def logs(self) -> str:
        proc = docker("logs", self.name, check=False)
        return (proc.stdout + proc.stderr)[-6000:]

    def exec(self, *cmd: str) -> str:
        return docker("exec", self.name, *cmd).stdout

    def cmdlines(self) -> str:
        """The command lines of every process in the container (as ``ps`` shows them)."""
        return self.exec("sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")

    def wait_exit(self, timeout: float) -> int:
        """Wait until the container has stopped; its exit code."""
        proc = docker("wait", self.name, timeout=timeout)
        return int(proc.stdout.strip())

    def stop(self, timeout: int = 30) -> float:
        """``docker stop -t timeout``; the seconds it took."""
        t0 = time.monotonic()
        docker("stop", "-t", str(timeout), self.name, timeout=timeout + 60)
        return time.monotonic() - t0

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.name, check=False)


def credential_findings(env: list[str], history: str) -> list[str]:
    """Lines of an image's env (``KEY=value``) and history that look like credentials."""
    found = [e for e in env if SECRET_WORDS.search(e.split("=", 1)[0])
             or URL_WITH_PASSWORD.search(e)]
    found += [line for line in history.splitlines()
              if re.search(r"\b\w*(PASSWORD|SECRET|ACCESS_KEY|TOKEN)\w*=", line, re.I)
              or URL_WITH_PASSWORD.search(line)]
    return found


class RuntimeAPI:
    """A minimal stand-in of the Lambda Runtime API (version 2018-06-01, as AWS documents
    it) on 127.0.0.1, for ``awslambdaric`` in an image: one event per
    ``GET /runtime/invocation/next``, what the function posts back recorded. After the last
    event, ``next`` waits until ``close()``, as Lambda freezes a function between events."""

    PREFIX = "/2018-06-01/runtime"

    def __init__(self, events: list[dict]):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.events = list(events)
        self.responses: dict[str, object] = {}
        self.errors: list[dict] = []
        self.finished = threading.Event()  # every event answered, or an init error
        self._closing = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"", headers: dict | None = None):
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path != f"{api.PREFIX}/invocation/next":
                    return self._answer(404)
                event = api._next()
                if event is None:  # frozen until the test ends
                    api._closing.wait(600)
                    return self._answer(500, b'{"errorMessage": "runtime shutting down"}')
                request_id, body = event
                self._answer(200, body, {
                    "Lambda-Runtime-Aws-Request-Id": request_id,
                    "Lambda-Runtime-Deadline-Ms": str(int((time.time() + 300) * 1000)),
                    "Lambda-Runtime-Invoked-Function-Arn":
                        "arn:aws:lambda:us-east-1:123456789012:function:duration-stream",
                    "Lambda-Runtime-Trace-Id": "Root=1-00000000-000000000000000000000000"})

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = self.path[len(api.PREFIX):].strip("/").split("/")
                if parts[:2] == ["init", "error"]:
                    api.errors.append({"init": body.decode(errors="replace")})
                    api.finished.set()
                elif parts[0] == "invocation" and parts[2:] == ["response"]:
                    api.responses[parts[1]] = json.loads(body)
                elif parts[0] == "invocation" and parts[2:] == ["error"]:
                    api.errors.append({parts[1]: body.decode(errors="replace")})
                else:
                    return self._answer(404)
                if len(api.responses) + len(api.errors) >= api.total:
                    api.finished.set()
                self._answer(202, b"{}")

        self.total = len(self.events)
        self._served = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _next(self) -> tuple[str, bytes] | None:
        with self._lock:
            if not self.events:
                return None
            self._served += 1
            return f"request-{self._served}", json.dumps(self.events.pop(0)).encode()

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()
