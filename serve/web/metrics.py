"""The online service's Prometheus metrics, in their own registry (one per app)."""

from __future__ import annotations


class Metrics:
    """The service's Prometheus metrics, in their own registry (one per app)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("duration_http_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "duration_http_request_duration_seconds",
            "Time from the first byte of the request to the last byte of the response.",
            ["endpoint", "status"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.predictions = Counter("duration_predictions", "Rides predicted, by model version.",
                                   ["model_version"], registry=self.registry)
        self.model_info = Gauge("duration_model_info", "The model being served (value 1).",
                                ["name", "version", "run_id"], registry=self.registry)
        self.reloads = Counter("duration_model_reloads",
                               "Models loaded and swapped in (the first load included).",
                               registry=self.registry)
        self.poll_failures = Counter("duration_registry_poll_failures",
                                     "Registry polls that failed (the loaded model keeps serving).",
                                     registry=self.registry)
        self.load_failures = Counter("duration_model_load_failures",
                                     "New versions that failed to load.", registry=self.registry)
        self.model_errors = Counter(
            "duration_model_errors", "Requests the model failed on (500 MODEL_ERROR), by version.",
            ["model_version"], registry=self.registry)
        self.shed = Counter("duration_requests_shed",
                            "Requests answered 503 OVERLOADED before any work was done on them.",
                            registry=self.registry)
        self.log_failed = Gauge("duration_prediction_log_failed_rows",
                                "Prediction-log rows the sink failed to write (e.g. disk full).",
                                registry=self.registry)
        self.log_dropped = Gauge("duration_prediction_log_dropped_batches",
                                 "Prediction-log batches dropped because the writer fell behind.",
                                 registry=self.registry)
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
        self.batch_rows = Histogram("duration_batch_rows",
                                    "Rides per coalesced predict call (adaptive batching).",
                                    registry=self.registry, buckets=sizes)
        self.batch_requests = Histogram("duration_batch_requests",
                                        "Requests per coalesced predict call (adaptive batching).",
                                        registry=self.registry, buckets=sizes)
        self.batch_queue_depth = Gauge("duration_batch_queue_depth",
                                       "Requests waiting for the next coalesced predict call.",
                                       registry=self.registry)
        self.batch_queue_full = Counter("duration_batch_queue_full",
                                        "Requests refused because the batching queue was full.",
                                        registry=self.registry)
        self._children: dict[tuple[str, int], tuple] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one request and its latency (label children cached: labels() is not free)."""
        key = (endpoint, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (self.requests.labels(endpoint, str(status)),
                                           self.latency.labels(endpoint, str(status)))
        child[0].inc()
        child[1].observe(seconds)

    def count(self, endpoint: str, status: int) -> None:
        """Count an answer without a latency (given by the HTTP layer, before the app)."""
        self.requests.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        """The text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
