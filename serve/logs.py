"""Logging set-up for every command: one format, one call at start-up."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Libraries that log routine facts at INFO ("Found credentials in environment variables" on
# every boto3 client): only their warnings are shown.
QUIET = ("botocore.credentials",)


def setup_logging(level: str | int = "INFO") -> None:
    """Log to stderr as ``time LEVEL logger message`` at ``level`` (a name or a number).

    The level is set on the root logger even when handlers exist already (the Lambda
    runtime installs its own), so ``--log-level`` / ``-v`` always take effect.
    """
    level = level.upper() if isinstance(level, str) else level
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger().setLevel(level)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
