"""The Lambda event source mapping's protocol, as the local runner plays it: Kinesis events
built from ``GetRecords`` records, and where a partial-batch response says to resume."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

LOCAL_ROLE_ARN = "arn:aws:iam::000000000000:role/duration-local-runner"


def kinesis_event(records: list[Mapping], shard_id: str, stream_arn: str, region: str) -> dict:
    """A Lambda Kinesis event from ``GetRecords`` records, shaped as AWS delivers it."""
    out = []
    for r in records:
        seq = r["SequenceNumber"]
        arrival = r.get("ApproximateArrivalTimestamp")
        out.append({
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": r["PartitionKey"],
                "sequenceNumber": seq,
                "data": base64.b64encode(r["Data"]).decode("ascii"),
                "approximateArrivalTimestamp": arrival.timestamp() if arrival else time.time(),
            },
            "eventSource": "aws:kinesis",
            "eventVersion": "1.0",
            "eventID": f"{shard_id}:{seq}",
            "eventName": "aws:kinesis:record",
            "invokeIdentityArn": LOCAL_ROLE_ARN,
            "awsRegion": region,
            "eventSourceARN": stream_arn,
        })
    return {"Records": out}


def lowest_failure(response, first: str | None = None) -> str | None:
    """The lowest failed sequence number of a handler response (where Lambda resumes).

    As in Lambda, a response that is not a valid partial-batch response (an
    identifier that is missing or not a sequence number) fails the whole batch:
    ``first`` is returned then.
    """
    items = response.get("batchItemFailures") if isinstance(response, Mapping) else None
    if not items:
        return None
    try:
        return min((str(i["itemIdentifier"]) for i in items), key=int)
    except (KeyError, TypeError, ValueError):
        log.error("invalid batchItemFailures %r: the whole batch is retried", items)
        return first
