"""Online service: ``python -m serve.web`` serves the production model over HTTP.

One uvicorn process (uvloop + httptools) running a small raw ASGI app: on this
machine class a multi-worker uvicorn stalls each keep-alive response by ~40 ms,
and Starlette's routing/request objects cost more than the ride model itself
(see README, section online, for the measurements). Endpoints:

* ``POST /predict``: one ride -> ``{"duration", "model_version"}``; ``{"rides": [...]}`` ->
  ``{"predictions": [{"duration"}, ...], "model_version"}`` (course-compatible);
* ``POST /invocations``: the MLflow scoring protocol (serve/scoring.py);
* ``GET /health`` (alive), ``/ping`` (same, as in MLflow), ``/ready`` (a model is loaded),
  ``/version`` (which model), ``/metrics`` (Prometheus).

A background thread polls the registry and swaps in a new production version
once it is loaded; a request reads the active model once, so requests in flight
finish on the version they started with.

The parts, lowest first (a module imports only those above it):

* :mod:`~serve.web.settings`: ``WebSettings`` (env ``WEB_*``, ``.env``);
* :mod:`~serve.web.metrics`: the Prometheus metrics of one app;
* :mod:`~serve.web.holder`: the active model and its hot swap (registry poller);
* :mod:`~serve.web.service`: the endpoints as functions of (body, content type), no ASGI;
* :mod:`~serve.web.app`: the raw ASGI adapter (routing, body limits, errors, lifespan);
* :mod:`~serve.web.server`: uvicorn with a drain on SIGTERM and a clean exit;
* :mod:`~serve.web.cli`: the click command that runs it (``python -m serve.web``).
"""
