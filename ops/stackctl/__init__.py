"""``ops/stack up|down|status`` (``python -m ops.stackctl``): the MLflow tracking stack here.

Embedded mode (the default, used by ``make demo``): one ``mlflow server`` with
a sqlite backend and a local artifact folder, serving artifacts itself
(``--serve-artifacts``), bound to 127.0.0.1.

Production mode: PostgreSQL (the machine's server, started if stopped; role and
database created idempotently) for runs and the registry, an S3 bucket for the
artifacts (a local ``moto_server`` unless ``MLFLOW_S3_ENDPOINT_URL`` names an
endpoint), and ``mlflow server`` proxying the artifacts, so clients never hold S3
credentials. The store URI reaches the server through ``MLFLOW_BACKEND_STORE_URI``:
the password is never on a command line nor in a log.

``--artifacts-only`` starts a second server that only serves artifacts (for deployment
clients; tracking APIs answer 503); ``--auth`` runs MLflow's basic-auth app with the admin
password from the environment (placeholders refused).

State lives in ``$STACK_HOME`` (default ``.stack/``): ``logs/`` has one log per
component, ``run/`` the pid files ``down`` uses to stop exactly what ``up``
started (and ``stack.json``, what ``status`` checks), ``secrets.json`` (0600) the
secrets the stack generated itself.

The parts, lowest first (a module imports only those above it; process start/stop and
readiness polling come from :mod:`ops.procs`, shared with the demo, benchmarks and tests):

* :mod:`~ops.stackctl.config`: ``StackSettings``, placeholder checks, the secrets it keeps;
* :mod:`~ops.stackctl.state`: ``STACK_HOME`` paths, pid files, ``stack.json``, starting and
  stopping a recorded component;
* :mod:`~ops.stackctl.pg`: PostgreSQL (start, role and database, login check);
* :mod:`~ops.stackctl.s3`: the S3 endpoint (a local moto_server unless configured), bucket;
* :mod:`~ops.stackctl.server`: the ``mlflow server`` command, its environment and auth;
* :mod:`~ops.stackctl.cli`: ``up`` / ``down`` / ``status``.
"""
