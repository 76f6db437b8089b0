"""Registry integrity: can every version that an alias (or the stage ``Production``) points to
be read back through the tracking server?

A version is readable when its ``MLmodel`` downloads and parses and every file it names (the
pyfunc model or its models-from-code file, its artifacts, code folder, environment files,
input example) is in the version's artifact listing. That catches what a lost or half-copied
artifact store leaves behind (a registry whose rows outlived their objects) without
downloading the model itself, so ``ops/stack up`` and ``status`` stay fast.
"""

from __future__ import annotations

import posixpath
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Keys of MLmodel whose values name a file or folder inside the model.
PATH_KEYS = {"python_model", "pickled_model", "data", "code", "conda", "virtualenv", "path",
             "artifact_path", "serving_input_path"}


@dataclass
class VersionCheck:
    """One registered version an alias or stage points to, and what is wrong with it."""

    name: str
    version: str
    pointers: list[str] = field(default_factory=list)  # "@production", "stage Production"
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        where = ", ".join(self.pointers)
        state = "readable" if self.ok else f"artifacts NOT readable: {self.problem}"
        return f"{self.name} version {self.version} ({where}): {state}"


def pointed_versions(client) -> list[VersionCheck]:
    """Every (model, version) an alias or the stage Production points to, with its pointers."""
    found: dict[tuple[str, str], VersionCheck] = {}
    token = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # latest_versions / stages
        while True:
            page = client.search_registered_models(max_results=100, page_token=token)
            for rm in page:
                pointers = [(f"@{alias}", str(v)) for alias, v in (rm.aliases or {}).items()]
                pointers += [("stage Production", str(mv.version))
                             for mv in rm.latest_versions or [] if mv.current_stage ==
                             "Production"]
                for pointer, version in pointers:
                    check = found.setdefault((rm.name, version), VersionCheck(rm.name, version))
                    check.pointers.append(pointer)
            token = page.token
            if not token:
                break
    return sorted(found.values(), key=lambda c: (c.name, int(c.version)))


def named_paths(mlmodel: dict) -> set[str]:
    """The files and folders an ``MLmodel`` names (relative to the model's root)."""
    paths: set[str] = set()

    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key == "model_code_path":
            paths.add(posixpath.basename(node))  # models from code: copied in by its name
        elif isinstance(node, str) and key in PATH_KEYS and "://" not in node and \
                not posixpath.isabs(node):
            paths.add(posixpath.normpath(node))

    walk({k: v for k, v in mlmodel.items() if k in ("flavors", "saved_input_example_info")})
    return paths


def _listing(repo, path: str | None = None) -> dict[str, bool]:
    """Every file and folder under ``path`` of an artifact repository: path -> is_dir."""
    entries: dict[str, bool] = {}
    for info in repo.list_artifacts(path):
        entries[info.path] = info.is_dir
        if info.is_dir:
            entries.update(_listing(repo, info.path))
    return entries


def artifact_problem(client, name: str, version: str) -> str | None:
    """Why version ``version`` of ``name`` cannot be read back (None when it can)."""
    import yaml
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        uri = client.get_model_version_download_uri(name, version)
        repo = get_artifact_repository(uri, tracking_uri=client.tracking_uri)
        entries = _listing(repo)
        if "MLmodel" not in entries:
            return f"no MLmodel at {uri}" + ("" if entries else " (no artifacts at all)")
        with tempfile.TemporaryDirectory() as tmp:
            mlmodel = yaml.safe_load(Path(repo.download_artifacts("MLmodel", tmp)).read_text())
    except Exception as e:  # noqa: BLE001 - any failure to read is the answer
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]
    missing = sorted(p for p in named_paths(mlmodel or {}) if p not in entries)
    return f"missing {', '.join(missing)} at {uri}" if missing else None


def check_registry(tracking_uri: str) -> list[VersionCheck]:
    """Check every version an alias or the stage Production points to (see module doc)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    checks = pointed_versions(client)
    for check in checks:
        check.problem = artifact_problem(client, check.name, check.version)
    return checks
