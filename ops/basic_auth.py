"""Secrets checks and MLflow's basic-auth configuration, shared by ``ops/stack --auth`` and the
tracking image (``ops/Dockerfile``). Standard library only: the image runs this module with
nothing of the project installed but MLflow itself.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Values nobody should run a server with; every value in .env.example is refused as well.
PLACEHOLDERS = {"changeme", "change-me", "change_me", "password", "passwd", "secret", "admin",
                "mlflow", "postgres", "test", "testing", "example", "xxx", "todo"}
MIN_ADMIN_PASSWORD = 12


def example_values(path: Path = ROOT / ".env.example") -> set[str]:
    """Every non-empty value in ``.env.example``: placeholders by definition."""
    if not path.exists():
        return set()
    values = set()
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.strip().startswith("#") and value.strip():
            values.add(value.strip().strip("'\""))
    return values


def is_placeholder(value: str | None) -> bool:
    """Whether ``value`` is empty or a placeholder (a known one or any from .env.example)."""
    if not value or not value.strip():
        return True
    v = value.strip()
    return v.lower() in PLACEHOLDERS or v in example_values() or v.strip("<>") != v


def check_admin_password(password: str | None) -> str:
    """The basic-auth admin password; ValueError (saying why) if empty, a placeholder or short."""
    if is_placeholder(password):
        raise ValueError(
            "auth: MLFLOW_AUTH_ADMIN_PASSWORD is empty or a placeholder; set a real password "
            f"({MIN_ADMIN_PASSWORD}+ characters) in the environment or .env")
    if len(password) < MIN_ADMIN_PASSWORD:
        raise ValueError(f"auth: MLFLOW_AUTH_ADMIN_PASSWORD must have {MIN_ADMIN_PASSWORD}+ "
                         "characters")
    return password


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (created 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def write_auth_ini(path: Path, database_uri: str, admin_username: str,
                   admin_password: str | None = None) -> None:
    """MLflow's ``basic_auth.ini`` (0600: the database URI may hold a password). Without
    ``admin_password`` MLflow reads it from ``MLFLOW_AUTH_ADMIN_PASSWORD``."""

    def esc(value: str) -> str:  # configparser interpolates '%'
        return value.replace("%", "%%")

    text = ("[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {esc(database_uri)}\n"
            f"admin_username = {esc(admin_username)}\n")
    if admin_password is not None:
        text += f"admin_password = {esc(admin_password)}\n"
    write_private(path, text)
