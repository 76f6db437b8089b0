"""What a stack deletion left behind: check each resource the stack had, remove stragglers.

``exists`` asks the owning service about one physical resource (terminated instances,
deleted endpoints and secrets scheduled for deletion count as gone). ``sweep`` removes
the network pieces that block a VPC's deletion when CloudFormation could not delete
them (Lambda ENIs on AWS are the usual case; moto_server's CloudFormation does not
delete VPC endpoints, route tables, gateways, flow logs or Elastic IPs at all).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from botocore.exceptions import ClientError

_ABSENT = re.compile(r"NotFound|NoSuch|NonExistent|DoesNotExist|^404$|ResourceNotFound")

# Types that live inside another resource of the stack: gone when it is gone.
PART_OF = {
    "AWS::EC2::Route": "AWS::EC2::RouteTable",
    "AWS::EC2::SubnetRouteTableAssociation": "AWS::EC2::RouteTable",
    "AWS::EC2::VPCGatewayAttachment": "AWS::EC2::InternetGateway",
    "AWS::S3::BucketPolicy": "AWS::S3::Bucket",
    "AWS::SQS::QueuePolicy": "AWS::SQS::Queue",
}


def _absent(e: ClientError) -> bool:
    return bool(_ABSENT.search(e.response.get("Error", {}).get("Code", "")))


def _ask(call: Callable[[], object]) -> object | None:
    """The answer, or None when the service says the resource does not exist."""
    try:
        return call()
    except ClientError as e:
        if _absent(e):
            return None
        raise


def _probes(aws) -> dict[str, Callable[[str], bool]]:
    """Per resource type: physical id -> does it still exist."""
    c = aws.client
    ec2 = c("ec2")

    def instance(pid: str) -> bool:
        r = _ask(lambda: ec2.describe_instances(InstanceIds=[pid]))
        states = [i["State"]["Name"] for res in (r or {}).get("Reservations", [])
                  for i in res["Instances"]]
        return any(s != "terminated" for s in states)

    def endpoint(pid: str) -> bool:
        r = _ask(lambda: ec2.describe_vpc_endpoints(VpcEndpointIds=[pid]))
        return any(e["State"].lower() != "deleted" for e in (r or {}).get("VpcEndpoints", []))

    def secret(arn: str) -> bool:
        r = _ask(lambda: c("secretsmanager").describe_secret(SecretId=arn))
        return bool(r) and "DeletedDate" not in r

    def log_group(name: str) -> bool:
        groups = c("logs").describe_log_groups(logGroupNamePrefix=name)["logGroups"]
        return any(g["logGroupName"] == name for g in groups)

    def some(call: Callable[[str], object], key: str) -> Callable[[str], bool]:
        return lambda pid: bool((_ask(lambda: call(pid)) or {}).get(key))

    return {
        "AWS::S3::Bucket": lambda pid: _ask(lambda: c("s3").head_bucket(Bucket=pid)) is not None,
        "AWS::Kinesis::Stream": lambda pid: _ask(
            lambda: c("kinesis").describe_stream_summary(StreamName=pid)) is not None,
        "AWS::Lambda::Function": lambda pid: _ask(
            lambda: c("lambda").get_function(FunctionName=pid)) is not None,
        "AWS::Lambda::EventSourceMapping": lambda pid: _ask(
            lambda: c("lambda").get_event_source_mapping(UUID=pid)) is not None,
        "AWS::IAM::Role": lambda pid: _ask(lambda: c("iam").get_role(RoleName=pid)) is not None,
        "AWS::IAM::InstanceProfile": lambda pid: _ask(
            lambda: c("iam").get_instance_profile(InstanceProfileName=pid)) is not None,
        "AWS::RDS::DBInstance": some(
            lambda pid: c("rds").describe_db_instances(DBInstanceIdentifier=pid), "DBInstances"),
        "AWS::RDS::DBSubnetGroup": some(
            lambda pid: c("rds").describe_db_subnet_groups(DBSubnetGroupName=pid),
            "DBSubnetGroups"),
        "AWS::SQS::Queue": lambda pid: _ask(
            lambda: c("sqs").get_queue_attributes(QueueUrl=pid)) is not None,
        "AWS::Logs::LogGroup": log_group,
        "AWS::EC2::Instance": instance,
        "AWS::EC2::VPCEndpoint": endpoint,
        "AWS::EC2::VPC": some(lambda pid: ec2.describe_vpcs(VpcIds=[pid]), "Vpcs"),
        "AWS::EC2::Subnet": some(lambda pid: ec2.describe_subnets(SubnetIds=[pid]), "Subnets"),
        "AWS::EC2::SecurityGroup": some(
            lambda pid: ec2.describe_security_groups(GroupIds=[pid]), "SecurityGroups"),
        "AWS::EC2::RouteTable": some(
            lambda pid: ec2.describe_route_tables(RouteTableIds=[pid]), "RouteTables"),
        "AWS::EC2::InternetGateway": some(
            lambda pid: ec2.describe_internet_gateways(InternetGatewayIds=[pid]),
            "InternetGateways"),
        "AWS::EC2::EIP": some(lambda pid: ec2.describe_addresses(PublicIps=[pid]), "Addresses"),
        "AWS::EC2::FlowLog": some(lambda pid: ec2.describe_flow_logs(FlowLogIds=[pid]),
                                  "FlowLogs"),
        "AWS::EC2::LaunchTemplate": some(
            lambda pid: ec2.describe_launch_templates(LaunchTemplateIds=[pid]),
            "LaunchTemplates"),
        "secret": secret,
    }


def remaining(aws, items: Iterable[Mapping]) -> tuple[list[str], list[str]]:
    """``(still there, not checkable)`` among ``items`` (``ResourceType``, ``PhysicalResourceId``,
    ``LogicalResourceId``), each as ``"Logical (Type) physical-id"``."""
    probes, left, unchecked = _probes(aws), [], []
    for r in items:
        typ, pid = r.get("ResourceType") or "", r.get("PhysicalResourceId") or ""
        label = f"{r.get('LogicalResourceId') or '?'} ({typ}) {pid}".rstrip()
        if not typ:  # moto_server lists the types its CloudFormation skipped without a name
            unchecked.append("a resource without type or id (never created by this endpoint)")
            continue
        if typ in PART_OF:
            continue  # checked through its parent
        probe = probes.get(typ)
        if probe is None or not pid:
            unchecked.append(label)
        elif probe(pid):
            left.append(label)
    return left, unchecked


def sweep(aws, items: Iterable[Mapping], echo: Callable[[str], None],
          orphaned: bool = False) -> int:
    """Remove what blocks the VPC's deletion: endpoints, Elastic IPs, flow logs, gateways,
    route tables, launch templates and detached network interfaces; with ``orphaned`` (the
    stack is gone, so CloudFormation will not retry) the security groups, subnets and VPC
    too. Returns how many were removed."""
    ec2, done = aws.client("ec2"), 0
    by_type: dict[str, list[str]] = {}
    for r in items:
        if r.get("PhysicalResourceId"):
            by_type.setdefault(r["ResourceType"], []).append(r["PhysicalResourceId"])

    def attempt(what: str, call: Callable[[], object]) -> None:
        nonlocal done
        try:
            if _ask(call) is not None:
                done += 1
                echo(f"removed {what}")
        except ClientError as e:
            echo(f"could not remove {what}: {e}")

    for pid in by_type.get("AWS::EC2::VPCEndpoint", []):
        attempt(pid, lambda pid=pid: ec2.delete_vpc_endpoints(VpcEndpointIds=[pid]))
    for ip in by_type.get("AWS::EC2::EIP", []):
        for a in (_ask(lambda ip=ip: ec2.describe_addresses(PublicIps=[ip])) or {}).get(
                "Addresses", []):
            if a.get("AssociationId"):
                attempt(f"association of {ip}", lambda a=a: ec2.disassociate_address(
                    AssociationId=a["AssociationId"]))
            attempt(ip, lambda a=a: ec2.release_address(AllocationId=a["AllocationId"]))
    for pid in by_type.get("AWS::EC2::FlowLog", []):
        attempt(pid, lambda pid=pid: ec2.delete_flow_logs(FlowLogIds=[pid]))
    for pid in by_type.get("AWS::EC2::InternetGateway", []):
        for g in (_ask(lambda pid=pid: ec2.describe_internet_gateways(
                InternetGatewayIds=[pid])) or {}).get("InternetGateways", []):
            for att in g.get("Attachments", []):
                attempt(f"{pid} from {att['VpcId']}", lambda att=att, pid=pid: (
                    ec2.detach_internet_gateway(InternetGatewayId=pid, VpcId=att["VpcId"])))
            attempt(pid, lambda pid=pid: ec2.delete_internet_gateway(InternetGatewayId=pid))
    for pid in by_type.get("AWS::EC2::RouteTable", []):
        for t in (_ask(lambda pid=pid: ec2.describe_route_tables(RouteTableIds=[pid])) or {}).get(
                "RouteTables", []):
            for a in t.get("Associations", []):
                if not a.get("Main"):
                    attempt(f"association {a['RouteTableAssociationId']}", lambda a=a: (
                        ec2.disassociate_route_table(AssociationId=a["RouteTableAssociationId"])))
            attempt(pid, lambda pid=pid: ec2.delete_route_table(RouteTableId=pid))
    for pid in by_type.get("AWS::EC2::LaunchTemplate", []):
        attempt(pid, lambda pid=pid: ec2.delete_launch_template(LaunchTemplateId=pid))
    for vpc in by_type.get("AWS::EC2::VPC", []):
        enis = ec2.describe_network_interfaces(Filters=[
            {"Name": "vpc-id", "Values": [vpc]}, {"Name": "status", "Values": ["available"]}])
        for eni in enis["NetworkInterfaces"]:
            attempt(eni["NetworkInterfaceId"], lambda eni=eni: ec2.delete_network_interface(
                NetworkInterfaceId=eni["NetworkInterfaceId"]))
    if orphaned:
        for typ, delete in (("AWS::EC2::SecurityGroup", lambda i: ec2.delete_security_group(
                                GroupId=i)),
                            ("AWS::EC2::Subnet", lambda i: ec2.delete_subnet(SubnetId=i)),
                            ("AWS::EC2::VPC", lambda i: ec2.delete_vpc(VpcId=i))):
            for pid in by_type.get(typ, []):
                attempt(pid, lambda pid=pid, delete=delete: delete(pid))
    return done
