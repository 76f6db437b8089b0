"""Create or update the stack and wait for it, with progress; the stack's status.

Every function takes an :class:`Aws` (region + endpoint) and an ``echo`` callable for
the lines a user sees, so the CLI, the tests and scripts share them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from ops.aws import TEMPLATE
from ops.aws.events import (
    DEAD,
    SUCCESS,
    event_line,
    failure_lines,
    is_terminal,
    one_line,
    outputs_dict,
)
from ops.aws.template import load, parameter_list
from serve.urls import masked

Echo = Callable[[str], None]
CAPABILITIES = ["CAPABILITY_IAM"]  # the template creates roles, never with fixed names
TAGS = [{"Key": "project", "Value": "duration"}]
# What a call to AWS can raise: an error answer, no credentials/network, an unreadable answer
# (an emulator's HTML error page).
AWS_ERRORS = (ClientError, BotoCoreError, ResponseParserError)


class StackError(RuntimeError):
    """A stack operation failed; ``lines`` say why, one line each."""

    def __init__(self, message: str, lines: list[str] | None = None):
        super().__init__(message)
        self.lines = lines or []


@dataclass(frozen=True)
class Aws:
    """Where the stack lives: region and endpoint (None = boto3's own resolution, which
    also reads ``AWS_ENDPOINT_URL``)."""

    region: str | None = None
    endpoint_url: str | None = None

    def client(self, service: str):
        """A boto3 client for ``service`` in this region and endpoint."""
        import boto3

        return boto3.session.Session(region_name=self.region).client(
            service, endpoint_url=self.endpoint_url)

    def region_name(self) -> str | None:
        """The region boto3 resolves (option, ``AWS_DEFAULT_REGION``, config file)."""
        import boto3

        return boto3.session.Session(region_name=self.region).region_name


def describe(cf, name: str) -> dict | None:
    """The ``describe_stacks`` entry of ``name``, or None when there is no such stack."""
    try:
        return cf.describe_stacks(StackName=name)["Stacks"][0]
    except ClientError as e:
        if "does not exist" in str(e):
            return None
        raise


def recent_events(cf, stack_id: str) -> list[dict]:
    """The newest page of the stack's events (CloudFormation returns newest first)."""
    try:
        return cf.describe_stack_events(StackName=stack_id)["StackEvents"]
    except ClientError as e:
        if "does not exist" in str(e):
            return []
        raise


def wait(cf, stack_id: str, echo: Echo, seen: set[str], timeout: float,
         poll: float = 5.0) -> tuple[dict | None, list[dict]]:
    """Print each new event until the stack is no longer in progress.

    Returns the final stack (None once a deleted stack is gone) and the events of this
    operation; ``seen`` holds the ids of the events that happened before it.
    """
    started, last_note, new = time.monotonic(), time.monotonic(), []
    while True:
        fresh = [e for e in recent_events(cf, stack_id) if e["EventId"] not in seen]
        for e in sorted(fresh, key=lambda e: e["Timestamp"]):
            seen.add(e["EventId"])
            new.append(e)
            echo(event_line(e))
        stack = describe(cf, stack_id)
        if stack is None or is_terminal(stack["StackStatus"]):
            return stack, new
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            raise StackError(f"{stack['StackName']}: still {stack['StackStatus']} after "
                             f"{elapsed / 60:.0f} min; see `python -m ops.aws status`")
        if time.monotonic() - last_note >= 60:
            last_note = time.monotonic()
            echo(f"... {stack['StackStatus']} for {elapsed / 60:.0f} min (an RDS instance "
                 "takes 10-20 min)")
        time.sleep(poll)


def _check(op: str, stack: dict | None, events: list[dict], name: str) -> dict | None:
    status = stack["StackStatus"] if stack else "DELETE_COMPLETE"
    if status in SUCCESS[op]:
        return stack
    reason = one_line(stack.get("StackStatusReason")) if stack else ""
    raise StackError(f"{name}: {op} ended in {status}" + (f" ({reason})" if reason else ""),
                     failure_lines(events))


