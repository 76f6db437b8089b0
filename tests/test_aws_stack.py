"""ops/aws/stack.yaml deployed on moto_server by ``python -m ops.aws deploy``, used, destroyed.

The module deploys once (through the CLI, signing with canary credentials), then:
what matters is asserted with boto3 on the deployed resources; where moto_server's
CloudFormation does not apply a property or a resource type, it is asserted on the
template the stack runs (``get_template``) and the test says so. Then ride events go
through the deployed streams with our local runner, and ``destroy`` must leave nothing.

moto_server's CloudFormation, in the version pinned by ``moto[server]``, does not apply:
S3 PublicAccessBlockConfiguration, VersioningConfiguration, BucketKeyEnabled; the types
AWS::S3::BucketPolicy and AWS::SQS::QueuePolicy; Kinesis StreamEncryption; Lambda
PackageType and DeadLetterConfig; RDS ManageMasterUserPassword, DeletionProtection and
VPCSecurityGroups; security group egress rules; the EC2 instance's SecurityGroupIds.
It runs no EC2 instance and no Lambda (so the tracking host's user data and the
Lambda's invocation are not exercised here: the local runner plays the Lambda).
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import secrets
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from ops.aws.template import parse
from serve.stream.produce import payloads, read_stream

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
ACCOUNT = "123456789012"  # moto's account
IMAGE = ACCOUNT + ".dkr.ecr.us-east-1.amazonaws.com/{}:1"
CLIENT_CIDR = "203.0.113.0/24"
SHARDS = 2
READ = {"kinesis:DescribeStream", "kinesis:DescribeStreamSummary", "kinesis:GetRecords",
        "kinesis:GetShardIterator", "kinesis:ListShards"}
PUT = {"kinesis:PutRecord", "kinesis:PutRecords"}
OPEN = {"0.0.0.0/0", "::/0"}


@dataclass
class Deployed:
    """The stack this module deployed and what the deploy printed."""

    name: str
    prefix: str
    env: dict          # the environment the CLI ran with (canary credentials)
    log: str           # stdout + stderr of the deploy
    canaries: tuple    # the secret key and session token the deploy signed with
    outputs: dict
    dotenv: dict       # KEY=VALUE lines the deploy printed
    resources: dict    # logical id -> physical id
    template: dict     # the template the stack runs (get_template)

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """``python -m ops.aws ARGS --stack-name NAME`` with this module's environment."""
        return subprocess.run([sys.executable, "-m", "ops.aws", *args, "--stack-name", self.name],
                              env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def props(self, logical: str) -> dict:
        """Properties of a resource in the deployed template."""
        return self.template["Resources"][logical]["Properties"]


def as_list(x) -> list:
    return x if isinstance(x, list) else [x]


def policy_doc(doc) -> dict:
    """moto hands inline policies back as a JSON string or a Python repr; AWS as a dict."""
    if isinstance(doc, dict):
        return doc
    try:
        return json.loads(doc)
    except json.JSONDecodeError:
        return ast.literal_eval(doc)


def allowed_pairs(doc: dict) -> set[tuple[str, str]]:
    """Every (action, resource) an Allow-only policy grants; NotAction/NotResource refused."""
    pairs = set()
    for st in doc["Statement"]:
        assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st, st
        pairs |= {(a, r) for a in as_list(st["Action"]) for r in as_list(st["Resource"])}
    return pairs


def grants(iam, role_arn: str) -> set[tuple[str, str]]:
    """What a deployed role may do: its inline policies (it must have no managed ones)."""
    role = role_arn.rsplit("/", 1)[1]
    assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
    out = set()
    for name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        out |= allowed_pairs(policy_doc(iam.get_role_policy(RoleName=role, PolicyName=name)[
            "PolicyDocument"]))
    return out


@pytest.fixture(scope="module")
def deployed(moto) -> Deployed:
    suffix = secrets.token_hex(4)
    name, prefix = f"duration-test-{suffix}", f"dt{suffix}"
    canaries = (secrets.token_urlsafe(30), secrets.token_urlsafe(40))
    env = {**os.environ, **moto.env, "AWS_SECRET_ACCESS_KEY": canaries[0],
           "AWS_SESSION_TOKEN": canaries[1]}
    cmd = [sys.executable, "-m", "ops.aws", "deploy", "--stack-name", name,
           "--allowed-cidr", CLIENT_CIDR, "--tracking-image", IMAGE.format("duration-tracking"),
           "--lambda-image", IMAGE.format("duration-stream"), "-p", f"Prefix={prefix}",
           "-p", f"InputStreamName={prefix}-rides", "-p", f"OutputStreamName={prefix}-predictions",
           "-p", f"ShardCount={SHARDS}"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cf = moto.client("cloudformation")
    stack = cf.describe_stacks(StackName=name)["Stacks"][0]
    resources = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in
                 cf.list_stack_resources(StackName=name)["StackResourceSummaries"]
                 if r["LogicalResourceId"]}
    # moto's CloudFormation ignores these two properties of the database (asserted on the
    # template below); set them as CloudFormation does on AWS, so that `status` meets a real
    # managed password and `destroy` a protected database.
    moto.client("rds").modify_db_instance(DBInstanceIdentifier=resources["Database"],
                                          ManageMasterUserPassword=True, DeletionProtection=True,
                                          ApplyImmediately=True)
    d = Deployed(
        name=name, prefix=prefix, env=env, log=proc.stdout + proc.stderr, canaries=canaries,
        outputs={o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]},
        dotenv=dict(line.split("=", 1) for line in proc.stdout.splitlines()
                    if line[:1].isupper() and "=" in line and " " not in line.split("=")[0]),
        resources=resources,
        template=parse(cf.get_template(StackName=name)["TemplateBody"]))
    yield d
    try:  # a failed test above must not leave the stack in moto
        alive = cf.describe_stacks(StackName=name)["Stacks"][0]["StackStatus"] != "DELETE_COMPLETE"
    except cf.exceptions.ClientError:
        alive = False
    if alive:
        d.cli("destroy", "--yes")


