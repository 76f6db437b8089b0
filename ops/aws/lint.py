"""``python -m ops.aws.lint [TEMPLATE]``: cfn-lint and checkov on the stack template, offline.

Both tools live in their own venv (``make iac`` creates ``.venv-iac``; checkov pins
versions of boto3 and packaging that mlflow's venv cannot take). ``make lint`` and the
tests call this module, so the checks CI runs are the ones a developer runs.

Clean means: cfn-lint reports no error, warning or informational match, and checkov
(CloudFormation checks, its secrets scan and this project's ``policies/``) has no failed
check; a suppression must sit in the template with its reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ops.aws import TEMPLATE

ROOT = Path(__file__).resolve().parents[2]
POLICIES = Path(__file__).with_name("policies")


def tools_bin() -> Path:
    """The ``bin`` folder of the tool venv (``DURATION_IAC_VENV``, default ``.venv-iac``)."""
    venv = Path(os.environ.get("DURATION_IAC_VENV") or ROOT / ".venv-iac")
    if not (venv / "bin" / "checkov").exists():
        raise FileNotFoundError(f"cfn-lint/checkov not found in {venv}: run `make iac`")
    return venv / "bin"


@dataclass
class Report:
    """One tool's verdict: its summary line and the ids of what failed."""

    tool: str
    ok: bool
    summary: str
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # suppressed in the template


def cfn_lint(template: Path) -> Report:
    """cfn-lint with its default rules; any match (error, warning, informational) fails."""
    proc = subprocess.run([str(tools_bin() / "cfn-lint"), "--format", "json", str(template)],
                          capture_output=True, text=True, check=False)
    try:
        matches = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError as e:
        raise RuntimeError(f"cfn-lint failed: {proc.stderr.strip() or proc.stdout}") from e
    levels = Counter(m["Level"] for m in matches)
    failed = [f"{m['Rule']['Id']} line {m['Location']['Start']['LineNumber']}: {m['Message']}"
              for m in matches]
    # cfn-lint prints nothing when clean; this line is ours.
    summary = (f"cfn-lint: {levels['Error']} errors, {levels['Warning']} warnings, "
               f"{levels['Informational']} informational ({template.name})")
    return Report("cfn-lint", not matches, summary, failed)


def checkov(template: Path) -> Report:
    """checkov's CloudFormation and secrets checks plus ``policies/``, without network."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(tools_bin() / "checkov"), "-f", str(template),
               "--framework", "cloudformation", "secrets",
               "--external-checks-dir", str(POLICIES), "--skip-download",
               "-o", "cli", "-o", "json", "--output-file-path", out, "--compact"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        json_path, cli_path = Path(out) / "results_json.json", Path(out) / "results_cli.txt"
        if not json_path.exists():
            raise RuntimeError(f"checkov failed ({proc.returncode}): {proc.stderr[-2000:]}")
        reports = json.loads(json_path.read_text())
        cli_text = cli_path.read_text() if cli_path.exists() else ""
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{c['check_id']} {c['resource']}" for r in reports
              for c in (r.get("results") or {}).get("failed_checks", [])]
    skipped = [f"{c['check_id']} {c['resource']}" for r in reports
               for c in (r.get("results") or {}).get("skipped_checks", [])]
    summary = " | ".join(line.strip() for line in cli_text.splitlines()
                         if line.startswith("Passed checks:")) or "checkov: nothing scanned"
    return Report("checkov", proc.returncode == 0 and not failed, summary, failed, skipped)


def check(template: Path = TEMPLATE) -> list[Report]:
    """Both tools on ``template``."""
    return [cfn_lint(template), checkov(template)]


def main(argv: list[str]) -> int:
    """Print each tool's summary and failures; exit 1 unless both are clean."""
    template = Path(argv[0]) if argv else TEMPLATE
    reports = check(template)
    for r in reports:
        print(f"{r.summary}")
        for line in r.failed:
            print(f"  {r.tool}: {line}")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
