"""Pure helpers of the stack commands: stack statuses, event lines, failure lines, ``.env`` lines.

Nothing here talks to AWS: the functions take what CloudFormation returned.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime

# What each operation ends in when it worked; any other status without _IN_PROGRESS is a failure.
SUCCESS = {
    "create": {"CREATE_COMPLETE"},
    "update": {"UPDATE_COMPLETE"},
    "delete": {"DELETE_COMPLETE"},
}
# A stack in one of these holds no resources worth keeping and cannot be updated: a first
# create that rolled back. It is deleted before the next create.
DEAD = {"ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "CREATE_FAILED"}
CANCELLED = "Resource creation cancelled"


def is_terminal(status: str) -> bool:
    """Whether CloudFormation has finished with the stack (no operation in progress)."""
    return not status.endswith("_IN_PROGRESS")


def one_line(text: str | None) -> str:
    """Collapse whitespace (CloudFormation reasons can span lines)."""
    return re.sub(r"\s+", " ", text or "").strip()


def event_line(event: Mapping) -> str:
    """``12:03:04 CREATE_COMPLETE     Database (AWS::RDS::DBInstance): reason``."""
    ts = event.get("Timestamp")
    when = ts.strftime("%H:%M:%S") if isinstance(ts, datetime) else "--:--:--"
    reason = one_line(event.get("ResourceStatusReason"))
    line = (f"{when} {event.get('ResourceStatus', '?'):<20} {event.get('LogicalResourceId', '?')}"
            f" ({event.get('ResourceType', '?')})")
    return f"{line}: {reason}" if reason else line


def failure_lines(events: Iterable[Mapping]) -> list[str]:
    """One line per failed resource, oldest first: the causes, not the cancellations."""
    lines, seen, cancelled = [], set(), 0
    for e in sorted(events, key=lambda e: e["Timestamp"].timestamp()
                    if isinstance(e.get("Timestamp"), datetime) else 0.0):
        status = e.get("ResourceStatus", "")
        if not status.endswith("_FAILED"):
            continue
        reason = one_line(e.get("ResourceStatusReason")) or "no reason given"
        if reason.startswith(CANCELLED):
            cancelled += 1
            continue
        key = (e.get("LogicalResourceId"), reason)
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"FAILED {e.get('LogicalResourceId', '?')} ({e.get('ResourceType', '?')}):"
                     f" {reason}")
    if cancelled:
        lines.append(f"({cancelled} other resources cancelled because of the failures above)")
    return lines


def outputs_dict(stack: Mapping) -> dict[str, str]:
    """``{OutputKey: OutputValue}`` of a ``describe_stacks`` entry."""
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs") or []}


def env_lines(stack_name: str, outputs: Mapping[str, str], region: str | None,
              endpoint_url: str | None = None) -> list[str]:
    """The ``.env`` lines a client needs: tracking URI, stream names, region. Never a secret:
    only outputs go in, and the stack outputs no secret (tested)."""
    lines = [f"# .env for clients of stack {stack_name} (the database password stays in "
             "Secrets Manager)",
             f"MLFLOW_TRACKING_URI={outputs['TrackingUri']}",
             f"PREDICTIONS_STREAM_NAME={outputs['OutputStreamName']}",
             f"DEAD_LETTER_DESTINATION={outputs['DeadLetterDestination']}"]
    if region:
        lines.append(f"AWS_DEFAULT_REGION={region}")
    if endpoint_url:
        lines += [f"AWS_ENDPOINT_URL={endpoint_url}", f"KINESIS_ENDPOINT_URL={endpoint_url}"]
    lines.append(f"# ride events go to {outputs['InputStreamName']}: python -m "
                 f"serve.stream.produce --stream {outputs['InputStreamName']} --rides ...")
    return lines
