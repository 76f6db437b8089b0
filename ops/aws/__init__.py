"""``python -m ops.aws deploy|status|destroy``: the production side on AWS as one stack.

``stack.yaml`` is the stack (network, artifact bucket, RDS PostgreSQL, the tracking
host, two Kinesis streams, the streaming Lambda, IAM); ``deploy.py`` creates or updates
it and waits with progress, ``destroy.py`` empties and deletes it and checks that
nothing is left (``leftovers.py`` asks each service), ``events.py`` holds the pure parts
(event lines, statuses, the ``.env`` lines), ``template.py`` reads the template's
parameters, ``lint.py`` runs cfn-lint and checkov (``policies/``: our own checkov checks).
Runbook: README.md here.
"""

from pathlib import Path

TEMPLATE = Path(__file__).with_name("stack.yaml")
DEFAULT_STACK_NAME = "duration"
