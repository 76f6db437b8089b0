"""Reading ``stack.yaml``: its parameters, and the parameter list a create or an update sends."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


def parse(text: str) -> dict:
    """A template (YAML or JSON) as a dict, short tags expanded to their long form."""
    return yaml.load(text, Loader=_CfnLoader)  # noqa: S506 - a SafeLoader subclass


def load(path: str | Path) -> dict:
    """The template file at ``path`` as a dict."""
    return parse(Path(path).read_text())


class ParameterError(ValueError):
    """Unknown or missing stack parameters."""


def parameter_list(template: Mapping, given: Mapping[str, str],
                   previous: Iterable[str] | None = None) -> list[dict]:
    """CloudFormation's ``Parameters`` for a create (``previous`` None) or an update.

    A create needs every parameter without a default; an update keeps the running stack's
    value of every parameter not given (``UsePreviousValue``).
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
    out += [{"ParameterKey": k, "UsePreviousValue": True}
            for k in sorted(set(previous) & set(declared) - set(given))]
    return out


def one_line_description(param: Mapping) -> str:
    """A parameter's description on one line."""
    return " ".join(str(param.get("Description", "")).split())
