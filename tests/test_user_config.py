"""The user configuration file: merge and atomic write, precedence, `exlsp config`, the server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from exlsp.server.cli import load_config, main
from exlsp.server.user_config import (
    UserConfigError,
    read_user_config,
    user_config_path,
    write_user_settings,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EXLSP_CONFIG_DIR", str(tmp_path / "cfg"))
    return tmp_path / "cfg"


def test_write_merges_keeps_other_keys_and_is_private(config_dir: Path) -> None:
    assert read_user_config() == {}
    write_user_settings({"model": {"path": "/a", "backend": "transformers"}, "x": 1})
    write_user_settings({"model": {"path": "/b"}})
    assert read_user_config() == {"model": {"path": "/b", "backend": "transformers"}, "x": 1}
    assert user_config_path() == config_dir / "config.json"
    assert user_config_path().stat().st_mode & 0o777 == 0o600
    assert os.listdir(config_dir) == ["config.json"]  # no temporary file left behind


def test_a_broken_file_is_reported_not_overwritten(config_dir: Path) -> None:
    config_dir.mkdir()
    (config_dir / "config.json").write_text("{not json")
    with pytest.raises(UserConfigError, match="not valid JSON"):
        read_user_config()
    with pytest.raises(UserConfigError):
        write_user_settings({"model": {"path": "/a"}})
    assert (config_dir / "config.json").read_text() == "{not json"


def test_precedence_defaults_user_file_config_file(config_dir: Path, tmp_path: Path) -> None:
    write_user_settings(
        {"model": {"path": "/user", "cacheType": "q4"}, "completion": {"maxTokens": 7}}
    )
    cli_file = tmp_path / "cli.json"
    cli_file.write_text(json.dumps({"model": {"path": "/cli"}}))
    config = load_config(str(cli_file))
    assert config.model.path == "/cli"  # --config beats the user file
    assert config.model.cacheType == "q4"  # the user file beats the default
    assert config.completion.maxTokens == 7
    assert config.model.maxSeqLen == 8192  # the default
    assert load_config(None).model.path == "/user"


def test_config_command_names_each_source(
    config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_user_settings({"model": {"path": "/user", "backend": "nonsense", "apiKey": "sk-secret"}})
    cli_file = tmp_path / "cli.json"
    cli_file.write_text(json.dumps({"completion": {"maxTokens": 9}}))
    assert main(["config", "--config", str(cli_file)]) == 0
    captured = capsys.readouterr()
    lines = {line.split()[0]: line for line in captured.out.splitlines()[1:]}
    assert lines["model.path"].endswith(f"user file {config_dir / 'config.json'}")
    assert '"/user"' in lines["model.path"]
    assert lines["completion.maxTokens"].endswith(f"--config {cli_file}")
    assert lines["model.maxSeqLen"].endswith("default")
    # A bad value in the file is reported and does not claim the setting.
    assert lines["model.backend"].endswith("default") and '"transformers"' in lines["model.backend"]
    assert "model.backend" in captured.err
    # Secrets are not printed.
    assert "sk-secret" not in captured.out and '"(set)"' in lines["model.apiKey"]


USER_DIR = ROOT / ".test-cache" / "user-config-e2e"


@pytest_lsp.fixture(
    config=ClientServerConfig(
        server_command=[sys.executable, "-m", "exlsp.server", "serve"],
        server_env={**os.environ, "EXLSP_CONFIG_DIR": str(USER_DIR)},
    )
)
async def client(lsp_client: LanguageClient):  # type: ignore[no-untyped-def]
    yield
    await lsp_client.shutdown_session()


@pytest.mark.e2e
async def test_server_applies_the_user_file_under_initialization_options(
    client: LanguageClient, tiny_model: Path
) -> None:
    # The user file picks the backend and a model path; initializationOptions, above it,
    # picks another path. The server must combine both.
    USER_DIR.mkdir(parents=True, exist_ok=True)
    (USER_DIR / "config.json").write_text(
        json.dumps({"model": {"backend": "instant", "path": "/no/such/model"}})
    )
    await client.initialize_session(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(),
            initialization_options={"model": {"path": str(tiny_model), "device": "cpu"}},
        )
    )
    for _ in range(600):
        stats = await client.protocol.send_request_async("exlsp/stats", {})
        if stats.state not in ("idle", "loading"):
            break
        await asyncio.sleep(0.1)
    assert stats.state == "ready", stats
    assert stats.model.backend == "instant"
    assert stats.model.path == str(tiny_model)
