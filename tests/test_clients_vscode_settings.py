"""The VS Code extension's settings mirror the server's configuration tree.

Every leaf of the tree is a setting `exlsp.<section>.<key>` in
clients/vscode/package.json with the same default and JSON type, and no
setting outside the tree is sent to the server (only `exlsp.server.*` and
`exlsp.trace.*` configure the client itself).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from exlsp.completion.config import CompletionConfig, ModelConfig
from exlsp.server.config import USER_ONLY

PACKAGE_JSON = Path(__file__).resolve().parents[1] / "clients" / "vscode" / "package.json"
CLIENT_ONLY_PREFIXES = ("exlsp.server.", "exlsp.trace.")

JSON_TYPES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def _contributed() -> dict[str, dict[str, Any]]:
    package = json.loads(PACKAGE_JSON.read_text(encoding="utf-8"))
    properties: dict[str, dict[str, Any]] = package["contributes"]["configuration"]["properties"]
    return properties


def _server_settings() -> dict[str, dict[str, Any]]:
    return {
        name: schema
        for name, schema in _contributed().items()
        if not name.startswith(CLIENT_ONLY_PREFIXES)
    }


def _flatten(tree: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, leaves in tree.items():
        assert isinstance(leaves, dict), f"section {section!r} is not a table"
        for key, value in leaves.items():
            flat[f"exlsp.{section}.{key}"] = value
    return flat


def _mismatches(expected: dict[str, Any], settings: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    for name, default in expected.items():
        schema = settings.get(name)
        if schema is None:
            problems.append(f"{name}: missing from package.json (server default {default!r})")
            continue
        if "default" not in schema:
            problems.append(f"{name}: no default (server default {default!r})")
        elif schema["default"] != default or type(schema["default"]) is not type(default):
            problems.append(f"{name}: default {schema['default']!r} != server default {default!r}")
        json_type = JSON_TYPES.get(type(default))
        if json_type and schema.get("type") != json_type:
            problems.append(f"{name}: type {schema.get('type')!r} != {json_type!r}")
        if "enum" in schema and default not in schema["enum"]:
            problems.append(f"{name}: default {default!r} not in enum {schema['enum']}")
    return problems


def test_settings_mirror_the_engine_dataclasses() -> None:
    settings = _server_settings()
    expected = _flatten(
        {
            "model": dataclasses.asdict(ModelConfig()),
            "completion": dataclasses.asdict(CompletionConfig()),
        }
    )
    assert _mismatches(expected, settings) == []
    for section in ("model", "completion"):
        declared = {name for name in settings if name.startswith(f"exlsp.{section}.")}
        assert declared == {name for name in expected if name.startswith(f"exlsp.{section}.")}


def test_settings_mirror_the_server_wire_config() -> None:
    # Imported here so that, until the server's config module exists, only
    # this test fails rather than the whole collection.
    from exlsp.server.config import default_wire_config

    expected = _flatten(default_wire_config())
    settings = _server_settings()
    assert _mismatches(expected, settings) == []
    extra = sorted(set(settings) - set(expected))
    assert extra == [], f"settings the server does not know: {extra}"


def test_client_only_settings() -> None:
    settings = _contributed()
    assert settings["exlsp.server.command"]["default"] == ""
    assert settings["exlsp.server.python"]["default"] == ""
    assert settings["exlsp.server.args"]["default"] == []
    assert settings["exlsp.trace.server"]["default"] == "off"
    for name in settings:
        assert name.startswith("exlsp."), name
        assert len(name.split(".")) == 3, f"{name}: settings are exlsp.<section>.<key>"


# Settings that name a program, an interpreter, a model, a host, a credential
# or a path to write: a repository's .vscode/settings.json must not set them.
# The server's own list of the settings only the user chooses, plus the program to start.
MACHINE_ONLY = {f"exlsp.{section}.{key}" for section, key in USER_ONLY} | {
    "exlsp.server.command",
    "exlsp.server.args",
    "exlsp.server.python",
}


def test_workspace_cannot_choose_program_model_host_credential_or_path() -> None:
    # VS Code ignores workspace values of machine-scoped settings (the
    # extension's node tests check it reads them from the user level only).
    settings = _contributed()
    machine = {name for name, schema in settings.items() if schema.get("scope") == "machine"}
    assert machine == MACHINE_ONLY
    package = json.loads(PACKAGE_JSON.read_text(encoding="utf-8"))
    untrusted = package["capabilities"]["untrustedWorkspaces"]
    assert untrusted["supported"] == "limited"
    assert untrusted["description"]
    assert set(untrusted["restrictedConfigurations"]) == MACHINE_ONLY
    assert len(untrusted["restrictedConfigurations"]) == len(MACHINE_ONLY)
