"""`exlsp pull` against a fake of the Hugging Face hub on 127.0.0.1, serving a tiny model."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlsp.server import pull as pull_mod
from exlsp.server.pull import PullError, local_dir, pull, resolve_target
from tests.hf_hub_fake import FakeHub, FakeRepo, folder_files

ROOT = Path(__file__).resolve().parent.parent


def _no_fim(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same model with its FIM markers renamed: a tokenizer without FIM tokens."""
    out = dict(files)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if name in out:
            out[name] = out[name].replace(b"fim_", b"xim_")
    return out


CHAT = b"{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture
def hub(tiny_model: Path) -> Iterator[FakeHub]:
    files = folder_files(tiny_model)
    fake = FakeHub(
        repos={
            "tiny/coder": FakeRepo({"main": files, "6_5": files}),
            "tiny/bin-only": FakeRepo(
                {
                    "main": {
                        "config.json": files["config.json"],
                        "tokenizer.json": files["tokenizer.json"],
                        "pytorch_model.bin": b"\x80\x02pickle" * 100,
                    }
                }
            ),
            "tiny/chat": FakeRepo({"main": _no_fim(files)}),
            "tiny/instruct": FakeRepo({"main": {**_no_fim(files), "chat_template.jinja": CHAT}}),
        }
    ).start()
    yield fake
    fake.stop()