def delete_and_wait(cf, stack: dict, echo: Echo, timeout: float) -> None:
    """Delete a stack and wait until it is gone; StackError with the failed events if not."""
    seen = {e["EventId"] for e in recent_events(cf, stack["StackId"])}
    try:
        cf.delete_stack(StackName=stack["StackId"])
    except AWS_ERRORS as e:  # an emulator may fail right in the call
        raise StackError(f"{stack['StackName']}: delete failed", [one_line(str(e))[:400]]) from e
    final, events = wait(cf, stack["StackId"], echo, seen, timeout)
    _check("delete", final, events, stack["StackName"])


def deploy(aws: Aws, name: str, params: Mapping[str, str], echo: Echo,
           template_path: Path = TEMPLATE, timeout: float = 90 * 60) -> dict:
    """Create the stack, or update it (parameters not given keep their value); wait; return
    the stack with its outputs. StackError with one line per failed resource on failure."""
    template = load(template_path)
    body = Path(template_path).read_text()
    cf = aws.client("cloudformation")
    stack = describe(cf, name)
    if stack and stack["StackStatus"] in DEAD:
        echo(f"{name} is {stack['StackStatus']} from a failed first create: deleting it")
        delete_and_wait(cf, stack, echo, timeout)
        stack = None
    if stack and not is_terminal(stack["StackStatus"]):
        raise StackError(f"{name} is busy ({stack['StackStatus']}); wait for it to finish")
    op = "create" if stack is None else "update"
    previous = None if stack is None else {p["ParameterKey"] for p in stack.get("Parameters", [])}
    call = dict(StackName=name, TemplateBody=body, Capabilities=CAPABILITIES, Tags=TAGS,
                Parameters=parameter_list(template, params, previous))
    seen = set() if stack is None else {e["EventId"] for e in recent_events(cf, stack["StackId"])}
    echo(f"{op} stack {name} in {aws.region_name()}"
         + (f" at {aws.endpoint_url}" if aws.endpoint_url else ""))
    try:
        if stack is None:
            stack_id = cf.create_stack(OnFailure="ROLLBACK", **call)["StackId"]
        else:
            stack_id = cf.update_stack(**call)["StackId"]
    except AWS_ERRORS as e:
        if "No updates are to be performed" in str(e):
            echo(f"{name} is up to date: nothing to change")
            return stack
        raise StackError(f"{name}: {op} refused", [one_line(str(e))[:400]]) from e
    final, events = wait(cf, stack_id, echo, seen, timeout)
    return _check(op, final, events, name)


def resources(cf, stack_id: str) -> list[dict]:
    """Every resource of the stack: logical id, type, physical id, status."""
    out = []
    for page in cf.get_paginator("list_stack_resources").paginate(StackName=stack_id):
        out += page["StackResourceSummaries"]
    return out


def status(aws: Aws, name: str, echo: Echo) -> dict:
    """Print the stack's status, its resources and outputs; StackError if it does not exist."""
    cf = aws.client("cloudformation")
    stack = describe(cf, name)
    if stack is None:
        raise StackError(f"no stack {name} in {aws.region_name()}"
                         + (f" at {aws.endpoint_url}" if aws.endpoint_url else ""))
    reason = one_line(stack.get("StackStatusReason"))
    echo(f"{name}: {stack['StackStatus']}" + (f" ({reason})" if reason else ""))
    for r in resources(cf, stack["StackId"]):
        echo(f"  {r.get('ResourceStatus', '?'):<20} {r.get('LogicalResourceId') or '?':<26}"
             f" {r.get('ResourceType', '?'):<36} {r.get('PhysicalResourceId') or ''}")
    for key, value in outputs_dict(stack).items():
        echo(f"  output {key} = {masked(str(value))}")
    return stack
