"""``ops/stack up|down|status|backup|restore`` (``python -m ops.stackctl``): the MLflow
tracking stack here.

Embedded mode (the default, used by ``make demo``): one ``mlflow server`` with
a sqlite backend and a local artifact folder, serving artifacts itself
(``--serve-artifacts``), bound to 127.0.0.1.

Production mode: PostgreSQL (the machine's server, started if stopped; role and
database created idempotently) for runs and the registry, an S3 bucket for the
artifacts (the local S3 server, objects on disk in ``$STACK_HOME/s3``, unless
``MLFLOW_S3_ENDPOINT_URL`` names an endpoint), and ``mlflow server`` proxying the
artifacts, so clients never hold S3 credentials. The store URI reaches the server through
``MLFLOW_BACKEND_STORE_URI``: the password is never on a command line nor in a log.

``--artifacts-only`` starts a second server that only serves artifacts (for deployment
clients; tracking APIs answer 503); ``--auth`` runs MLflow's basic-auth app with the admin
password from the environment (placeholders refused).

State lives in ``$STACK_HOME`` (default ``.stack/`` at the project root): ``embedded/`` and
``s3/`` the data, ``logs/`` one log per component, ``run/`` the pid files ``down`` uses to
stop exactly what ``up`` started (and ``stack.json``, what ``status`` checks and a restart
reuses), ``secrets.json`` (0600) the secrets the stack generated itself; the local
PostgreSQL role's password is kept in ``~/.config/duration/secrets.json``.

The parts, lowest first (a module imports only those above it; process start/stop and
readiness polling come from :mod:`ops.procs`, shared with the demo, benchmarks and tests):

* :mod:`~ops.stackctl.config`: ``StackSettings``, placeholder checks, the secrets it keeps;
* :mod:`~ops.stackctl.state`: ``STACK_HOME`` paths, pid files, ``stack.json``, starting and
  stopping a recorded component;
* :mod:`~ops.stackctl.pg`: PostgreSQL (start, role and database, login check);
* :mod:`~ops.stackctl.s3`: the S3 endpoint (the local S3 server unless configured), bucket,
  copying a prefix to a folder and back;
* :mod:`~ops.stackctl.server`: the ``mlflow server`` command, its environment and auth;
* :mod:`~ops.stackctl.integrity`: can every version behind an alias be read back;
* :mod:`~ops.stackctl.lifecycle`: ``up`` / ``down`` / ``status``;
* :mod:`~ops.stackctl.backup`: ``backup`` / ``restore``;
* :mod:`~ops.stackctl.cli`: the click commands.
"""
