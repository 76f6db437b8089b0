"""``python -m serve.web``: see :mod:`serve.web.cli`."""

from serve.web.cli import main

if __name__ == "__main__":
    main()
