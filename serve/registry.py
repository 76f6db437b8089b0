"""Resolving and loading registered models: every mode serves a version it can name.

``models:/duration@production`` and ``models:/duration/Production`` are moving
targets; :func:`resolve_model` pins them to one registered version first, asking
the registry every time (an alias is never taken from a cache), and the model is
then loaded from that pinned version, so the version a mode reports is always the
version it predicts with. Versions are immutable, so their files are kept in a
local cache (``serve.modelcache``): a restart downloads nothing, and a linear
model starts without importing MLflow at all.
"""

from __future__ import annotations

import difflib
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from serve.errors import ModelNotReady
from serve.urls import masked

log = logging.getLogger(__name__)

_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))$")


@dataclass(frozen=True)
class ModelRef:
    """A registered model version (or an unregistered model, version ``None``)."""

    uri: str  # what was asked for
    pinned_uri: str  # what is loaded: models:/name/version, or the uri itself
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    source: str | None = None  # where the registry says the version's files are
    created: int | None = None  # the version's creation timestamp (ms)

    @property
    def pointer(self) -> str:
        """How ``uri`` names the version: ``alias 'production'``, ``stage 'Production'``..."""
        m = _REGISTRY_URI.match(self.uri)
        if not m:
            return f"URI {self.uri!r}"
        if m["alias"]:
            return f"alias {m['alias']!r}"
        if m["ref"].isdigit():
            return f"version {m['ref']}"
        return "latest version" if m["ref"].lower() == "latest" else f"stage {m['ref']!r}"

    @property
    def remedy(self) -> str:
        """What to do when the version it names does not load."""
        m = _REGISTRY_URI.match(self.uri)
        retrain = "or train and register a new version (python train.py, which promotes it)"
        if m and m["alias"]:
            return (f"point the alias at a version that loads (MlflowClient()"
                    f".set_registered_model_alias({self.name!r}, {m['alias']!r}, <version>)) "
                    f"{retrain}")
        if m and not m["ref"].isdigit() and m["ref"].lower() != "latest":
            return (f"move another version into stage {m['ref']!r} (MlflowClient()"
                    f".transition_model_version_stage({self.name!r}, <version>, {m['ref']!r}))"
                    f" {retrain}")
        return f"serve another version {retrain}"


class LoadedModel:
    """A loaded model version: the predictor every mode uses and, on demand, MLflow's pyfunc.

    Built from a pyfunc (``LoadedModel(pyfunc=..., ref=...)``), or, for a linear version
    from the cache, from its tables alone (``python_model=``) with the pyfunc loaded on
    first use (``load_pyfunc``): the fast paths never import MLflow.
    """

    def __init__(self, pyfunc=None, ref: ModelRef | None = None, *, python_model=None,
                 load_pyfunc: Callable[[], object] | None = None):
        if pyfunc is None and load_pyfunc is None:
            raise ValueError("LoadedModel needs a pyfunc or a way to load it")
        self.ref = ref
        self.loaded_at = datetime.now(timezone.utc)
        self._pyfunc, self._python_model, self._load_pyfunc = pyfunc, python_model, load_pyfunc
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        """Registered version, or the run id / ``local`` for unregistered models."""
        return self.ref.version or self.ref.run_id or "local"

    @property
    def pyfunc(self):
        """MLflow's ``PyFuncModel`` (loaded now if it was not: MLflow imported, ~2 s)."""
        if self._pyfunc is None:
            with self._lock:
                if self._pyfunc is None:
                    self._pyfunc = self._load_pyfunc()
        return self._pyfunc

    @property
    def pyfunc_loaded(self) -> bool:
        """Whether :attr:`pyfunc` is there without loading anything."""
        return self._pyfunc is not None

    @property
    def python_model(self):
        """What predicts: ``predict_rides(Rides) -> minutes`` (the ``RideDurationModel`` inside
        the pyfunc, or the cached version's :class:`serve.tables.RideTables`)."""
        if self._python_model is None:
            self._python_model = self.pyfunc.unwrap_python_model()
        return self._python_model

    @property
    def input_schema(self):
        """The logged signature's input schema (for MLflow's own request parsing)."""
        return self.pyfunc.metadata.get_input_schema()


