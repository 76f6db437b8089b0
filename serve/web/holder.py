"""The active model and its hot swap: a background thread polls the registry and swaps a new
production version in once it is loaded; a request reads the active model once, so requests
in flight finish on the version they started with."""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass

from serve.config import require_tracking_server
from serve.errors import ModelNotReady, TrackingServerUnavailable
from serve.registry import LoadedModel, load_ref, resolve_model
from serve.web.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Active:
    """What a request needs from the loaded model, fetched once per swap, not per request."""

    loaded: LoadedModel
    model: object  # RideDurationModel or RideTables: predict_rides(Rides) -> minutes
    version: str

    @property
    def input_schema(self):
        """The mlflow Schema, for the MLflow-compatible slow path (loads the pyfunc if a
        version came from the cache as tables and the warm-up has not loaded it yet)."""
        return self.loaded.input_schema


def activate(loaded: LoadedModel) -> Active:
    """Unwrap a loaded model once into what the request path uses."""
    return Active(loaded, loaded.python_model, loaded.version)


class ModelHolder:
    """Holds the active model; a background thread polls the registry and swaps new versions in.

    The swap is one attribute assignment: a request that already read ``active``
    finishes on that model. A failing registry leaves the active model serving.
    """

    def __init__(self, uri: str, poll_interval: float, metrics: Metrics):
        self.uri = uri
        self.poll_interval = poll_interval
        self.metrics = metrics
        self.active: Active | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-poller", daemon=True)

    def require(self) -> Active:
        """The active model, or ModelNotReady (503) before the first load."""
        active = self.active
        if active is None:
            raise ModelNotReady(f"model {self.uri!r} is not loaded yet"
                                + (f" (last error: {self.last_error})" if self.last_error else ""))
        return active

    def poll(self) -> bool:
        """One registry poll: load and swap if the pinned version changed; True if swapped."""
        try:
            ref = resolve_model(self.uri)
        except Exception as e:  # noqa: BLE001 - unreachable registry, missing alias, ...
            self.metrics.poll_failures.inc()
            try:  # said plainly when the tracking server itself is not there
                require_tracking_server(timeout=2)
                self._failed(logging.WARNING, f"registry poll failed: {type(e).__name__}: {e}")
            except TrackingServerUnavailable as down:
                self._failed(logging.WARNING, down.message)
            return False
        current = self.active
        if current is not None and current.loaded.ref.pinned_uri == ref.pinned_uri:
            return False
        try:
            active = activate(load_ref(ref))
        except Exception as e:  # noqa: BLE001 - a broken version must not stop the old one
            self.metrics.load_failures.inc()
            self._failed(logging.ERROR,
                         f"loading {ref.pinned_uri} failed: {type(e).__name__}: {e}")
            return False
        self.active = active  # the swap
        self.last_error = None
        self.metrics.reloads.inc()
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(ref.name or "", active.version, ref.run_id or "").set(1)
        log.info("now serving %s version %s (was %s)", self.uri, active.version,
                 current.version if current else None)
        self._warm(active)
        # Everything loaded so far (MLflow, pandas, scikit-learn, the model: ~230,000 objects)
        # lives as long as the process: take it out of the cyclic collector's sight, or each
        # full collection walks it all, a 120-140 ms pause measured here, which showed up as
        # the p99 of batched requests (their futures make the garbage that triggers it).
        gc.freeze()
        return True

    def _warm(self, active: Active) -> None:
        """Load the pyfunc of a version served from its cached tables, after the swap: the
        fast endpoints answer at once, MLflow's slow path is ready seconds later."""
        if active.loaded.pyfunc_loaded:
            return
        try:
            active.input_schema  # noqa: B018 - loads the pyfunc
        except Exception as e:  # noqa: BLE001 - the slow path retries, the fast one serves
            log.warning("loading the pyfunc of version %s failed (%s: %s); /invocations "
                        "bodies that need MLflow's parser will retry it", active.version,
                        type(e).__name__, e)

    def _failed(self, level: int, error: str) -> None:
        """Log a failed poll once, not every few seconds while it keeps failing the same way."""
        if error != self.last_error:
            serving = (f"still serving version {self.active.version}" if self.active else
                       "polling until it loads (/ready answers 503 until then)")
            log.log(level, "%s; %s", error, serving)
        self.last_error = error

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            # Until the first load succeeds, retry sooner than the regular interval.
            wait = self.poll_interval if self.active else min(self.poll_interval, 2.0)
            if self._stop.wait(wait):
                return

    def start(self) -> None:
        """Start polling (the first poll loads the model)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; a load in progress is abandoned with the daemon thread."""
        self._stop.set()
