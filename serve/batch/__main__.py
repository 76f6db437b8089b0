"""``python -m serve.batch``: see :mod:`serve.batch.cli`."""

from serve.batch.cli import main

if __name__ == "__main__":
    main()
