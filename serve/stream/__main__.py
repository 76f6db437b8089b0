"""``python -m serve.stream``: the local runner (see :mod:`serve.stream.cli`)."""

from serve.stream.cli import cli

if __name__ == "__main__":
    cli()
