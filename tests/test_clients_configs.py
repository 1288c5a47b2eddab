"""The Helix example and the Emacs package stay in step with the server's
configuration tree (no editor needed)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from exlsp.server.config import default_wire_config

CLIENTS = Path(__file__).resolve().parents[1] / "clients"


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, leaves in tree.items()
        for key, value in leaves.items()
    }


def test_helix_example_is_valid_and_uses_known_settings() -> None:
    config = tomllib.loads((CLIENTS / "helix" / "languages.toml").read_text(encoding="utf-8"))
    server = config["language-server"]["exlsp"]
    assert server["command"] == "exlsp"
    assert server["args"][-1] == "serve"
    # Nested under "exlsp" so Helix answers workspace/configuration("exlsp") from it.
    tree = server["config"]["exlsp"]
    known = _flat(default_wire_config())
    for name, value in _flat(tree).items():
        assert name in known, f"{name}: not a server setting"
        assert type(value) is type(known[name]), f"{name}: {value!r} vs default {known[name]!r}"
    for language in config["language"]:
        entries = language["language-servers"]
        assert len(entries) >= 2, f"{language['name']}: exlsp goes beside the usual server"
        exlsp = [e for e in entries if isinstance(e, dict) and e.get("name") == "exlsp"]
        assert exlsp and "completion" in exlsp[0]["only-features"], language["name"]


def _elisp_settings() -> dict[str, Any]:
    source = (CLIENTS / "emacs" / "exlsp.el").read_text(encoding="utf-8")
    block = source[source.index("(defconst exlsp--settings") :]
    block = block[: block.index("\"The server's settings")]
    settings = {}
    value_re = r'"[^"]*"|-?\d+|t|nil|\[[^\]]*\]'
    pattern = rf'\("(exlsp\.[\w.]+)" ({value_re}) (string|integer|boolean|sexp) "'
    for name, raw, kind in re.findall(pattern, block):
        if kind == "sexp":  # a vector of strings: a JSON array on the wire
            value: Any = re.findall(r'"([^"]*)"', raw)
        elif kind == "boolean":
            value = raw == "t"
        elif kind == "integer":
            value = int(raw)
        else:
            value = raw.strip('"')
        settings[name.removeprefix("exlsp.")] = value
    return settings


def test_emacs_settings_mirror_the_server_tree() -> None:
    settings = _elisp_settings()
    expected = _flat(default_wire_config())
    assert settings == expected


def test_emacs_registers_an_add_on_client() -> None:
    source = (CLIENTS / "emacs" / "exlsp.el").read_text(encoding="utf-8")
    assert ":add-on? t" in source
    assert ":server-id 'exlsp" in source
    assert "lsp-inline-completion-mode" in source
