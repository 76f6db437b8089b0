"""Tear the stack down and prove it: nothing it created is left.

Order: confirm; lift the database's deletion protection; empty the buckets (every
version: CloudFormation cannot delete a bucket that holds anything); delete the stack
and wait; if that failed, remove what blocked it (``leftovers.sweep``), empty the
buckets again (flow logs may have landed) and delete once more; then ask each service
about each resource the stack had (``leftovers.remaining``).
"""

from __future__ import annotations

from collections.abc import Callable

from botocore.exceptions import ClientError

from ops.aws.deploy import Aws, Echo, StackError, delete_and_wait, describe, resources
from ops.aws.leftovers import remaining, sweep


def unprotect_databases(aws: Aws, items: list[dict], echo: Echo) -> list[dict]:
    """Turn off deletion protection on the stack's RDS instances; returns their managed
    secrets (``{"ResourceType": "secret", ...}``) so that their removal is checked too."""
    rds, secrets = aws.client("rds"), []
    for r in items:
        if r.get("ResourceType") != "AWS::RDS::DBInstance" or not r.get("PhysicalResourceId"):
            continue
        db_id = r["PhysicalResourceId"]
        try:
            db = rds.describe_db_instances(DBInstanceIdentifier=db_id)["DBInstances"][0]
        except ClientError as e:
            echo(f"database {db_id}: {e}")
            continue
        arn = (db.get("MasterUserSecret") or {}).get("SecretArn")
        if arn:
            secrets.append({"ResourceType": "secret", "PhysicalResourceId": arn,
                            "LogicalResourceId": f"{r['LogicalResourceId']} password"})
        if db.get("DeletionProtection"):
            rds.modify_db_instance(DBInstanceIdentifier=db_id, DeletionProtection=False,
                                   ApplyImmediately=True)
            echo(f"database {db_id}: deletion protection turned off")
    return secrets


def empty_bucket(s3, bucket: str) -> int:
    """Delete every object version and delete marker of ``bucket``; returns how many."""
    n = 0
    try:
        pages = list(s3.get_paginator("list_object_versions").paginate(Bucket=bucket))
    except ClientError as e:
        if "NoSuchBucket" in str(e):
            return 0
        raise
    for page in pages:
        keys = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        for i in range(0, len(keys), 1000):
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[i:i + 1000], "Quiet": True})
            n += len(keys[i:i + 1000])
    return n


def empty_buckets(aws: Aws, items: list[dict], echo: Echo) -> None:
    """Empty every bucket of the stack."""
    s3 = aws.client("s3")
    for r in items:
        if r.get("ResourceType") == "AWS::S3::Bucket" and r.get("PhysicalResourceId"):
            n = empty_bucket(s3, r["PhysicalResourceId"])
            echo(f"bucket {r['PhysicalResourceId']}: {n} object versions deleted")


def destroy(aws: Aws, name: str, echo: Echo, confirm: Callable[[str], bool],
            timeout: float = 90 * 60) -> bool:
    """Delete the stack and everything in it; False when there was no stack. StackError if
    it was not confirmed, the deletion failed twice, or anything is left."""
    cf = aws.client("cloudformation")
    stack = describe(cf, name)
    if stack is None:
        echo(f"no stack {name} in {aws.region_name()}: nothing to destroy")
        return False
    items = resources(cf, stack["StackId"])
    buckets = [r["PhysicalResourceId"] for r in items if r.get("ResourceType") == "AWS::S3::Bucket"]
    if not confirm(f"Destroy stack {name}: {len(items)} resources, including the tracking "
                   f"database (every run and registered model) and every object in "
                   f"{', '.join(buckets) or 'its buckets'}?"):
        raise StackError(f"{name}: not destroyed (not confirmed)")
    items += unprotect_databases(aws, items, echo)
    empty_buckets(aws, items, echo)
    try:
        delete_and_wait(cf, stack, echo, timeout)
    except StackError as e:
        for line in [str(e), *e.lines]:
            echo(line)
        again = describe(cf, stack["StackId"])
        retry = again is not None and again["StackStatus"] != "DELETE_COMPLETE"
        echo("removing what blocked the deletion" + (", then deleting again" if retry else
             " (CloudFormation dropped the stack: its network goes directly)"))
        sweep(aws, items, echo, orphaned=not retry)
        empty_buckets(aws, items, echo)
        if retry:
            delete_and_wait(cf, again, echo, timeout)
    left, unchecked = remaining(aws, items)
    if unchecked:
        echo(f"not checkable here: {'; '.join(unchecked)}")
    if left:
        raise StackError(f"{name}: deleted, but {len(left)} resources are still there", left)
    echo(f"{name}: destroyed; none of its {len(items)} resources is left")
    return True
