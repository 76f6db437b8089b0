"""checkov policies of this project, loaded with ``--external-checks-dir ops/aws/policies``.

checkov's own security-group checks look at ports 22, 80 and 3389 only: these two fail
a template whose security groups admit the whole internet (0.0.0.0/0 or ::/0) to the
tracking server's port (5000) or PostgreSQL's (5432), by port range or all-traffic rule.
This file runs inside checkov's own venv (``make iac``), not the project's.
"""

from checkov.cloudformation.checks.resource.base_resource_check import BaseResourceCheck
from checkov.common.models.enums import CheckCategories, CheckResult

OPEN = {"0.0.0.0/0", "::/0"}


def _rules(conf: dict) -> list:
    props = conf.get("Properties") or {}
    if conf.get("Type") == "AWS::EC2::SecurityGroupIngress":
        return [props]
    rules = props.get("SecurityGroupIngress") or []
    return rules if isinstance(rules, list) else []


def _covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    try:
        return int(rule["FromPort"]) <= port <= int(rule["ToPort"])
    except (KeyError, TypeError, ValueError):
        return False


class PortNotOpenToTheInternet(BaseResourceCheck):
    """FAILED when any ingress rule admits 0.0.0.0/0 or ::/0 to ``port``."""

    def __init__(self, check_id: str, port: int, what: str) -> None:
        super().__init__(
            name=f"Ensure no security group admits the internet to port {port} ({what})",
            id=check_id, categories=[CheckCategories.NETWORKING],
            supported_resources=["AWS::EC2::SecurityGroup", "AWS::EC2::SecurityGroupIngress"])
        self.port = port

    def scan_resource_conf(self, conf: dict) -> CheckResult:
        for rule in _rules(conf):
            if not isinstance(rule, dict):
                continue
            # A Ref (a dict here) is not a literal network; the template's Rules and
            # `ops.aws deploy` refuse 0.0.0.0/0 for AllowedCidr.
            sources = {v for v in (rule.get("CidrIp"), rule.get("CidrIpv6")) if isinstance(v, str)}
            if sources & OPEN and _covers(rule, self.port):
                return CheckResult.FAILED
        return CheckResult.PASSED


tracking_port = PortNotOpenToTheInternet("CKV_DURATION_1", 5000, "MLflow tracking server")
postgres_port = PortNotOpenToTheInternet("CKV_DURATION_2", 5432, "PostgreSQL")
