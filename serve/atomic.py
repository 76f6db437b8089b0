"""Atomic file writes: a reader (or a restart after a crash) sees the old file or the complete
new one, never a part of it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(dest: str | Path, mode: int = 0o644, durable: bool = False) -> Iterator[Path]:
    """A hidden temporary file next to ``dest`` (``.<name>.<random>.tmp``) to write; moved
    onto ``dest`` when the block ends, deleted when it raises (Ctrl-C included).

    ``mode``: the file's permissions, set before anything is written (``0o600`` keeps a
    secret private from the first byte). ``durable``: fsync before the rename, so the new
    content survives a power cut too. A process killed mid-write leaves only the hidden
    temporary file, which readers of the folder (parquet, Spark) ignore.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(dest: str | Path, data: str | bytes, mode: int = 0o644,
                 durable: bool = False) -> Path:
    """Write ``data`` (text is UTF-8) to ``dest`` atomically (see :func:`atomic_path`)."""
    with atomic_path(dest, mode, durable) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(dest)
