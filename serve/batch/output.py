"""Atomic output for local folders and ``s3://``: hidden temporary name, then a move; and
the lock that keeps two runs of one month apart.

Readers (parquet, Spark) ignore ``.``-prefixed files, so a crash leaves no
output file, only a hidden temporary one that :func:`clean_stale` removes on the
next run. Cleaning is safe only while no other run writes the month: every run holds
:func:`month_lock` from before it cleans until it has published.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serve.atomic import atomic_path
from serve.errors import DurationError
from serve.tlc import resolve

log = logging.getLogger(__name__)

# An S3 lock whose holder stopped refreshing it this long ago is stale (the run was killed).
LOCK_STALE_SECONDS = 600.0


def exists(uri: str) -> bool:
    """Whether a file exists at a local path or ``s3://`` URI."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


@contextmanager
def staged(uri: str) -> Iterator[tuple[pafs.FileSystem, str]]:
    """The filesystem of ``uri`` and a hidden temporary path next to it to write; moved onto
    ``uri`` when the block ends, deleted when it raises.

    Local files go through :func:`serve.atomic.atomic_path` (a rename: atomic, replaces).
    S3 has no rename: the temporary key is moved (server-side copy, then delete), so
    readers see the old object or the complete new one, never a partial one. A killed
    process leaves the hidden temporary file, which :func:`clean_stale` removes next time.
    """
    fs, path = resolve(uri)
    if fs.type_name == "local":
        with atomic_path(path) as tmp:
            yield fs, str(tmp)
        return
    folder, _, name = path.rpartition("/")
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"  # the name atomic_path gives
    try:
        yield fs, tmp
        fs.move(tmp, path)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise


@contextmanager
def atomic_parquet(uri: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A ParquetWriter on a hidden temporary file next to ``uri``, moved onto it on success
    (see :func:`staged`)."""
    with staged(uri) as (fs, tmp), fs.open_output_stream(tmp) as stream:
        writer = pq.ParquetWriter(stream, schema, use_dictionary=_dictionary_columns(schema))
        try:
            yield writer
        finally:
            writer.close()


def publish_file(local: Path, uri: str) -> None:
    """Copy a finished local file to ``uri`` under a hidden temporary name, then move it."""
    clean_stale(uri)
    with staged(uri) as (fs, tmp):
        pafs.copy_files(str(local), tmp, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: trying it on unique ids and floats triples the
    write time for the same file size."""
    return [n for n in ("PULocationID", "DOLocationID", "model_version", "reason")
            if n in schema.names]


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


def clean_stale(uri: str) -> int:
    """Delete temporary files a killed run left next to ``uri``; returns how many."""
    fs, path = resolve(uri)
    folder, _, name = path.rpartition("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return 0
    stale = [i.path for i in infos
             if i.base_name.startswith(f".{name}.") and i.base_name.endswith(".tmp")]
    for p in stale:
        _delete_quietly(fs, p)
    return len(stale)



class MonthLocked(DurationError):
    """Another run is writing the same month's output."""

    error_code = "MONTH_LOCKED"
    status_code = 409


def _lock_name(name: str) -> str:
    return f".{name}.lock"  # hidden: readers ignore it; not a ".tmp", so never "stale"


def _owner() -> dict:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": now}


def _describe(owner: dict) -> str:
    return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since "
            f"{owner.get('since', '?')}")


def _busy(uri: str, lock: str, owner: dict, extra: str = "") -> MonthLocked:
    return MonthLocked(f"{uri}: another run is writing this month ({_describe(owner)}, lock "
                       f"{lock}); this run did nothing. Wait for that run to finish{extra}")


@contextmanager
def month_lock(uri: str, stale_after: float | None = None) -> Iterator[None]:
    """Hold the lock of one month's output (``uri``: its predictions file) for a block;
    :class:`MonthLocked` at once, saying who holds it, when another run does.

    Local: ``flock`` on a hidden ``.predictions.parquet.lock`` next to it (released by the
    kernel when the holder dies, so a killed run never blocks the next). S3: a lock object
    created with a conditional put (``If-None-Match: *``), refreshed while held; one not
    refreshed for ``stale_after`` seconds (default :data:`LOCK_STALE_SECONDS`: its run was
    killed) is taken over.
    """
    stale_after = LOCK_STALE_SECONDS if stale_after is None else stale_after
    fs, path = resolve(uri)
    if fs.type_name == "local":
        with _local_lock(uri, Path(path)):
            yield
    else:
        with _S3Lock(uri, path, stale_after):
            yield


@contextmanager
def _local_lock(uri: str, path: Path) -> Iterator[None]:
    lock = path.parent / _lock_name(path.name)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(os.read(fd, 4096) or b"{}")
            except ValueError:
                owner = {}
            os.close(fd)
            raise _busy(uri, str(lock), owner) from None
        # A run that finished unlinks the file it locked: ours must still be the one there.
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner()).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it (see the inode check above)
        os.close(fd)


