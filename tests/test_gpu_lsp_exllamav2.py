"""A completion through the language server over stdio, served by the exllamav2 backend on
a real GPU (skipped, with the reason, where there is no CUDA GPU or no exllamav2).

The EXL2 model is `EXLSP_GPU_EXL2_MODEL` (the GPU kit sets it to the tiny model its
`tiny` stage made), else the tiny model converted by `build_exl2`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import pytest_lsp
import torch
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.test_lsp_e2e import capabilities, get_stats, inline, open_doc, wait_ready

pytestmark = pytest.mark.gpu

SERVER = [sys.executable, "-m", "exlsp.server", "serve"]
SOURCE = (
    "import os\n\n\n"
    "def list_python_files(root):\n"
    "    result = []\n"
    "    for name in os.listdir(root):\n"
    "        "
)


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA GPU (torch {torch.__version__})")
    if importlib.util.find_spec("exllamav2") is None:
        pytest.skip("exllamav2 is not installed (pip install exllamav2==0.3.2)")
    given = os.environ.get("EXLSP_GPU_EXL2_MODEL")
    if given:
        return Path(given)
    from exlsp.benchmarks.build_exl2 import build_exl2

    out = tmp_path_factory.mktemp("exl2") / "qwen2.5-coder-tiny-4.0bpw"
    return build_exl2("qwen2.5-coder", "tiny", out, bits=4.0)


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient, gpu_model: Path):  # type: ignore[no-untyped-def]
    await lsp_client.initialize_session(
        types.InitializeParams(
            capabilities=capabilities("utf-16"),
            initialization_options={
                "model": {"path": str(gpu_model), "backend": "exllamav2", "maxSeqLen": 4096},
                "completion": {"deadlineMs": 5000, "maxTokens": 16},
                "index": {"enabled": False},
            },
        )
    )
    stats = await wait_ready(lsp_client, timeout=300)
    assert stats["state"] == "ready", stats
    yield
    await lsp_client.shutdown_session()


async def test_a_keystroke_is_completed_on_the_gpu_and_the_next_reuses_the_cache(
    client: LanguageClient,
) -> None:
    uri = open_doc(client, SOURCE)
    last_line = SOURCE.count("\n")
    col = len(SOURCE.rsplit("\n", 1)[1])
    result = await inline(client, uri, last_line, col)
    assert isinstance(result, types.InlineCompletionList | list)
    stats = await get_stats(client)
    assert stats["model"]["backend"] == "exllamav2"
    assert stats["model"]["device"] == "cuda"
    first = stats["last"]
    assert first["source"] == "model" and first["stopReason"] != "error", first
    assert first["promptTokens"] > 10

    typed = SOURCE + "i"
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(
                        types.Position(last_line, col), types.Position(last_line, col)
                    ),
                    text="i",
                )
            ],
        )
    )
    await inline(client, uri, last_line, len(typed.rsplit("\n", 1)[1]))
    second = (await get_stats(client))["last"]
    assert second["source"] in ("model", "type-ahead", "attached"), second
    if second["source"] == "model":  # one typed character: the prompt's head comes from cache
        assert second["reusedTokens"] >= first["promptTokens"] // 2, (first, second)
