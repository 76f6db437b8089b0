"""moto_server, the throwaway S3 and Kinesis endpoint of the stack, the demo, the benchmarks
and the tests: where it is, how to start it and know it is ready, its fake credentials."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ops.procs import free_port, http_ok, spawn, stop

REGION = "us-east-1"
# moto accepts any credentials; these are only ever sent to a local moto_server.
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def moto_server_bin() -> str:
    """The venv's ``moto_server`` (next to this interpreter), else the one on PATH."""
    local = Path(sys.executable).parent / "moto_server"
    found = str(local) if local.exists() else shutil.which("moto_server")
    if not found:
        raise FileNotFoundError("moto_server is not installed (pip install 'moto[server]', "
                                "the test extra)")
    return found


def moto_cmd(port: int, host: str = "127.0.0.1") -> list[str]:
    """The command of a moto_server on ``host:port``."""
    return [moto_server_bin(), "-H", host, "-p", str(port)]


def moto_ready(endpoint: str):
    """A readiness check of the moto_server at ``endpoint`` (for :func:`ops.procs.wait_for`)."""
    return http_ok(f"{endpoint}/moto-api/")


@dataclass(frozen=True)
class Moto:
    """A moto_server: its endpoint, the environment and clients that use it, its process."""

    endpoint: str
    proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """Fake credentials, region and endpoint: every AWS client in that environment uses it."""
        return {**MOTO_CREDENTIALS, "AWS_DEFAULT_REGION": REGION,
                "AWS_ENDPOINT_URL": self.endpoint}

    def client(self, service: str):
        """A boto3 client of ``service`` (s3, kinesis, ...) on this moto_server."""
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def stop(self) -> None:
        """Stop the process (when this object started it)."""
        if self.proc is not None:
            stop(self.proc.pid)


def start_moto(log_path: str | Path, port: int | None = None, timeout: float = 60.0) -> Moto:
    """Start a moto_server on 127.0.0.1 (a free port unless ``port``) and wait until it is
    ready; stop it with :meth:`Moto.stop`."""
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = spawn(moto_cmd(port), log_path, moto_ready(endpoint), "moto_server", timeout=timeout)
    return Moto(endpoint, proc)
