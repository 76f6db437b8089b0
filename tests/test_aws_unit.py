"""Pure parts of ``python -m ops.aws``: event and failure lines, .env lines, parameters, options."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from ops.aws import TEMPLATE
from ops.aws.__main__ import cli
from ops.aws.events import env_lines, event_line, failure_lines, is_terminal
from ops.aws.template import ParameterError, load, parameter_list


def ev(second: int, logical: str, status: str, reason: str | None = None,
       typ: str = "AWS::RDS::DBInstance") -> dict:
    """A stack event shaped as describe_stack_events returns it."""
    e = {"EventId": f"{logical}-{second}", "LogicalResourceId": logical, "ResourceType": typ,
         "ResourceStatus": status,
         "Timestamp": datetime(2026, 1, 2, 3, 4, second, tzinfo=timezone.utc)}
    if reason is not None:
        e["ResourceStatusReason"] = reason
    return e


def test_failure_lines_name_each_cause_once_in_order_and_count_the_cancelled():
    events = [
        ev(9, "duration", "ROLLBACK_IN_PROGRESS", "The following resource(s) failed to create: "
           "[Database, Function].", "AWS::CloudFormation::Stack"),
        ev(8, "Function", "CREATE_FAILED", "Resource handler returned message: \"Source image\n"
           "   123.dkr.ecr/x:1 does not exist\"", "AWS::Lambda::Function"),
        ev(7, "Database", "CREATE_FAILED", "Cannot find version 17.6 for postgres"),
        ev(7, "Database", "CREATE_FAILED", "Cannot find version 17.6 for postgres"),
        ev(8, "InputStream", "CREATE_FAILED", "Resource creation cancelled",
           "AWS::Kinesis::Stream"),
        ev(5, "Vpc", "CREATE_COMPLETE", typ="AWS::EC2::VPC"),
        ev(9, "Vpc", "DELETE_FAILED", None, "AWS::EC2::VPC"),
    ]
    assert failure_lines(events) == [
        "FAILED Database (AWS::RDS::DBInstance): Cannot find version 17.6 for postgres",
        "FAILED Function (AWS::Lambda::Function): Resource handler returned message: "
        "\"Source image 123.dkr.ecr/x:1 does not exist\"",
        "FAILED Vpc (AWS::EC2::VPC): no reason given",
        "(1 other resources cancelled because of the failures above)",
    ]
    assert failure_lines([ev(1, "Vpc", "CREATE_COMPLETE")]) == []


def test_event_line():
    assert event_line(ev(4, "Database", "CREATE_IN_PROGRESS", "Resource creation Initiated")) == (
        "03:04:04 CREATE_IN_PROGRESS   Database (AWS::RDS::DBInstance): "
        "Resource creation Initiated")
    assert event_line(ev(4, "Vpc", "CREATE_COMPLETE", typ="AWS::EC2::VPC")) == (
        "03:04:04 CREATE_COMPLETE      Vpc (AWS::EC2::VPC)")


@pytest.mark.parametrize("status,done", [("CREATE_IN_PROGRESS", False), ("CREATE_COMPLETE", True),
                                         ("UPDATE_COMPLETE_CLEANUP_IN_PROGRESS", False),
                                         ("ROLLBACK_COMPLETE", True), ("DELETE_FAILED", True)])
def test_is_terminal(status, done):
    assert is_terminal(status) is done


OUTPUTS = {"TrackingUri": "http://198.51.100.7:5000", "OutputStreamName": "ride_predictions",
           "InputStreamName": "ride_events", "ArtifactBucket": "b",
           "DeadLetterDestination": "s3://b/dead-letter/", "DatabaseEndpoint": "db.example"}


def test_env_lines_for_aws_and_for_an_endpoint():
    base = ["# .env for clients of stack duration (the database password stays in Secrets "
            "Manager)",
            "MLFLOW_TRACKING_URI=http://198.51.100.7:5000",
            "PREDICTIONS_STREAM_NAME=ride_predictions",
            "DEAD_LETTER_DESTINATION=s3://b/dead-letter/",
            "AWS_DEFAULT_REGION=eu-west-1"]
    tail = ["# ride events go to ride_events: python -m serve.stream.produce --stream "
            "ride_events --rides ..."]
    assert env_lines("duration", OUTPUTS, "eu-west-1") == base + tail
    assert env_lines("duration", OUTPUTS, "eu-west-1", "http://127.0.0.1:5002") == base + [
        "AWS_ENDPOINT_URL=http://127.0.0.1:5002",
        "KINESIS_ENDPOINT_URL=http://127.0.0.1:5002"] + tail


def test_parameters_of_a_create_and_an_update():
    template = load(TEMPLATE)
    required = {"AllowedCidr": "10.0.0.0/8", "TrackingImageUri": "t", "LambdaImageUri": "l"}
    assert parameter_list(template, required) == [
        {"ParameterKey": k, "ParameterValue": v} for k, v in required.items()]
    with pytest.raises(ParameterError, match=r"missing parameter\(s\) LambdaImageUri \(ECR "
                                             r"image of serve/lambda.Dockerfile.*TrackingImageUri"):
        parameter_list(template, {"AllowedCidr": "10.0.0.0/8"})
    with pytest.raises(ParameterError, match="unknown parameter.*ShardCont"):
        parameter_list(template, {**required, "ShardCont": "2"})
    update = parameter_list(template, {"ShardCount": "2"}, previous={"AllowedCidr", "ShardCount",
                                                                    "Retired"})
    assert update == [{"ParameterKey": "ShardCount", "ParameterValue": "2"},
                      {"ParameterKey": "AllowedCidr", "UsePreviousValue": True}]


def test_template_loader_reads_short_tags():
    t = load(TEMPLATE)
    assert t["Resources"]["Function"]["Properties"]["Role"] == {
        "Fn::GetAtt": ["FunctionRole", "Arn"]}
    assert t["Resources"]["FunctionTrigger"]["Condition"] == "WithTrigger"
    assert t["Conditions"]["WithTrigger"] == {"Fn::Equals": [{"Ref": "StreamTrigger"}, "true"]}


@pytest.mark.parametrize("args,message", [
    (["--allowed-cidr", "0.0.0.0/0"], "allow a network, not the internet"),
    (["-p", "ShardCount"], "'ShardCount' is not KEY=VALUE"),
])
def test_deploy_refuses_bad_options_before_calling_aws(args, message):
    result = CliRunner().invoke(cli, ["deploy", *args],
                                env={"AWS_ENDPOINT_URL": "http://x.invalid"})
    assert result.exit_code == 2 and message in result.output
