"""Secrets checks and MLflow's basic-auth configuration, shared by ``ops/stack --auth`` and the
tracking image (``ops/Dockerfile``). It imports only what that image has: the standard
library, python-dotenv (an MLflow dependency) and ``serve.atomic`` (copied in).
"""

from __future__ import annotations

from pathlib import Path

from dotenv import dotenv_values

from serve.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[1]
# Values nobody should run a server with; every value in .env.example is refused as well.
PLACEHOLDERS = {"changeme", "change-me", "change_me", "password", "passwd", "secret", "admin",
                "mlflow", "postgres", "test", "testing", "example", "xxx", "todo"}
MIN_ADMIN_PASSWORD = 12


def example_values(path: Path = ROOT / ".env.example") -> set[str]:
    """Every non-empty value in ``.env.example``: placeholders by definition."""
    if not path.exists():
        return set()
    return {v.strip() for v in dotenv_values(path).values() if v and v.strip()}


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
    """Write ``text`` to ``path`` readable by the owner only (created 0600, never wider),
    atomically."""
    write_atomic(path, text, mode=0o600)


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
