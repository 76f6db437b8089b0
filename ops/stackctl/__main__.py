"""``python -m ops.stackctl`` (what ``ops/stack`` runs): see :mod:`ops.stackctl.cli`."""

from ops.stackctl.cli import cli

if __name__ == "__main__":
    cli(prog_name="ops/stack")