def test_deploy_prints_outputs_and_env_lines(deployed):
    o, env = deployed.outputs, deployed.dotenv
    assert "CREATE_COMPLETE" in deployed.log
    assert set(env) == {"MLFLOW_TRACKING_URI", "PREDICTIONS_STREAM_NAME",
                        "DEAD_LETTER_DESTINATION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                        "KINESIS_ENDPOINT_URL"}
    assert env["MLFLOW_TRACKING_URI"] == o["TrackingUri"]
    assert env["PREDICTIONS_STREAM_NAME"] == o["OutputStreamName"]
    assert o["OutputStreamName"] == f"{deployed.prefix}-predictions"
    assert env["DEAD_LETTER_DESTINATION"] == f"s3://{o['ArtifactBucket']}/dead-letter/"
    assert o["InputStreamName"] == f"{deployed.prefix}-rides"
    assert o["FunctionName"] == f"{deployed.prefix}-stream"


def test_artifact_bucket_private_encrypted_versioned_tls_only(deployed, moto):
    bucket = deployed.resources["ArtifactBucket"]
    rules = moto.client("s3").get_bucket_encryption(Bucket=bucket)[
        "ServerSideEncryptionConfiguration"]["Rules"]
    assert [r["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] for r in rules] == ["aws:kms"]
    # Not applied by moto's CloudFormation: asserted on the deployed template.
    props = deployed.props("ArtifactBucket")
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True}
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["BucketKeyEnabled"]
    assert props["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    policy = deployed.props("ArtifactBucketPolicy")
    assert policy["Bucket"] == {"Ref": "ArtifactBucket"}
    deny = [s for s in policy["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
    assert deny == [{
        "Sid": "TlsOnly", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [{"Fn::GetAtt": ["ArtifactBucket", "Arn"]},
                     {"Fn::Sub": "${ArtifactBucket.Arn}/*"}],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]
    allows = [s for s in policy["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    assert allows and all(s["Principal"] == {"Service": "delivery.logs.amazonaws.com"}
                          for s in allows)  # flow logs only: no public grant


def test_both_streams_with_their_shards(deployed, moto):
    kinesis = moto.client("kinesis")
    for key in ("InputStreamName", "OutputStreamName"):
        summary = kinesis.describe_stream_summary(StreamName=deployed.outputs[key])[
            "StreamDescriptionSummary"]
        assert summary["StreamStatus"] == "ACTIVE" and summary["OpenShardCount"] == SHARDS
    for logical in ("InputStream", "OutputStream"):  # encryption: on the template (see top)
        assert deployed.props(logical)["StreamEncryption"] == {"EncryptionType": "KMS",
                                                               "KeyId": "alias/aws/kinesis"}


def test_event_source_mapping_settings(deployed, moto):
    lam, kinesis = moto.client("lambda"), moto.client("kinesis")
    esm = lam.get_event_source_mapping(UUID=deployed.resources["FunctionTrigger"])
    in_arn = kinesis.describe_stream_summary(StreamName=deployed.outputs["InputStreamName"])[
        "StreamDescriptionSummary"]["StreamARN"]
    queue_arn = moto.client("sqs").get_queue_attributes(
        QueueUrl=deployed.outputs["FailureQueueUrl"], AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    assert esm["EventSourceArn"] == in_arn
    assert esm["FunctionArn"].endswith(f":function:{deployed.outputs['FunctionName']}")
    assert esm["BatchSize"] == 100 and esm["StartingPosition"] == "TRIM_HORIZON"
    assert esm["BisectBatchOnFunctionError"] is True
    assert esm["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert esm["MaximumRetryAttempts"] == 5
    assert esm["DestinationConfig"] == {"OnFailure": {"Destination": queue_arn}}


def test_lambda_from_the_image_in_the_private_subnets(deployed, moto):
    fn = moto.client("lambda").get_function(FunctionName=deployed.outputs["FunctionName"])[
        "Configuration"]
    r = deployed.resources
    assert sorted(fn["VpcConfig"]["SubnetIds"]) == sorted([r["PrivateSubnetA"],
                                                           r["PrivateSubnetB"]])
    assert fn["VpcConfig"]["SecurityGroupIds"] == [r["LambdaSecurityGroup"]]
    assert fn["Environment"]["Variables"] == {
        "MLFLOW_TRACKING_URI": deployed.outputs["TrackingUriInVpc"],
        "MODEL_URI": "models:/duration@production",
        "PREDICTIONS_STREAM_NAME": deployed.outputs["OutputStreamName"],
        "DEAD_LETTER_DESTINATION": deployed.outputs["DeadLetterDestination"]}
    props = deployed.props("Function")  # PackageType and DeadLetterConfig: template (see top)
    assert props["PackageType"] == "Image"
    assert props["Code"] == {"ImageUri": {"Ref": "LambdaImageUri"}}
    assert props["DeadLetterConfig"] == {"TargetArn": {"Fn::GetAtt": ["FailureQueue", "Arn"]}}


def test_lambda_role_reads_the_input_and_puts_the_output_and_nothing_wider(deployed, moto):
    fn = moto.client("lambda").get_function(FunctionName=deployed.outputs["FunctionName"])[
        "Configuration"]
    kinesis = moto.client("kinesis")
    in_arn, out_arn = (kinesis.describe_stream_summary(StreamName=deployed.outputs[k])[
        "StreamDescriptionSummary"]["StreamARN"] for k in ("InputStreamName", "OutputStreamName"))
    pairs = grants(moto.client("iam"), fn["Role"])
    assert not [a for a, _ in pairs if "*" in a], "no wildcard action"
    assert {p for p in pairs if p[0].startswith("kinesis:")} == (
        {(a, in_arn) for a in READ} | {(a, out_arn) for a in PUT})
    assert {a for a, r in pairs if r == "*"} == {"ec2:DescribeNetworkInterfaces",
                                                 "ec2:DescribeSubnets"}  # AWS allows no less
    bucket_arn = f"arn:aws:s3:::{deployed.resources['ArtifactBucket']}"
    assert {p for p in pairs if p[0].startswith("s3:")} == {
        ("s3:PutObject", f"{bucket_arn}/dead-letter/*")}
    assert {a.split(":")[0] for a, _ in pairs} == {"kinesis", "s3", "sqs", "logs", "ec2"}
    assert all(r.endswith(":log-group:/aws/lambda/" + deployed.outputs["FunctionName"])
               or r.endswith(":*") for a, r in pairs if a.startswith("logs:"))
    tracking = grants(moto.client("iam"), _tracking_role_arn(deployed, moto))
    assert {p for p in tracking if p[0].startswith("s3:")} == {
        (a, bucket_arn) for a in ("s3:ListBucket", "s3:GetBucketLocation",
                                  "s3:ListBucketMultipartUploads")} | {
        (a, f"{bucket_arn}/mlartifacts/*") for a in (
            "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
            "s3:ListMultipartUploadParts")}
    assert {a for a, r in tracking if r == "*"} == {"ecr:GetAuthorizationToken"}
    assert not [a for a, _ in tracking if "*" in a]


def _tracking_role_arn(deployed, moto) -> str:
    profile = moto.client("iam").get_instance_profile(
        InstanceProfileName=deployed.resources["TrackingInstanceProfile"])["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [deployed.resources["TrackingRole"]]
    return profile["Roles"][0]["Arn"]


def test_database_private_and_encrypted(deployed, moto):
    db = moto.client("rds").describe_db_instances(
        DBInstanceIdentifier=deployed.resources["Database"])["DBInstances"][0]
    assert db["PubliclyAccessible"] is False and db["StorageEncrypted"] is True
    assert db["Engine"] == "postgres" and db["DBName"] == "mlflow"
    assert sorted(s["SubnetIdentifier"] for s in db["DBSubnetGroup"]["Subnets"]) == sorted(
        [deployed.resources["PrivateSubnetA"], deployed.resources["PrivateSubnetB"]])
    props = deployed.props("Database")  # not applied by moto (see top): template
    assert props["ManageMasterUserPassword"] is True and "MasterUserPassword" not in props
    assert props["VPCSecurityGroups"] == [{"Ref": "DatabaseSecurityGroup"}]
    assert props["DeletionProtection"] == {"Ref": "DbDeletionProtection"}
    assert deployed.template["Parameters"]["DbDeletionProtection"]["Default"] == "true"


def test_no_security_group_open_to_the_internet_on_5000_or_5432(deployed, moto):
    r = deployed.resources
    groups = {lg: r[lg] for lg in r if lg.endswith("SecurityGroup")}
    assert len(groups) == 4
    described = {g["GroupId"]: g for g in moto.client("ec2").describe_security_groups(
        GroupIds=list(groups.values()))["SecurityGroups"]}
    for gid, g in described.items():
        for perm in g["IpPermissions"]:
            cidrs = {x["CidrIp"] for x in perm.get("IpRanges", [])} | {
                x["CidrIpv6"] for x in perm.get("Ipv6Ranges", [])}
            all_ports = perm["IpProtocol"] == "-1"
            for port in (5000, 5432):
                covers = all_ports or perm["FromPort"] <= port <= perm["ToPort"]
                assert not (covers and cidrs & OPEN), (gid, perm)

    def ingress(logical: str) -> tuple[set, set, set]:
        """(port ranges, source networks, source groups) of a group's inbound rules."""
        perms = described[groups[logical]]["IpPermissions"]
        return ({(p.get("FromPort"), p.get("ToPort")) for p in perms},
                {x["CidrIp"] for p in perms for x in p.get("IpRanges", [])},
                {u["GroupId"] for p in perms for u in p.get("UserIdGroupPairs", [])})

    assert ingress("TrackingSecurityGroup") == ({(5000, 5000)}, {CLIENT_CIDR},
                                                {r["LambdaSecurityGroup"]})
    assert ingress("DatabaseSecurityGroup") == ({(5432, 5432)}, set(),
                                                {r["TrackingSecurityGroup"]})
    assert ingress("EndpointSecurityGroup") == ({(443, 443)}, set(), {r["LambdaSecurityGroup"]})
    assert ingress("LambdaSecurityGroup") == (set(), set(), set())
    # Egress rules are not applied by moto (see top): on the template, nothing leaves the
    # database or the endpoint, and the tracking host only reaches HTTPS and PostgreSQL.
    for logical in ("DatabaseSecurityGroup", "EndpointSecurityGroup"):
        assert [(e["IpProtocol"], e["CidrIp"]) for e in
                deployed.props(logical)["SecurityGroupEgress"]] == [("-1", "127.0.0.1/32")]
    assert sorted(e["FromPort"] for e in
                  deployed.props("TrackingSecurityGroup")["SecurityGroupEgress"]) == [443, 5432]


def test_tracking_host_imdsv2_supervised_and_health_checked(deployed, moto):
    lt = moto.client("ec2").describe_launch_template_versions(
        LaunchTemplateId=deployed.resources["TrackingLaunchTemplate"])["LaunchTemplateVersions"][0]
    assert lt["LaunchTemplateData"]["MetadataOptions"]["HttpTokens"] == "required"
    inst = moto.client("ec2").describe_instances(InstanceIds=[deployed.resources["TrackingHost"]])[
        "Reservations"][0]["Instances"][0]
    assert inst["SubnetId"] == deployed.resources["PublicSubnet"]
    assert inst["IamInstanceProfile"]["Arn"].endswith(deployed.resources["TrackingInstanceProfile"])
    assert deployed.outputs["TrackingUri"] == f"http://{deployed.resources['TrackingAddress']}:5000"
    # The user data as deployed (substituted) on the launch template.
    script = base64.b64decode(lt["LaunchTemplateData"]["UserData"]).decode()
    bucket, db = deployed.resources["ArtifactBucket"], deployed.outputs["DatabaseEndpoint"]
    for line in ("Restart=always", "OnUnitActiveSec=1min", "127.0.0.1:5000/health",
                 "systemctl restart mlflow", f"MLFLOW_ARTIFACTS_DESTINATION=s3://{bucket}/mlartifacts",
                 f"--db-instance-identifier {deployed.resources['Database']}",
                 "MasterUserSecret.SecretArn", f"@{db}:5432/mlflow?sslmode=require",
                 f"--env-file /run/duration/mlflow.env {IMAGE.format('duration-tracking')}"):
        assert line in script, line
    assert "${" not in script  # every template variable was substituted


@pytest.fixture(scope="module")
def untriggered(moto):
    """A second stack, deployed and destroyed in-process, without the Lambda's trigger:
    moto_server calls a stream's Lambda on every put, and cannot run an image function."""
    from ops.aws.deploy import Aws, deploy
    from ops.aws.destroy import destroy

    prefix, lines = f"rt{secrets.token_hex(4)}", []
    name = f"duration-test-{prefix}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in moto.env.items():
            mp.setenv(k, v)
        aws = Aws("us-east-1", moto.endpoint)
        stack = deploy(aws, name, {
            "AllowedCidr": CLIENT_CIDR, "TrackingImageUri": IMAGE.format("duration-tracking"),
            "LambdaImageUri": IMAGE.format("duration-stream"), "Prefix": prefix,
            "InputStreamName": f"{prefix}-rides", "OutputStreamName": f"{prefix}-predictions",
            "ShardCount": str(SHARDS), "StreamTrigger": "false"}, lines.append)
        yield aws, name, stack
        assert destroy(aws, name, lines.append, confirm=lambda question: True), lines


def test_rides_round_trip_through_the_deployed_streams(untriggered, moto, months,
                                                      registered_model, tracking_server,
                                                      tmp_path):
    """The deploy's .env lines drive our producer and local runner (the Lambda's handler)."""
    from ops.aws.events import env_lines, outputs_dict

    aws, name, stack = untriggered
    outputs = outputs_dict(stack)
    assert "FunctionTrigger" not in {r["LogicalResourceId"] for r in moto.client(
        "cloudformation").list_stack_resources(StackName=name)["StackResourceSummaries"]}
    dotenv = dict(line.split("=", 1) for line in
                  env_lines(name, outputs, "us-east-1", moto.endpoint) if "=" in line
                  and not line.startswith("#"))
    env = {**os.environ, **moto.env, **dotenv,
           # The stack's tracking host is an EC2 instance moto does not run: the model comes
           # from the test session's tracking server instead.
           "MLFLOW_TRACKING_URI": tracking_server.uri}
    rides, stream = 300, outputs["InputStreamName"]

    def run(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    run("serve.stream.produce", "--rides", str(months.test), "--stream", stream,
        "--rate", "0", "--limit", str(rides), "--poison-every", "50")
    run("serve.stream", "--input-stream", stream, "--output-stream",
        env["PREDICTIONS_STREAM_NAME"], "--consumer", "aws-stack-test",
        "--checkpoint-dir", str(tmp_path / "checkpoints"), "--idle-exit", "2")

    poison = {i for i in range(rides) if i % 50 == 49}
    events = payloads(read_stream(moto.client("kinesis"), env["PREDICTIONS_STREAM_NAME"]))
    ids = Counter(e["prediction"]["ride_id"] for e in events)
    assert set(ids) == set(range(rides)) - poison and max(ids.values()) == 1
    assert {e["version"] for e in events} == {registered_model["version"]}
    assert all(e["prediction"]["ride_duration"] > 0 for e in events)
    # Poison went to DEAD_LETTER_DESTINATION: the stack's dead-letter prefix in its bucket.
    s3, bucket = moto.client("s3"), outputs["ArtifactBucket"]
    assert env["DEAD_LETTER_DESTINATION"] == f"s3://{bucket}/dead-letter/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="dead-letter/")["Contents"]]
    letters = [json.loads(line) for k in keys for line in
               s3.get_object(Bucket=bucket, Key=k)["Body"].read().splitlines()]
    assert sorted(int(d["partitionKey"]) for d in letters) == sorted(poison)


def test_no_secret_in_template_outputs_env_lines_or_deploy_log(deployed, moto):
    text = (ROOT / "ops/aws/stack.yaml").read_text()
    params = deployed.template["Parameters"]
    assert not [k for k, p in params.items() if p.get("NoEcho") or any(
        w in k.lower() for w in ("password", "secret", "token", "key"))]
    for pattern in (r"AKIA[0-9A-Z]{16}", r"ASIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY",
                    r"(?i)aws_secret_access_key\s*[=:]", r"(?m)^\s*MasterUserPassword\s*:"):
        assert not re.search(pattern, text), pattern
    # The credentials the deploy signed with appear nowhere it wrote.
    said = deployed.log + json.dumps(deployed.outputs) + json.dumps(deployed.dotenv)
    for canary in deployed.canaries:
        assert canary not in said
    # The database password RDS generated (moto's stand-in) is never shown by `status` either.
    secret_arn = moto.client("rds").describe_db_instances(
        DBInstanceIdentifier=deployed.resources["Database"])["DBInstances"][0][
        "MasterUserSecret"]["SecretArn"]
    password = json.loads(moto.client("secretsmanager").get_secret_value(SecretId=secret_arn)[
        "SecretString"])["password"]
    status = deployed.cli("status")
    assert status.returncode == 0, status.stderr
    assert deployed.outputs["TrackingUri"] in status.stdout
    for value in (password, *deployed.canaries):
        assert value not in status.stdout + status.stderr + said


def test_deploy_again_changes_nothing(deployed):
    again = deployed.cli("deploy")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "up to date: nothing to change" in again.stdout
    assert f"MLFLOW_TRACKING_URI={deployed.outputs['TrackingUri']}" in again.stdout


def test_cli_errors_are_one_line_and_destroy_asks(deployed, moto):
    from click.testing import CliRunner

    from ops.aws.__main__ import cli

    def run(*args: str):
        return CliRunner().invoke(cli, list(args), env=moto.env)

    other = f"duration-test-{secrets.token_hex(4)}"
    result = run("deploy", "--stack-name", other)
    assert result.exit_code == 1 and "missing parameter(s) AllowedCidr" in result.output
    result = run("deploy", "--stack-name", other, "--allowed-cidr", CLIENT_CIDR,
                 "--tracking-image", IMAGE.format("t"), "--lambda-image", IMAGE.format("l"),
                 "-p", "TrackingAmi=/no/such/parameter")  # refused: nothing gets created
    assert result.exit_code == 1 and f"Error: {other}: create refused" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert run("status", "--stack-name", other).exit_code == 1
    result = run("destroy", "--stack-name", other)
    assert result.exit_code == 0 and "nothing to destroy" in result.output
    # Not a terminal and no --yes: nothing is deleted.
    result = run("destroy", "--stack-name", deployed.name)
    assert result.exit_code == 2 and "pass --yes" in result.output
    cf = moto.client("cloudformation")
    assert cf.describe_stacks(StackName=deployed.name)["Stacks"][0]["StackStatus"] == \
        "CREATE_COMPLETE"


def test_destroy_leaves_nothing(deployed, moto):
    cf = moto.client("cloudformation")
    before = cf.list_stack_resources(StackName=deployed.name)["StackResourceSummaries"]
    secret_arn = moto.client("rds").describe_db_instances(
        DBInstanceIdentifier=deployed.resources["Database"])["DBInstances"][0][
        "MasterUserSecret"]["SecretArn"]
    done = deployed.cli("destroy", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deletion protection turned off" in done.stdout  # set as AWS would, in the fixture
    assert f"none of its {len(before) + 1} resources is left" in done.stdout
    # Checked here again, service by service, without ops/aws's own leftovers code.
    r, o = deployed.resources, deployed.outputs
    with pytest.raises(cf.exceptions.ClientError):
        cf.describe_stacks(StackName=deployed.name)
    ec2, lam, iam = moto.client("ec2"), moto.client("lambda"), moto.client("iam")
    buckets = moto.client("s3").list_buckets()["Buckets"]
    assert r["ArtifactBucket"] not in {b["Name"] for b in buckets}
    assert not {o["InputStreamName"], o["OutputStreamName"]} & set(
        moto.client("kinesis").list_streams()["StreamNames"])
    assert o["FunctionName"] not in {f["FunctionName"] for f in lam.list_functions()["Functions"]}
    assert r["FunctionTrigger"] not in {m["UUID"] for m in lam.list_event_source_mappings()[
        "EventSourceMappings"]}
    roles = {x["RoleName"] for x in iam.list_roles()["Roles"]}
    assert not {r["FunctionRole"], r["TrackingRole"]} & roles
    assert r["TrackingInstanceProfile"] not in {
        p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]}
    rds = moto.client("rds")
    assert r["Database"] not in {d["DBInstanceIdentifier"] for d in
                                 rds.describe_db_instances()["DBInstances"]}
    assert f"{deployed.prefix}-tracking" not in {
        g["DBSubnetGroupName"] for g in rds.describe_db_subnet_groups()["DBSubnetGroups"]}
    assert not rds.describe_db_snapshots(DBInstanceIdentifier=r["Database"])["DBSnapshots"]
    assert secret_arn not in {s["ARN"] for s in
                              moto.client("secretsmanager").list_secrets()["SecretList"]}
    assert o["FailureQueueUrl"] not in (moto.client("sqs").list_queues().get("QueueUrls") or [])
    logs = {g["logGroupName"] for g in moto.client("logs").describe_log_groups()["logGroups"]}
    assert not {r["FunctionLogs"], r["DatabaseLogs"]} & logs
    assert r["Vpc"] not in {v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"]}
    vpc = [{"Name": "vpc-id", "Values": [r["Vpc"]]}]
    for call, key in ((ec2.describe_subnets, "Subnets"), (ec2.describe_route_tables, "RouteTables"),
                      (ec2.describe_security_groups, "SecurityGroups")):
        assert call(Filters=vpc)[key] == [], key
    # Deleted endpoints stay listed a while, in state "deleted" (on AWS too).
    assert {e["State"].lower() for e in ec2.describe_vpc_endpoints(Filters=vpc)["VpcEndpoints"]} \
        <= {"deleted"}
    addresses = ec2.describe_addresses()["Addresses"]
    assert r["TrackingAddress"] not in {a["PublicIp"] for a in addresses}
    assert r["InternetGateway"] not in {
        g["InternetGatewayId"] for g in ec2.describe_internet_gateways()["InternetGateways"]}
    assert r["FlowLog"] not in {f["FlowLogId"] for f in ec2.describe_flow_logs()["FlowLogs"]}
    assert r["TrackingLaunchTemplate"] not in {
        t["LaunchTemplateId"] for t in ec2.describe_launch_templates()["LaunchTemplates"]}
    state = ec2.describe_instances(InstanceIds=[r["TrackingHost"]])["Reservations"][0][
        "Instances"][0]["State"]["Name"]
    assert state == "terminated"
