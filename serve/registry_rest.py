"""The model registry's three look-ups (alias, version, latest per stage) over MLflow's REST
API, without importing MLflow.

A serving process whose model comes from the version cache (``serve.modelcache``)
must still ask the registry which version an alias names, every time it starts;
importing MLflow for that one GET costs ~2 s of the cold start (MLflow imports
pandas, FastAPI and its GenAI stack on ``import mlflow``). This client sends the
same requests MLflow's own ``RestStore`` sends, with the settings it reads from
the environment: ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` (basic auth),
``MLFLOW_TRACKING_TOKEN`` (bearer), ``MLFLOW_TRACKING_INSECURE_TLS``,
``MLFLOW_TRACKING_SERVER_CERT_PATH``, ``MLFLOW_TRACKING_CLIENT_CERT_PATH``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and
``_BACKOFF_FACTOR``/``_BACKOFF_JITTER``. Any other set-up (a non-HTTP store,
Databricks, SigV4, an auth plugin, a credentials file) returns None from
:func:`rest_registry`, and ``serve.registry`` uses ``MlflowClient`` instead.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

API = "/api/2.0/mlflow"
# MLflow's defaults (mlflow.environment_variables), so both clients behave alike.
DEFAULT_TIMEOUT, DEFAULT_RETRIES, DEFAULT_BACKOFF, DEFAULT_JITTER = 120, 7, 2, 1.0
RETRY_STATUSES = (429, 500, 502, 503, 504)
# Set-ups only MLflow's own client handles.
NEEDS_MLFLOW = ("MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4")


class RegistryError(Exception):
    """The registry refused a look-up (its ``error_code`` and message) or did not answer."""

    def __init__(self, message: str, error_code: str | None = None):
        super().__init__(message)
        self.error_code = error_code


@dataclass(frozen=True)
class Version:
    """The facts about a registered model version that serving needs."""

    name: str
    version: str
    run_id: str | None
    source: str | None
    creation_timestamp: int | None

    @classmethod
    def from_json(cls, mv: dict) -> Version:
        created = mv.get("creation_timestamp")
        return cls(mv["name"], str(mv["version"]), mv.get("run_id") or None,
                   mv.get("source") or None, int(created) if created is not None else None)


def registry_uri() -> str | None:
    """The registry URI MLflow would use: its own answer once it is imported (code may have
    set it), else ``MLFLOW_REGISTRY_URI`` or ``MLFLOW_TRACKING_URI``."""
    if "mlflow" in sys.modules:
        import mlflow

        return mlflow.get_registry_uri()
    return os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_TRACKING_URI")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true")


def rest_registry() -> RestRegistry | None:
    """A REST client for the current registry, or None when only MlflowClient can reach it."""
    uri = registry_uri()
    if not uri or urlparse(uri).scheme not in ("http", "https"):
        return None
    if any(os.environ.get(name) for name in NEEDS_MLFLOW):
        return None
    if not os.environ.get("MLFLOW_TRACKING_USERNAME") and (
            Path.home() / ".mlflow" / "credentials").exists():
        return None
    return RestRegistry(uri)


class RestRegistry:
    """``get_model_version_by_alias``, ``get_model_version`` and ``get_latest_versions`` of
    ``MlflowClient``, over HTTP with ``requests`` (retries as MLflow retries)."""

    def __init__(self, uri: str):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.uri = uri.rstrip("/")
        env = os.environ.get
        self.timeout = float(env("MLFLOW_HTTP_REQUEST_TIMEOUT") or DEFAULT_TIMEOUT)
        retry = Retry(total=int(env("MLFLOW_HTTP_REQUEST_MAX_RETRIES") or DEFAULT_RETRIES),
                      backoff_factor=float(env("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
                                           or DEFAULT_BACKOFF),
                      backoff_jitter=float(env("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER")
                                           or DEFAULT_JITTER),
                      status_forcelist=RETRY_STATUSES, allowed_methods=None,
                      raise_on_status=False)
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        if env("MLFLOW_TRACKING_USERNAME"):
            self.session.auth = (env("MLFLOW_TRACKING_USERNAME"),
                                 env("MLFLOW_TRACKING_PASSWORD") or "")
        elif env("MLFLOW_TRACKING_TOKEN"):
            self.session.headers["Authorization"] = f"Bearer {env('MLFLOW_TRACKING_TOKEN')}"
        if _flag("MLFLOW_TRACKING_INSECURE_TLS"):
            self.session.verify = False
        elif env("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            self.session.verify = env("MLFLOW_TRACKING_SERVER_CERT_PATH")
        if env("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
            self.session.cert = env("MLFLOW_TRACKING_CLIENT_CERT_PATH")

    def _get(self, path: str, params: dict) -> dict:
        import requests

        url = f"{self.uri}{API}{path}"
        try:
            resp = self.session.get(url, params=params, timeout=self.timeout)
        except requests.RequestException as e:
            raise RegistryError(f"the registry at {self.uri} did not answer: "
                                f"{type(e).__name__}: {e}") from e
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != 200 or not isinstance(body, dict):
            if isinstance(body, dict) and "message" in body:
                raise RegistryError(body["message"], body.get("error_code"))
            raise RegistryError(f"the registry at {self.uri} answered HTTP {resp.status_code} "
                                f"to {path}: {resp.text[:200]!r}")
        return body

    def get_model_version_by_alias(self, name: str, alias: str) -> Version:
        """The version ``alias`` points at."""
        body = self._get("/registered-models/alias", {"name": name, "alias": alias})
        return Version.from_json(body["model_version"])

    def get_model_version(self, name: str, version: str) -> Version:
        """Version ``version`` of ``name``."""
        body = self._get("/model-versions/get", {"name": name, "version": version})
        return Version.from_json(body["model_version"])

    def get_latest_versions(self, name: str, stages: list[str] | None = None) -> list[Version]:
        """The latest version in each of ``stages`` (every stage when None)."""
        params = {"name": name, **({"stages": stages} if stages else {})}
        body = self._get("/registered-models/get-latest-versions", params)
        return [Version.from_json(mv) for mv in body.get("model_versions", [])]
