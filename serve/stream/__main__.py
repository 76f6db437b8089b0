"""``python -m serve.stream``: the local runner (see :mod:`serve.stream.runner`)."""

from serve.stream.runner import cli

if __name__ == "__main__":
    cli()
