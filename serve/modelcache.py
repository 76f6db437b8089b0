"""A local cache of downloaded model versions, so that a restart downloads nothing.

A registered version is immutable, so its files are cached under
``$MODEL_CACHE_DIR`` (default ``$DURATION_CACHE/models``, i.e.
``~/.cache/duration/models``; ``off`` disables the cache), one folder per version
keyed by model name, version, run id, source and creation time (a registry that
was wiped and refilled never serves its predecessor's files). Aliases and stages
are never cached: ``serve.registry`` resolves them against the registry on every
start and poll, and only the version they name is looked up here.

* **Fill**: the version is downloaded through the tracking server into a hidden
  ``.fill-*`` folder, loaded by MLflow (a version that does not load is never
  cached), given a manifest (size and SHA-256 of every file) and renamed into place
  in one step: readers see a complete entry or none. Two processes filling the same
  version at once both succeed; the first rename wins, the other uses its entry.
* **Use**: an entry is used only if its manifest matches every file; a partial or
  corrupt one is removed and downloaded again. For a linear model the entry also holds
  the model's lookup tables (``serve.tables``, a plain ``.npz``), which is all a
  serving process needs to predict: it starts without importing MLflow, scikit-learn
  or skops, and loads the pyfunc only if something asks for it.
* **Bound**: after a fill, the least recently used entries beyond
  ``MODEL_CACHE_MAX_BYTES`` (default 2 GiB) are removed (never the one in use).

Without a cache (``off``, or a folder that cannot be written), a version is
downloaded into a temporary folder that is removed once it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from serve.config import cache_home
from serve.errors import ModelNotReady
from serve.tables import RideTables

log = logging.getLogger(__name__)

MANIFEST = ".manifest.json"
TABLES = "duration_tables.npz"
DEFAULT_MAX_BYTES = 2 * 2**30
STALE_SECONDS = 6 * 3600  # a .fill-/.trash- folder this old belongs to a dead process


class Version(Protocol):
    """What the cache needs of a pinned version (``serve.registry.ModelRef``)."""

    uri: str
    pinned_uri: str
    name: str | None
    version: str | None
    run_id: str | None
    source: str | None
    created: int | None
    pointer: str
    remedy: str


def cache_dir() -> Path | None:
    """The cache folder (``MODEL_CACHE_DIR``, else ``$DURATION_CACHE/models``); None = off."""
    value = os.environ.get("MODEL_CACHE_DIR", "").strip()
    if value.lower() in ("off", "none", "false", "0"):
        return None
    return Path(value).expanduser() if value else cache_home() / "models"


def max_bytes() -> int:
    """The cache's size bound (``MODEL_CACHE_MAX_BYTES``)."""
    return int(os.environ.get("MODEL_CACHE_MAX_BYTES") or DEFAULT_MAX_BYTES)


def entry_key(ref: Version) -> dict:
    """What identifies a version's files (not the registry's address, so that a cache filled
    through one host name serves through another)."""
    return {"name": ref.name, "version": ref.version, "run_id": ref.run_id,
            "source": ref.source, "created": ref.created}


def entry_name(ref: Version) -> str:
    """``<name>-v<version>-<digest of the key>``, safe as a folder name."""
    digest = hashlib.sha256(json.dumps(entry_key(ref), sort_keys=True).encode()).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', ref.name)}-v{ref.version}-{digest[:16]}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, list]:
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, _sha256(p)]
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _intact(entry: Path, manifest: dict, ref: Version) -> bool:
    """Whether ``entry`` holds exactly what its manifest lists, for ``ref``."""
    if manifest.get("key") != entry_key(ref) or not isinstance(manifest.get("files"), dict):
        return False
    for rel, listed in manifest["files"].items():
        try:
            size, digest = listed
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                return False
            if (entry / rel).stat().st_size != size or _sha256(entry / rel) != digest:
                return False
        except (OSError, TypeError, ValueError):  # missing, unreadable, or not [size, sha]
            return False
    return True


def _discard(path: Path) -> None:
    """Remove a folder so that no reader sees it half-deleted (rename first)."""
    trash = path.parent / f".trash-{uuid.uuid4().hex}"
    try:
        os.rename(path, trash)
    except OSError:
        return  # gone already (another process), or not ours to remove
    shutil.rmtree(trash, ignore_errors=True)


def lookup(root: Path, ref: Version) -> Path | None:
    """The intact entry of ``ref``, or None (a corrupt or partial one is removed)."""
    entry = root / entry_name(ref)
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        if entry.exists():  # a folder without a manifest is not an entry
            log.warning("model cache entry %s has no manifest: removed", entry)
            _discard(entry)
        return None
    except (OSError, ValueError):
        manifest = {}
    if not _intact(entry, manifest, ref):
        log.warning("model cache entry %s is partial or corrupt: removed, downloading again",
                    entry)
        _discard(entry)
        return None
    try:
        os.utime(entry / MANIFEST)  # last use, for the eviction order
    except OSError:
        pass  # a read-only cache (baked into an image) still serves
    return entry


