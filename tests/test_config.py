"""The configuration tree: defaults, merging, bad values, and the README's copy."""

from __future__ import annotations

import json
import re
from pathlib import Path

from exlsp.server.config import Config, default_wire_config, merge

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_shows_every_option_with_its_default() -> None:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- config:begin -->\n```json\n(.*?)\n```\n<!-- config:end -->", text, re.S)
    assert m, "README lacks the configuration block"
    assert json.loads(m.group(1)) == default_wire_config()


def test_merge_applies_valid_values_and_reports_bad_ones() -> None:
    config, errors = merge(
        Config(),
        {
            "model": {"path": "/m", "backend": "instant", "cacheType": "Q4"},
            "completion": {
                "maxTokens": 64,
                "deadlineMs": -5,
                "multiline": "sometimes",
                "kvReuse": "yes",
                "prefixTokens": 2048.0,
            },
            "logging": {"level": "debug"},
            "nonsense": 1,
        },
    )
    assert config.model.path == "/m"
    assert config.model.backend == "instant"
    assert config.model.cacheType == "q4"
    assert config.completion.maxTokens == 64
    assert config.completion.prefixTokens == 2048
    assert config.completion.deadlineMs == Config().completion.deadlineMs
    assert config.completion.multiline == "auto"
    assert config.completion.kvReuse is True
    assert config.logging.level == "debug"
    assert len(errors) == 4
    assert any(e.startswith("completion.deadlineMs") for e in errors)
    assert any(e.startswith("nonsense: unknown") for e in errors)


def test_merge_keeps_the_previous_value_not_only_the_default() -> None:
    first, _ = merge(Config(), {"completion": {"maxTokens": 99}})
    second, errors = merge(first, {"completion": {"maxTokens": "many"}})
    assert second.completion.maxTokens == 99
    assert errors


def test_a_section_that_is_not_an_object_is_reported() -> None:
    config, errors = merge(Config(), {"completion": 3})
    assert config == Config()
    assert errors == ["completion: expected an object"]
