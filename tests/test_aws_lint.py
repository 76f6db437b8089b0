"""The AWS checks of ``make lint`` (cfn-lint, checkov + ops/aws/policies), run by CI too.

Clean on ops/aws/stack.yaml, every suppression in use and explained; a weakened copy
(public bucket, 0.0.0.0/0 on 5000, ``Action: "*"``, a key in the Lambda's environment)
fails them, each weakness by its own check.
"""

from __future__ import annotations

import json
import secrets
import string

import pytest

from ops.aws import TEMPLATE, lint
from ops.aws.template import load


@pytest.fixture(scope="module")
def clean():
    return {r.tool: r for r in lint.check(TEMPLATE)}


def test_template_is_clean(clean):
    assert clean["cfn-lint"].ok, clean["cfn-lint"].failed
    assert clean["cfn-lint"].summary.startswith("cfn-lint: 0 errors, 0 warnings, 0 informational")
    assert clean["checkov"].ok, clean["checkov"].failed
    assert "Failed checks: 0" in clean["checkov"].summary
    assert "Passed checks: 0" not in clean["checkov"].summary


def test_every_suppression_is_used_and_has_a_reason(clean):
    template = load(TEMPLATE)
    skips = {(s["id"], f"{r['Type']}.{logical}") for logical, r in template["Resources"].items()
             for s in (r.get("Metadata") or {}).get("checkov", {}).get("skip", [])
             if len(s.get("comment", "").split()) >= 5}
    declared = sum(len((r.get("Metadata") or {}).get("checkov", {}).get("skip", []))
                   for r in template["Resources"].values())
    assert len(skips) == declared, "a checkov skip without a reason"
    assert {tuple(s.split(" ", 1)) for s in clean["checkov"].skipped} == skips
    assert "cfn-lint" not in TEMPLATE.read_text().split("Metadata:", 1)[-1]  # none suppressed


def test_weakened_template_fails_the_checks(tmp_path):
    t = load(TEMPLATE)
    r = t["Resources"]
    bucket = r["ArtifactBucket"]["Properties"]
    bucket["PublicAccessBlockConfiguration"] = dict.fromkeys(
        bucket["PublicAccessBlockConfiguration"], False)
    bucket["AccessControl"] = "PublicRead"
    r["TrackingSecurityGroup"]["Properties"]["SecurityGroupIngress"][0]["CidrIp"] = "0.0.0.0/0"
    r["DatabaseSecurityGroup"]["Properties"]["SecurityGroupIngress"] = [
        {"Description": "everyone", "IpProtocol": "-1", "CidrIpv6": "::/0"}]
    r["FunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"][0][
        "Action"] = "*"
    key_id = "AKIA" + "".join(secrets.choice(string.ascii_uppercase + "234567") for _ in range(16))
    r["Function"]["Properties"]["Environment"]["Variables"]["UPLOAD_KEY_ID"] = key_id
    weak = tmp_path / "weak.json"
    weak.write_text(json.dumps(t, indent=1))

    report = lint.checkov(weak)
    assert not report.ok and "Failed checks: 0" not in report.summary
    # "CKV_AWS_53 AWS::S3::Bucket.ArtifactBucket" -> ("CKV_AWS_53", "ArtifactBucket")
    failed = {(f.split(" ", 1)[0], f.rsplit(".", 1)[-1]) for f in report.failed}
    for check, logical in (
            [(c, "ArtifactBucket") for c in ("CKV_AWS_53", "CKV_AWS_54", "CKV_AWS_55",
                                             "CKV_AWS_56", "CKV_AWS_20")]  # public bucket
            + [("CKV_DURATION_1", "TrackingSecurityGroup"),  # 0.0.0.0/0 on 5000 (ours)
               ("CKV_DURATION_1", "DatabaseSecurityGroup"),  # ::/0, all traffic (ours)
               ("CKV_DURATION_2", "DatabaseSecurityGroup"),
               ("CKV_AWS_63", "FunctionRole"),               # Action: "*"
               ("CKV_AWS_45", "Function")]):                 # a key in the environment
        assert (check, logical) in failed, (check, logical, report.failed)
    assert "CKV_SECRET_2" in {c for c, _ in failed}          # ... and the secrets scan
    assert not {c for c, _ in failed if c.startswith("CKV_DURATION")} - {
        "CKV_DURATION_1", "CKV_DURATION_2"}
    assert ("CKV_DURATION_2", "TrackingSecurityGroup") not in failed  # 5000 is not 5432