def _download_and_load(ref: Version, dest: Path):
    """Download ``ref`` into ``dest`` through the tracking server and load it with MLflow."""
    import mlflow
    from mlflow.exceptions import MlflowException

    what = (f"version {ref.version} of registered model {ref.name!r} ({ref.uri} names it by "
            f"{ref.pointer}; run {ref.run_id}, source {ref.source})")
    todo = ref.remedy
    where = f"the tracking server {mlflow.get_tracking_uri()}"
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=ref.pinned_uri,
                                                   dst_path=str(dest))
    except Exception as e:  # noqa: BLE001 - MlflowException, OSError, HTTP errors
        raise ModelNotReady(f"cannot download {what} from {where}: its artifacts may be gone "
                            f"({type(e).__name__}: {e}); {todo}") from e
    if not (Path(path) / "MLmodel").is_file():
        raise ModelNotReady(f"cannot download {what} from {where}: its artifacts may be gone "
                            f"(no MLmodel file among the files downloaded); {todo}")
    try:
        return mlflow.pyfunc.load_model(path)
    except (MlflowException, OSError, ImportError, ValueError, ModelNotReady) as e:
        raise ModelNotReady(f"{what} was downloaded but does not load "
                            f"({type(e).__name__}: {e}); {todo}") from e


def _load_uncached(ref: Version):
    """A pyfunc loaded from a temporary folder removed right after (or from a local path)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if ref.version is None and urlparse(ref.pinned_uri).scheme in ("", "file"):
        try:  # a local folder: MLflow loads it in place, nothing is copied
            return mlflow.pyfunc.load_model(ref.pinned_uri)
        except (MlflowException, OSError) as e:
            raise ModelNotReady(f"cannot load model {ref.uri!r}: {e}") from e
    with tempfile.TemporaryDirectory(prefix="duration-model-") as tmp:
        if ref.version is not None:
            return _download_and_load(ref, Path(tmp))
        try:
            return mlflow.pyfunc.load_model(ref.pinned_uri, dst_path=tmp)
        except (MlflowException, OSError) as e:
            raise ModelNotReady(f"cannot load model {ref.uri!r}: {e}") from e


def _fill(root: Path, ref: Version, tmp: Path) -> tuple[Path, object]:
    """Download into ``tmp``, load, add the tables and the manifest, rename into place;
    returns (entry, pyfunc). ``tmp`` is gone afterwards, whatever happens."""
    try:
        pyfunc = _download_and_load(ref, tmp)
        tables = getattr(pyfunc.unwrap_python_model(), "tables", None)
        if isinstance(tables, RideTables) and tables.linear:
            tables.save(tmp / TABLES)
        (tmp / MANIFEST).write_text(json.dumps({"key": entry_key(ref), "files": _files(tmp),
                                                "uri": ref.uri, "filled_at": time.time()}))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; an entry is as readable as a download
        entry = root / entry_name(ref)
        for _ in range(2):
            try:
                os.rename(tmp, entry)
                log.info("cached version %s of %r in %s", ref.version, ref.name, entry)
                break
            except OSError:  # an entry is there: another process filled it first
                if lookup(root, ref) is not None:
                    break
        return entry, pyfunc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left once renamed


def evict(root: Path, keep: Path, limit: int | None = None) -> list[Path]:
    """Remove the least recently used entries beyond ``limit`` bytes (never ``keep``) and
    leftovers of dead processes; returns the entries removed."""
    limit = max_bytes() if limit is None else limit
    entries, now = [], time.time()
    for path in root.iterdir():
        try:
            if path.name.startswith("."):
                if (path.name.startswith((".fill-", ".trash-"))
                        and now - path.stat().st_mtime > STALE_SECONDS):
                    shutil.rmtree(path, ignore_errors=True)
                continue
            manifest = path / MANIFEST
            size = sum(s for s, _ in json.loads(manifest.read_text())["files"].values())
            entries.append((manifest.stat().st_mtime, size, path))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being filled or removed by another process
    total, removed = sum(size for _, size, _ in entries), []
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if path != keep:
            _discard(path)
            total -= size
            removed.append(path)
    return removed


def load(ref: Version, fast: bool = True) -> tuple[object | None, RideTables | None]:
    """``ref`` from the cache (filled first if needed) as ``(pyfunc, None)``, or with ``fast``
    and a linear version cached, ``(None, tables)``: no MLflow import. Raises ModelNotReady."""
    root = cache_dir() if ref.version is not None else None
    tmp = None
    if root is not None:
        entry = lookup(root, ref) if root.is_dir() else None
        if entry is not None:
            if fast and (tables := _tables(entry)) is not None:
                return None, tables
            try:
                return _load_local(entry, ref), None
            except (OSError, ModelNotReady) as e:  # removed under us (evicted elsewhere)
                log.warning("cached %s did not load (%s): downloading it again", entry, e)
                _discard(entry)
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".fill-", dir=root))
        except OSError as e:
            log.warning("model cache %s is not writable (%s): loading without it", root, e)
    if tmp is None:
        return _load_uncached(ref), None
    entry, pyfunc = _fill(root, ref, tmp)
    evict(root, keep=entry)
    return pyfunc, None


def _tables(entry: Path) -> RideTables | None:
    try:
        return RideTables.load(entry / TABLES) if (entry / TABLES).exists() else None
    except (OSError, ValueError, KeyError) as e:
        log.warning("tables of %s unreadable (%s): loading the pyfunc", entry, e)
        return None


def _load_local(entry: Path, ref: Version):
    """The pyfunc of an intact entry, loaded in place."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(str(entry))
    except MlflowException as e:
        raise ModelNotReady(f"cannot load cached version {ref.version} of {ref.name!r} from "
                            f"{entry}: {e}") from e