class _S3Lock:
    """The S3 lock object of one month (see :func:`month_lock`)."""

    def __init__(self, uri: str, path: str, stale_after: float):
        import boto3

        from serve.tlc import s3_endpoint

        endpoint, region = s3_endpoint()
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region)
        bucket, _, key = path.partition("/")
        folder, _, name = key.rpartition("/")
        self.uri, self.bucket = uri, bucket
        self.key = f"{folder}/{_lock_name(name)}" if folder else _lock_name(name)
        self.shown = f"s3://{bucket}/{self.key}"
        self.stale_after = stale_after
        self.etag: str | None = None
        self.body = json.dumps(_owner()).encode()
        self.stop = threading.Event()
        self.refresher = threading.Thread(target=self._refresh, daemon=True,
                                          name="month-lock-refresh")

    def _put(self, **condition) -> str:
        return self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self.body,
                                  **condition)["ETag"]

    def __enter__(self) -> _S3Lock:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.etag = self._put(IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed",
                                                                  "ConditionalRequestConflict"):
                raise OSError(f"{self.shown}: cannot create the month's lock: {e}") from e
            self.etag = self._take_over_if_stale()
        except BotoCoreError as e:  # no endpoint, no credentials
            raise OSError(f"{self.shown}: cannot create the month's lock: {e}") from e
        self.refresher.start()
        return self

    def _take_over_if_stale(self) -> str:
        from botocore.exceptions import ClientError

        held = self.s3.get_object(Bucket=self.bucket, Key=self.key)
        try:
            owner = json.loads(held["Body"].read() or b"{}")
        except ValueError:
            owner = {}
        # Both times from the S3 server's clock: no skew with this machine's.
        server_now = datetime.strptime(held["ResponseMetadata"]["HTTPHeaders"]["date"],
                                       "%a, %d %b %Y %H:%M:%S %Z").replace(tzinfo=timezone.utc)
        idle = (server_now - held["LastModified"]).total_seconds()
        if idle < self.stale_after:
            left = self.stale_after - idle
            raise _busy(self.uri, self.shown, owner,
                        f" (if it was killed, its lock expires in {left:.0f} s)")
        log.warning("%s: taking over the lock of %s, not refreshed for %.0f s", self.uri,
                    _describe(owner), idle)
        try:  # only if nobody took it over meanwhile
            return self._put(IfMatch=held["ETag"])
        except ClientError as e:
            raise _busy(self.uri, self.shown, owner) from e

    def _refresh(self) -> None:
        while not self.stop.wait(max(self.stale_after / 4, 1.0)):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as e:  # noqa: BLE001 - reported; the run itself goes on
                log.error("%s: cannot refresh the lock %s: %s", self.uri, self.shown, e)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.refresher.join()
        try:  # only our own lock (a refresh failure may mean another run took it over)
            if self.s3.head_object(Bucket=self.bucket, Key=self.key)["ETag"] == self.etag:
                self.s3.delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:  # noqa: BLE001 - the month is done; a stale lock expires
            log.warning("%s: cannot remove the lock %s: %s", self.uri, self.shown, e)
