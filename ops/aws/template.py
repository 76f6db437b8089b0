"""Reading ``stack.yaml``: its parameters, and the parameter list a create or an update sends."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that reads CloudFormation's short tags (``!Ref x``) as ``{"Ref": x}``."""


def _tag(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node):
    key = "Ref" if tag_suffix == "Ref" else f"Fn::{tag_suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if tag_suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {key: value}


_CfnLoader.add_multi_constructor("!", _tag)


def load(path: str | Path) -> dict:
    """The template as a dict (short tags expanded to their long form)."""
    return yaml.load(Path(path).read_text(), Loader=_CfnLoader)  # noqa: S506 - safe loader


class ParameterError(ValueError):
    """Unknown or missing stack parameters."""


def parameter_list(template: Mapping, given: Mapping[str, str],
                   previous: Mapping[str, str] | None = None) -> list[dict]:
    """CloudFormation's ``Parameters`` for a create (``previous`` None) or an update.

    A create needs every parameter without a default. An update keeps the running stack's
    value of every parameter not given (sent as that value: moto_server cannot
    ``UsePreviousValue`` a parameter that was left at its default), except SSM-typed ones,
    which CloudFormation resolves again on every update anyway, and ``NoEcho`` ones, whose
    value it does not show.
    """
    declared = template.get("Parameters") or {}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ParameterError(f"unknown parameter(s) {', '.join(unknown)}; the template has "
                             f"{', '.join(sorted(declared))}")
    out = [{"ParameterKey": k, "ParameterValue": str(v)} for k, v in given.items()]
    if previous is None:
        missing = sorted(k for k, p in declared.items() if "Default" not in p and k not in given)
        if missing:
            raise ParameterError("missing parameter(s) " + ", ".join(
                f"{k} ({one_line_description(declared[k])})" for k in missing))
        return out
    for k in sorted(set(previous) & set(declared) - set(given)):
        p = declared[k]
        if str(p.get("Type", "")).startswith("AWS::SSM::Parameter::"):
            continue
        if p.get("NoEcho"):
            out.append({"ParameterKey": k, "UsePreviousValue": True})
        else:
            out.append({"ParameterKey": k, "ParameterValue": str(previous[k])})
    return out


def one_line_description(param: Mapping) -> str:
    """A parameter's description on one line."""
    return " ".join(str(param.get("Description", "")).split())
