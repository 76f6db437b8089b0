"""Kinesis stream look-ups shared by the runner and the producer: a stream's identity, and
checks that name the stream and the fix in one line when it is missing or unreachable.

Clients are passed in (boto3 Kinesis clients); nothing here creates one.
"""

from __future__ import annotations

from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from serve.stream.sinks import error_code

ENDPOINT_HELP = ("Kinesis endpoint (moto_server, LocalStack); default: KINESIS_ENDPOINT_URL "
                 "from the environment or .env, else real AWS.")


class StreamUnavailable(Exception):
    """A stream that is missing or cannot be reached; the message names it and the fix."""


@dataclass(frozen=True)
class StreamIdentity:
    """Which stream a name meant at some moment: a stream deleted and created again under the
    same name has the same ARN but another creation time (and new sequence numbers)."""

    arn: str
    created: str  # ISO 8601 creation time, as Kinesis reports it

    def to_json(self) -> dict:
        """The form stored in checkpoint files."""
        return {"arn": self.arn, "created": self.created}

    @classmethod
    def from_json(cls, data) -> StreamIdentity | None:
        """Read back :meth:`to_json` (None for a checkpoint written before identities)."""
        if not isinstance(data, dict) or not data.get("arn") or not data.get("created"):
            return None
        return cls(str(data["arn"]), str(data["created"]))

    def __str__(self) -> str:
        return f"{self.arn} created {self.created}"


def endpoint_of(client) -> str:
    """Where ``client`` talks to, for messages."""
    return f"{client.meta.endpoint_url} (region {client.meta.region_name})"


def describe_stream(client, name: str) -> StreamIdentity:
    """The identity of stream ``name`` (boto3 errors propagate)."""
    summary = client.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
    return StreamIdentity(summary["StreamARN"], summary["StreamCreationTimestamp"].isoformat())


def require_stream(client, name: str, what: str = "stream",
                   option: str = "--endpoint-url") -> StreamIdentity:
    """The identity of stream ``name``; raises StreamUnavailable with a one-line message naming
    the stream and the fix when it does not exist or the endpoint cannot be reached."""
    where = endpoint_of(client)
    try:
        return describe_stream(client, name)
    except NoCredentialsError as e:
        raise StreamUnavailable(
            f"no AWS credentials for Kinesis at {where}: set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY (any value for moto_server) or AWS_PROFILE") from e
    except ClientError as e:
        if error_code(e) != "ResourceNotFoundException":
            raise StreamUnavailable(f"Kinesis {what} {name!r} at {where}: {e}") from e
        raise StreamUnavailable(
            f"no Kinesis {what} named {name!r} at {where}: create it (aws kinesis create-stream "
            f"--stream-name {name} --shard-count 1) or check the name and the endpoint "
            f"({option} / KINESIS_ENDPOINT_URL)") from e
    except BotoCoreError as e:
        raise StreamUnavailable(
            f"cannot reach Kinesis at {where} to find {what} {name!r}: {e}; start the endpoint "
            f"(e.g. moto_server) or point {option} / KINESIS_ENDPOINT_URL at it") from e
