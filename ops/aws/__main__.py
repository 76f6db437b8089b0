"""``python -m ops.aws deploy|status|destroy``: the command line of the AWS stack."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from ops.aws import DEFAULT_STACK_NAME, TEMPLATE
from ops.aws.deploy import AWS_ERRORS, Aws, StackError, deploy, status
from ops.aws.destroy import destroy
from ops.aws.events import env_lines, one_line, outputs_dict
from ops.aws.template import ParameterError
from serve.cli import Group

_stack_name = click.option(
    "--stack-name", default=DEFAULT_STACK_NAME, show_default=True, envvar="DURATION_STACK_NAME",
    help="CloudFormation stack name (env DURATION_STACK_NAME).")
_region = click.option("--region", default=None, envvar="AWS_DEFAULT_REGION",
                       help="AWS region (default: AWS_DEFAULT_REGION or the AWS config).")
_endpoint = click.option(
    "--endpoint-url", default=None, envvar="AWS_ENDPOINT_URL",
    help="Endpoint of every AWS API (moto_server, LocalStack); env AWS_ENDPOINT_URL; "
         "default: real AWS.")
_timeout = click.option("--timeout", default=90, show_default=True, type=click.IntRange(1),
                        help="Minutes to wait for CloudFormation.")


@contextmanager
def _errors() -> Iterator[None]:
    """Failures as one line each on stderr and exit 1, never a traceback."""
    try:
        yield
    except StackError as e:
        for line in e.lines:
            click.echo(line, err=True)
        raise click.ClickException(str(e)) from e
    except (ParameterError, *AWS_ERRORS) as e:  # parameters, AWS's answer, credentials
        raise click.ClickException(one_line(str(e))[:400]) from e


def _print_outputs(name: str, stack: dict, aws: Aws) -> None:
    outputs = outputs_dict(stack)
    for key, value in outputs.items():
        click.echo(f"{key} = {value}")
    click.echo("")
    for line in env_lines(name, outputs, aws.region_name(), aws.endpoint_url):
        click.echo(line)


@click.group(cls=Group)
def cli() -> None:
    """The production side on AWS as one CloudFormation stack (ops/aws/stack.yaml)."""


@cli.command("deploy")
@_stack_name
@_region
@_endpoint
@click.option("--allowed-cidr", default=None,
              help="Network that reaches the tracking server on 5000 (e.g. your VPN's /24); "
                   "required the first time.")
@click.option("--tracking-image", default=None,
              help="ECR URI of the tracking image (ops/Dockerfile); required the first time.")
@click.option("--lambda-image", default=None,
              help="ECR URI of the Lambda image (serve/lambda.Dockerfile); required the first "
                   "time.")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="Any other template parameter, e.g. -p ShardCount=2 (repeatable).")
@click.option("--template", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=TEMPLATE, show_default=True, help="CloudFormation template.")
@_timeout
def deploy_cmd(stack_name, region, endpoint_url, allowed_cidr, tracking_image, lambda_image,
               params, template, timeout) -> None:
    """Create or update the stack, wait with progress, print its outputs and .env lines.

    On an update, parameters not given keep their current value."""
    given = {}
    for p in params:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{p!r} is not KEY=VALUE", param_hint="--param")
        given[key] = value
    for key, value in (("AllowedCidr", allowed_cidr), ("TrackingImageUri", tracking_image),
                       ("LambdaImageUri", lambda_image)):
        if value is not None:
            given[key] = value
    if given.get("AllowedCidr", "").endswith("/0"):
        raise click.BadParameter("the tracking server has no login: allow a network, not the "
                                 "internet", param_hint="--allowed-cidr")
    aws = Aws(region, endpoint_url)
    with _errors():
        stack = deploy(aws, stack_name, given, click.echo, template, timeout * 60)
        _print_outputs(stack_name, stack, aws)


@cli.command("status")
@_stack_name
@_region
@_endpoint
def status_cmd(stack_name, region, endpoint_url) -> None:
    """Show the stack's status, resources, outputs and .env lines."""
    aws = Aws(region, endpoint_url)
    with _errors():
        stack = status(aws, stack_name, click.echo)
        if stack["StackStatus"].endswith("_COMPLETE") and "TrackingUri" in outputs_dict(stack):
            click.echo("")
            for line in env_lines(stack_name, outputs_dict(stack), aws.region_name(),
                                  aws.endpoint_url):
                click.echo(line)


@cli.command("destroy")
@_stack_name
@_region
@_endpoint
@click.option("--yes", is_flag=True, help="Do not ask (for scripts and CI).")
@_timeout
def destroy_cmd(stack_name, region, endpoint_url, yes, timeout) -> None:
    """Delete the stack with its data (database, artifacts), then check nothing is left."""
    def confirm(question: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise click.UsageError("not a terminal: pass --yes to destroy without asking")
        return click.prompt(f"{question}\nType the stack name to confirm",
                            default="", show_default=False) == stack_name

    with _errors():
        destroy(Aws(region, endpoint_url), stack_name, click.echo, confirm, timeout * 60)


if __name__ == "__main__":
    cli(prog_name="python -m ops.aws")
