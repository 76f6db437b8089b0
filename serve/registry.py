"""Resolving and loading registered models: every mode serves a version it can name.

``models:/duration@production`` and ``models:/duration/Production`` are moving
targets; :func:`resolve_model` pins them to one registered version first and
the model is then loaded from that pinned URI, so the version a mode reports is
always the version it predicts with.
"""

from __future__ import annotations

import difflib
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

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


@dataclass
class LoadedModel:
    """A loaded pyfunc model with the registry facts about it."""

    pyfunc: object
    ref: ModelRef
    loaded_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def version(self) -> str:
        """Registered version, or the run id / ``local`` for unregistered models."""
        return self.ref.version or self.ref.run_id or "local"

    @property
    def python_model(self):
        """The ``RideDurationModel`` inside (for the fast, pandas-free paths)."""
        return self.pyfunc.unwrap_python_model()


def resolve_model(uri: str, client: MlflowClient | None = None) -> ModelRef:
    """Pin ``models:/name@alias``, ``models:/name/Stage``, ``models:/name/latest`` (the
    highest version, as MLflow reads it) or ``models:/name/N`` to a version."""
    m = _REGISTRY_URI.match(uri)
    if not m:
        return ModelRef(uri=uri, pinned_uri=uri)
    client = client or MlflowClient()
    name, alias, ref = m["name"], m["alias"], m["ref"]
    try:
        mv = _registered_version(client, name, alias, ref)
    except MlflowException as e:
        # A missing alias is INVALID_PARAMETER_VALUE, a missing model RESOURCE_DOES_NOT_EXIST.
        why = _missing(client, name, alias, ref) if e.error_code in _NOT_FOUND else None
        if why is None:
            raise
        raise MlflowException(why, error_code="RESOURCE_DOES_NOT_EXIST") from e
    return ModelRef(uri=uri, pinned_uri=f"models:/{name}/{mv.version}", name=name,
                    version=str(mv.version), run_id=mv.run_id)


def _registered_version(client: MlflowClient, name: str, alias: str | None, ref: str | None):
    """The version ``@alias`` or ``/ref`` (a number, a stage or ``latest``) names."""
    if alias:
        return client.get_model_version_by_alias(name, alias)
    if ref.isdigit():
        return client.get_model_version(name, ref)
    latest = ref.lower() == "latest"  # case-insensitive, like MLflow
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # No stages: the latest version of every stage, the highest of which is latest.
        versions = client.get_latest_versions(name, stages=None if latest else [ref])
    if not versions:
        raise MlflowException(f"model {name!r} has no versions" if latest else
                              f"no version of model {name!r} is in stage {ref!r}")
    return max(versions, key=lambda v: int(v.version))


def _missing(client: MlflowClient, name: str, alias: str | None, ref: str | None) -> str | None:
    """What does not exist, and what does instead: the registered models (a typo in the
    name), the model's aliases or its versions; None if all of it exists."""
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
    """Load an already-pinned version (through the tracking server); ModelNotReady on failure."""
    t0 = time.perf_counter()
    try:
        pyfunc = mlflow.pyfunc.load_model(ref.pinned_uri)
    except (MlflowException, OSError) as e:
        raise ModelNotReady(f"cannot load model {ref.uri!r}: {e}") from e
    log.info("loaded %s (version %s) in %.2f s", ref.uri, ref.version, time.perf_counter() - t0)
    return LoadedModel(pyfunc=pyfunc, ref=ref)


def load_model(uri: str, client: MlflowClient | None = None) -> LoadedModel:
    """Resolve ``uri`` to a version and load it as pyfunc; raises ModelNotReady on failure."""
    try:
        ref = resolve_model(uri, client)
    except (MlflowException, OSError) as e:
        raise ModelNotReady(f"cannot load model {uri!r}: {e}") from e
    return load_ref(ref)


def experiment_id(name: str, client: MlflowClient | None = None) -> str:
    """Id of experiment ``name``, created if missing.

    Unlike ``mlflow.set_experiment`` this leaves the process environment alone: that call
    exports ``MLFLOW_EXPERIMENT_ID``, which every subprocess started later inherits (an
    ``mlflow run`` then refuses ``--experiment-name``, and a run against another tracking
    server lands in an experiment id that server does not have).
    """
    client = client or MlflowClient()
    if (exp := client.get_experiment_by_name(name)) is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id
