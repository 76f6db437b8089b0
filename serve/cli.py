"""The error convention of every command line here (train.py, ops/synth, serve.batch,
serve.stream and its producer, serve.web, ops/stack, ops.aws, ops/flows).

A user's mistake (a :class:`~serve.errors.DurationError`, or a click usage error) is one
line on stderr naming the input and the fix, and a non-zero exit: 2 for usage errors, 1
otherwise; never a traceback. ``-v``/``--verbose`` prints the traceback before that line.
Anything else is a bug and keeps its traceback.

    @click.command(cls=Command)      # or @click.group(cls=Group): its subcommands follow it
    def main(...): ...
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import click

from serve.errors import DurationError

VERBOSE = "duration.verbose"  # in ctx.meta, which every context of one invocation shares
_GUARDED = "duration.guarded"
USER_ERRORS: tuple[type[BaseException], ...] = (DurationError,)


def one_line(text: str) -> str:
    """``text`` on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(text).split())


def _remember_verbose(previous):
    def callback(ctx: click.Context, param: click.Parameter, value):
        if value:
            ctx.meta[VERBOSE] = True
        return previous(ctx, param, value) if previous else value

    return callback


def _add_verbose(command: click.Command) -> None:
    """Give ``command`` the ``-v/--verbose`` flag, or hook into the one it already has."""
    for param in command.params:
        if isinstance(param, click.Option) and "--verbose" in param.opts:
            param.callback = _remember_verbose(param.callback)
            return
    command.params.append(click.Option(
        ["-v", "--verbose"], is_flag=True, expose_value=False,
        callback=_remember_verbose(None), help="Show the full traceback of an error."))


@contextmanager
def user_errors(ctx: click.Context) -> Iterator[None]:
    """Render user mistakes raised inside as one click error line (see the module doc)."""
    if ctx.meta.get(_GUARDED):  # an enclosing group already guards this invocation
        yield
        return
    ctx.meta[_GUARDED] = True
    try:
        yield
    except click.ClickException as e:
        if ctx.meta.get(VERBOSE):
            traceback.print_exception(e, file=sys.stderr)
        raise
    except Exception as e:
        line = (one_line(getattr(e, "message", None) or e) if isinstance(e, USER_ERRORS)
                else _configuration_error(e))
        if line is None:  # a bug: its traceback is the report
            raise
        if ctx.meta.get(VERBOSE):
            traceback.print_exception(e, file=sys.stderr)
        raise click.ClickException(line) from e


def _configuration_error(e: Exception) -> str | None:
    """One line for the set-up mistakes libraries we call report as exceptions, else None."""
    botocore = sys.modules.get("botocore.exceptions")  # loaded only if boto3 was used
    if botocore is not None and isinstance(e, botocore.NoRegionError):
        return "no AWS region: set AWS_DEFAULT_REGION (e.g. us-east-1)"
    if botocore is not None and isinstance(e, botocore.NoCredentialsError):
        return ("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                "AWS_PROFILE); any value works against moto_server")
    return None


class _Convention:
    """Mixin: the verbose flag on construction, the guard around invocation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _add_verbose(self)

    def invoke(self, ctx: click.Context):
        with user_errors(ctx):
            return super().invoke(ctx)


class Command(_Convention, click.Command):
    """A click command following the error convention."""


class Group(_Convention, click.Group):
    """A click group following the error convention; its subcommands follow it too."""

    command_class = Command
    group_class = type  # subgroups are of this class as well