@pytest.fixture
def hub_env(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """Point huggingface_hub (already imported) and exlsp's folders at the fake and tmp_path."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("EXLSP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EXLSP_CONFIG_DIR", str(tmp_path / "config"))
    assert constants.ENDPOINT.startswith("http://127.0.0.1:")
    return hub


def _user_config(tmp_path: Path) -> dict:
    path = tmp_path / "config" / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_complete_download_configures_the_model(
    hub_env: FakeHub, tiny_model: Path, tmp_path: Path
) -> None:
    # Another setting already in the user file survives the pull.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text('{"completion": {"maxTokens": 7}}')
    result = pull("tiny/coder")
    assert result.path == tmp_path / "cache" / "models" / "tiny--coder--main"
    assert result.fim_template == "qwen2.5-coder"
    assert result.backend == "transformers"
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (result.path / name).read_bytes() == (tiny_model / name).read_bytes()
    cfg = _user_config(tmp_path)
    assert cfg["model"] == {"path": str(result.path), "backend": "transformers"}
    assert cfg["completion"] == {"maxTokens": 7}
    assert (tmp_path / "config" / "config.json").stat().st_mode & 0o777 == 0o600


def test_interrupted_download_resumes(
    hub_env: FakeHub, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # huggingface_hub resumes from the last chunk it wrote (10 MB by default): smaller
    # chunks, so a cut in the middle of this small file leaves some on disk.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub_env.drop_once.add("model.safetensors")
    try:
        result = pull("tiny/coder")
    except PullError:
        # The library gave up on the cut connection: running the command again resumes.
        result = pull("tiny/coder")
    data = (tiny_model / "model.safetensors").read_bytes()
    assert (result.path / "model.safetensors").read_bytes() == data
    gets = [r for r in hub_env.requests if r[0] == "GET" and r[1].endswith("/model.safetensors")]
    assert len(gets) == 2, gets
    # The second request asks only for the rest of what the first delivered in part.
    first = gets[0][2].get("range")
    resumed = gets[1][2].get("range", "")
    assert first is None and resumed.startswith("bytes="), (first, resumed)
    assert 0 < int(resumed[6:-1]) <= len(data) // 2


def test_unknown_revision_is_a_clear_error(hub_env: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(PullError, match=r"tiny/coder has no revision '4_0'"):
        pull("tiny/coder@4_0")
    with pytest.raises(PullError, match=r"no repository tiny/nothing"):
        pull("tiny/nothing")
    assert _user_config(tmp_path) == {}


def test_pickle_only_repository_is_refused(hub_env: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(PullError, match=r"only PyTorch pickle weights \(pytorch_model\.bin\)"):
        pull("tiny/bin-only")
    assert not local_dir("tiny/bin-only", "main").exists()  # nothing downloaded
    assert _user_config(tmp_path) == {}


def test_model_without_fim_tokens_is_refused(hub_env: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(PullError, match="no fill-in-the-middle tokens"):
        pull("tiny/chat")
    assert _user_config(tmp_path) == {}


def test_an_assist_model_needs_a_chat_template_not_fim_tokens(
    hub_env: FakeHub, tmp_path: Path
) -> None:
    result = pull("tiny/instruct", assist=True)
    assert result.fim_template is None and result.role == "assist"
    config = _user_config(tmp_path)
    assert config == {"assist": {"path": str(result.path), "backend": "transformers"}}
    with pytest.raises(PullError, match="neither a chat template nor fill-in-the-middle"):
        pull("tiny/chat", assist=True)


def test_a_catalogue_name_with_assist_is_its_instruct_companion() -> None:
    target = resolve_target("qwen2.5-coder-1.5b", assist=True)
    assert (target.repo, target.revision) == ("Qwen/Qwen2.5-Coder-1.5B-Instruct", "main")
    with pytest.raises(PullError, match="no instruction-tuned companion"):
        resolve_target("starcoder2-3b", assist=True)


def test_full_disk_keeps_a_resumable_partial_download(
    hub_env: FakeHub, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.file_download as fd

    real_http_get = fd.http_get

    def full_disk(url: str, temp_file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if url.endswith("/model.safetensors"):
            temp_file.write(b"\0" * 1000)  # some bytes land before the disk fills up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_http_get(url, temp_file, *args, **kwargs)

    monkeypatch.setattr(fd, "http_get", full_disk)
    with pytest.raises(PullError, match="the disk is full") as info:
        pull("tiny/coder")
    assert "run the same command again" in str(info.value)
    dest = local_dir("tiny/coder", "main")
    # The failed file is not left half-written; the files that arrived are kept.
    assert not (dest / "model.safetensors").exists()
    assert (dest / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    assert _user_config(tmp_path) == {}

    monkeypatch.setattr(fd, "http_get", real_http_get)
    hub_env.requests.clear()
    result = pull("tiny/coder")
    data = (tiny_model / "model.safetensors").read_bytes()
    assert (result.path / "model.safetensors").read_bytes() == data
    fetched = {r[1].rsplit("/", 1)[1] for r in hub_env.requests if r[0] == "GET"}
    assert "model.safetensors" in fetched and "tokenizer.json" not in fetched, fetched
    assert _user_config(tmp_path)["model"]["path"] == str(dest)


def test_catalogue_names_and_bits_pick_the_repository() -> None:
    t = resolve_target("codestral-22b", 6.5)
    assert (t.repo, t.revision) == ("bartowski/Codestral-22B-v0.1-exl2", "6_5")
    t = resolve_target("qwen2.5-coder-1.5b")
    assert (t.repo, t.revision) == ("Qwen/Qwen2.5-Coder-1.5B", "main")
    t = resolve_target("someone/model@v2")
    assert (t.repo, t.revision) == ("someone/model", "v2")
    with pytest.raises(
        PullError, match=re.escape("no EXL2 size of 7 bits per weight; one of 8, 6.5")
    ):
        resolve_target("starcoder2-15b", 7)
    with pytest.raises(PullError, match=re.escape("no EXL2 repository of qwen2.5-coder-0.5b")):
        resolve_target("qwen2.5-coder-0.5b", 4.0)
    with pytest.raises(PullError, match="neither a model of the catalogue"):
        resolve_target("nonsense")


def test_cli_pull_prints_what_it_configured(hub: FakeHub, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "EXLSP_CACHE_DIR": str(tmp_path / "cache"),
        "EXLSP_CONFIG_DIR": str(tmp_path / "config"),
    }
    env.pop("HF_TOKEN", None)
    for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(offline, None)  # set in this process once an embedder has loaded
    cmd = [sys.executable, "-m", "exlsp.server.cli", "pull", "tiny/coder@6_5"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    dest = tmp_path / "cache" / "models" / "tiny--coder--6_5"
    assert f"into         {dest}" in proc.stdout
    assert "FIM template qwen2.5-coder" in proc.stdout
    assert f"'transformers' in {tmp_path / 'config' / 'config.json'}" in proc.stdout
    assert _user_config(tmp_path)["model"]["path"] == str(dest)

    proc = subprocess.run(
        [*cmd[:-1], "tiny/bin-only"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("exlsp pull: tiny/bin-only@main has only PyTorch pickle")


def test_disk_full_detection_follows_the_cause_chain() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("download failed") from e
    except RuntimeError as e:
        assert pull_mod._is_disk_full(e)
    assert not pull_mod._is_disk_full(OSError(errno.EACCES, "denied"))
