"""The README is the user's manual: every setting the code reads is documented there."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

import ops.stackctl.config
from serve.batch.run import BatchSettings
from serve.config import Settings
from serve.stream.app import StreamSettings
from serve.web.settings import WebSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _settings_classes() -> list[type[BaseSettings]]:
    stack = [c for _, c in inspect.getmembers(ops.stackctl.config, inspect.isclass)
             if issubclass(c, BaseSettings) and c.__module__ == ops.stackctl.config.__name__]
    assert stack, "ops.stackctl.config defines no settings class"
    return [Settings, WebSettings, BatchSettings, StreamSettings, *stack]


@pytest.mark.parametrize("cls", _settings_classes(), ids=lambda c: c.__name__)
def test_every_setting_is_in_the_readme(cls):
    config = README.split("<!-- section:config -->")[1].split("<!-- /section:config -->")[0]
    missing = [name.upper() for name in cls.model_fields if f"`{name.upper()}`" not in config]
    assert not missing, f"{cls.__name__}: not documented in README's configuration: {missing}"


def test_readme_starts_with_the_two_commands():
    head = "\n".join(README.splitlines()[:10])
    assert "make demo" in head and "make test" in head