class _ClientRegistry:
    """``MlflowClient`` where the REST client cannot go (same three look-ups)."""

    def __init__(self, client=None):
        from mlflow.tracking import MlflowClient

        self.client = client or MlflowClient()

    def get_model_version_by_alias(self, name, alias):
        return self.client.get_model_version_by_alias(name, alias)

    def get_model_version(self, name, version):
        return self.client.get_model_version(name, version)

    def get_latest_versions(self, name, stages=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated, still used
            return self.client.get_latest_versions(name, stages=stages)


def _registry(client=None):
    from serve.registry_rest import rest_registry

    return _ClientRegistry(client) if client is not None else (
        rest_registry() or _ClientRegistry())


def resolve_model(uri: str, client=None) -> ModelRef:
    """Pin ``models:/name@alias``, ``models:/name/Stage``, ``models:/name/latest`` (the
    highest version, as MLflow reads it) or ``models:/name/N`` to a version, asking the
    registry (``client``, a ``MlflowClient``, if given); raises ModelNotReady."""
    m = _REGISTRY_URI.match(uri)
    if not m:
        return ModelRef(uri=uri, pinned_uri=uri)
    name, alias, ref = m["name"], m["alias"], m["ref"]
    try:
        mv = _registered_version(_registry(client), name, alias, ref)
    except ModelNotReady as e:
        raise ModelNotReady(f"cannot resolve {uri!r}: {e.message}") from e
    except Exception as e:  # noqa: BLE001 - RegistryError, MlflowException, OSError
        # A missing alias is INVALID_PARAMETER_VALUE, a missing model RESOURCE_DOES_NOT_EXIST.
        why = (_missing(client, name, alias, ref)
               if getattr(e, "error_code", None) in _NOT_FOUND else None)
        raise ModelNotReady(f"cannot resolve {uri!r}: {why or e}") from e
    created = getattr(mv, "creation_timestamp", None)
    return ModelRef(uri=uri, pinned_uri=f"models:/{name}/{mv.version}", name=name,
                    version=str(mv.version), run_id=mv.run_id, source=mv.source,
                    created=int(created) if created is not None else None)


def _registered_version(registry, name: str, alias: str | None, ref: str | None):
    """The version ``@alias`` or ``/ref`` (a number, a stage or ``latest``) names."""
    if alias:
        return registry.get_model_version_by_alias(name, alias)
    if ref.isdigit():
        return registry.get_model_version(name, ref)
    latest = ref.lower() == "latest"  # case-insensitive, like MLflow
    # No stages: the latest version of every stage, the highest of which is latest.
    versions = registry.get_latest_versions(name, None if latest else [ref])
    if not versions:
        raise ModelNotReady(f"model {name!r} has no versions" if latest else
                            f"no version of model {name!r} is in stage {ref!r}")
    return max(versions, key=lambda v: int(v.version))


def _missing(client, name: str, alias: str | None, ref: str | None) -> str | None:
    """What does not exist, and what does instead: the registered models (a typo in the
    name), the model's aliases or its versions; None if all of it exists (or the registry
    cannot say). Only on this error path is MLflow imported."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    try:
        return _what_exists(client, name, alias, ref)
    except MlflowException:
        return None


def _what_exists(client, name: str, alias: str | None, ref: str | None) -> str | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        guess = difflib.get_close_matches(name, names, n=1)
        return (f"no registered model named {name!r} at {masked(mlflow.get_tracking_uri())}"
                + (f" (did you mean {guess[0]!r}?)" if guess else "")
                + (f"; registered models: {', '.join(names)}" if names else
                   "; none is registered yet: train one with `python train.py`"))
    if alias:
        known = ", ".join(sorted(model.aliases)) or "none"
        return (None if alias in model.aliases else
                f"model {name!r} has no alias {alias!r} (its aliases: {known})")
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    known = ", ".join(map(str, versions)) or "none"
    return (None if not ref.isdigit() or int(ref) in versions else
            f"model {name!r} has no version {ref} (its versions: {known})")


def load_ref(ref: ModelRef) -> LoadedModel:
    """Load an already-pinned version: from the version cache (downloaded through the tracking
    server once), an unregistered model from a folder removed after the load; a linear version
    from the cache comes as its tables, the pyfunc loaded on first use. ModelNotReady on
    failure."""
    from serve import modelcache

    t0 = time.perf_counter()
    pyfunc, tables = modelcache.load(ref)
    loaded = LoadedModel(pyfunc=pyfunc, ref=ref, python_model=tables,
                         load_pyfunc=lambda: modelcache.load(ref, fast=False)[0])
    log.info("loaded %s (version %s%s) in %.2f s", ref.uri, ref.version,
             "" if pyfunc is not None else ", its tables from the version cache",
             time.perf_counter() - t0)
    return loaded


def load_model(uri: str, client=None) -> LoadedModel:
    """Resolve ``uri`` to a version and load it; raises ModelNotReady on failure."""
    return load_ref(resolve_model(uri, client))


def experiment_id(name: str, client=None) -> str:
    """Id of experiment ``name``, created if missing.

    Unlike ``mlflow.set_experiment`` this leaves the process environment alone: that call
    exports ``MLFLOW_EXPERIMENT_ID``, which every subprocess started later inherits (an
    ``mlflow run`` then refuses ``--experiment-name``, and a run against another tracking
    server lands in an experiment id that server does not have).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    if (exp := client.get_experiment_by_name(name)) is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def main(argv: list[str] | None = None) -> None:
    """``python -m serve.registry [MODEL_URI]``: resolve the URI (default ``MODEL_URI``), load
    the version it names into the version cache and print one JSON line (version, cache
    entry). Pre-fills the cache of an image or a host before its first start."""
    import argparse
    import json
    import os

    from serve import modelcache
    from serve.config import get_settings, use_tracking_server
    from serve.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m serve.registry", description=main.__doc__)
    parser.add_argument("model_uri", nargs="?", help="default: MODEL_URI (or its default)")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    settings = get_settings()
    use_tracking_server(settings)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        ref = resolve_model(args.model_uri or settings.model_uri)
        load_ref(ref)
    except ModelNotReady as e:
        raise SystemExit(f"error: {e.message}") from None
    root = modelcache.cache_dir()
    entry = modelcache.lookup(root, ref) if root is not None and ref.version else None
    print(json.dumps({"model_uri": ref.uri, "version": ref.version, "run_id": ref.run_id,
                      "cache_entry": str(entry) if entry else None}))


if __name__ == "__main__":
    main()
