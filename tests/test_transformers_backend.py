"""The transformers backend on a real tiny model: KV reuse is exact, stops, cancellation."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from exlsp.completion.backends.base import GenerationJob
from exlsp.completion.backends.transformers_backend import TransformersBackend
from exlsp.completion.config import CompletionConfig, ModelConfig
from exlsp.completion.decode import decode
from exlsp.completion.fim import resolve_template
from exlsp.completion.prompt import PromptBuilder
from exlsp.completion.types import DocumentView
from exlsp.server.documents import split_lines

SOURCE = '''import os
import sys


def read_config(path):
    """Read a configuration file."""
    with open(path) as f:
        return f.read()


class Cache:
    def __init__(self, size):
        self.size = size
        self.items = {}

    def get(self, key):
        return self.items.get(key)


def main():
    print(read_config(sys.argv[1]))
'''


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> TransformersBackend:
    return TransformersBackend(
        ModelConfig(path=str(tiny_model), device="cpu", threads=1), tiny_model
    )


def typing_session() -> list[tuple[str, int, int]]:
    """(text, line, character) after each of 60 edits: typing, newlines, deletions, a jump."""
    lines = SOURCE.split("\n")
    states: list[tuple[str, int, int]] = []
    row = 19  # inside Cache.get
    lines.insert(row, "        ")
    typed = "value = self.items.get(key)\nreturn value"
    col = 8
    for ch in typed:
        if ch == "\n":
            row += 1
            lines.insert(row, "        ")
            col = 8
        else:
            lines[row] = lines[row][:col] + ch + lines[row][col:]
            col += 1
        states.append(("\n".join(lines), row, col))
    for _ in range(5):  # backspaces
        col -= 1
        lines[row] = lines[row][:col] + lines[row][col + 1 :]
        states.append(("\n".join(lines), row, col))
    row, col = 4, len(lines[4])  # jump elsewhere in the file: end of `def read_config(path):`
    for ch in " # the path":
        lines[row] = lines[row] + ch
        col += 1
        states.append(("\n".join(lines), row, col))
    return states


def run(
    backend: TransformersBackend,
    prompt: list[int],
    stops: frozenset[int],
    reuse: bool,
    max_tokens: int = 12,
) -> tuple[list[int], GenerationJob]:
    job = GenerationJob(prompt=prompt, stop_ids=stops, max_tokens=max_tokens, reuse_cache=reuse)
    return list(decode(backend, job)), job


def test_kv_reuse_is_exact_across_a_typing_session(
    backend: TransformersBackend, tiny_model: Path
) -> None:
    fim = resolve_template("auto", backend.tokenizer, tiny_model)
    builder = PromptBuilder(backend.tokenizer, fim, CompletionConfig(prefixTokens=512))
    states = typing_session()
    assert len(states) >= 50
    prefilled = []
    for text, line, col in states:
        doc = DocumentView("file:///x.py", split_lines(text), line, col, "python")
        prompt = builder.build(doc).ids
        reused_tokens, job = run(backend, prompt, fim.stop_ids, reuse=True)
        fresh_tokens, fresh_job = run(backend, prompt, fim.stop_ids, reuse=False)
        assert reused_tokens == fresh_tokens, f"reuse changed the output at {line}:{col}"
        assert fresh_job.stats.reused_tokens == 0
        prefilled.append(job.stats.prefilled_tokens)
        # The fresh run left its own sequence in the cache: the next reuse run starts from it.
    # Reuse pays: most keystrokes prefill only a handful of tokens.
    prefilled.sort()
    assert prefilled[len(prefilled) // 2] <= 16


def test_reuse_counts_prompt_and_generated_tokens(backend: TransformersBackend) -> None:
    tok = backend.tokenizer
    prompt = tok.encode("def add(a, b):\n    return")
    out, job = run(backend, prompt, frozenset(), reuse=False, max_tokens=6)
    assert job.stats.prefilled_tokens == len(prompt)
    # Continue exactly where the last one stopped (prompt + all but the last generated token
    # are in the cache).
    _out2, job2 = run(backend, prompt + out, frozenset(), reuse=True, max_tokens=2)
    assert job2.stats.reused_tokens == len(prompt) + len(out) - 1
    assert job2.stats.prefilled_tokens == 1


def test_stops_on_stop_ids_and_max_tokens(backend: TransformersBackend) -> None:
    prompt = backend.tokenizer.encode("x = 1\n")
    out, job = run(backend, prompt, frozenset(), reuse=False, max_tokens=5)
    assert len(out) == 5 and job.stats.stop_reason == "max_tokens"
    # Make the first generated token a stop id: nothing comes out.
    first = out[0]
    out2, job2 = run(backend, prompt, frozenset({first}), reuse=True, max_tokens=5)
    assert out2 == [] and job2.stats.stop_reason == "eos"


def test_cancellation_between_decode_steps(backend: TransformersBackend) -> None:
    prompt = backend.tokenizer.encode("def f():\n")
    job = GenerationJob(prompt=prompt, stop_ids=frozenset(), max_tokens=10_000)
    got: list[int] = []

    def consume() -> None:
        for t in decode(backend, job):
            got.append(t)

    th = threading.Thread(target=consume)
    th.start()
    limit = time.monotonic() + 30
    while len(got) < 3 and th.is_alive() and time.monotonic() < limit:
        time.sleep(0.001)
    assert len(got) >= 3, job.stats
    job.cancel.set()
    n = len(got)
    th.join(timeout=10)
    assert not th.is_alive()
    assert job.stats.stop_reason == "cancelled"
    assert len(got) <= n + 1  # at most the step already under way


def test_deadline(backend: TransformersBackend) -> None:
    prompt = backend.tokenizer.encode("def f():\n")
    job = GenerationJob(
        prompt=prompt, stop_ids=frozenset(), max_tokens=100_000, deadline=time.monotonic() + 0.2
    )
    out = list(decode(backend, job))
    assert job.stats.stop_reason == "deadline"
    assert 0 < len(out) < 100_000


def test_background_slot_keeps_the_main_cache(backend: TransformersBackend) -> None:
    tok = backend.tokenizer
    prompt = tok.encode("def area(radius):\n    return radius * radius\n")
    run(backend, prompt, frozenset(), reuse=False, max_tokens=2)
    other = GenerationJob(
        prompt=tok.encode("explain this code please"),
        stop_ids=frozenset(),
        max_tokens=2,
        slot="background",
    )
    list(decode(backend, other))
    _, job = run(backend, prompt, frozenset(), reuse=True, max_tokens=2)
    assert job.stats.reused_tokens == len(prompt) - 1  # the main slot survived


def test_background_prefill_in_chunks_is_exact_and_stops_between_chunks(
    backend: TransformersBackend,
) -> None:
    from exlsp.completion.backends.transformers_backend import BACKGROUND_PREFILL_CHUNK

    prompt = backend.tokenizer.encode(SOURCE * 3)
    assert len(prompt) > 3 * BACKGROUND_PREFILL_CHUNK
    one_pass, _ = run(backend, prompt, frozenset(), reuse=False, max_tokens=6)

    def background(cancel_after_chunks: int | None) -> tuple[list[int], GenerationJob]:
        backend._use_slot("background")
        backend.reset_cache()
        job = GenerationJob(prompt=prompt, stop_ids=frozenset(), max_tokens=6, slot="background")
        if cancel_after_chunks is not None:
            forward = backend._forward
            calls = 0

            def counting(ids: list[int]) -> object:
                nonlocal calls
                calls += 1
                if calls == cancel_after_chunks:
                    job.cancel.set()  # a completion arrives during this chunk
                return forward(ids)

            backend._forward = counting  # type: ignore[method-assign]
            try:
                return list(decode(backend, job)), job
            finally:
                del backend._forward
        return list(decode(backend, job)), job

    chunked, job = background(None)
    assert chunked == one_pass  # chunked prefill computes the same cache
    assert job.stats.prefilled_tokens == len(prompt)
    stopped, job = background(2)
    assert stopped == [] and job.stats.stop_reason == "cancelled"
    # Two chunks ran and stay cached: resuming prefills only the rest.
    assert len(backend._cached) == 2 * BACKGROUND_PREFILL_CHUNK
    resumed = GenerationJob(prompt=prompt, stop_ids=frozenset(), max_tokens=6, slot="background")
    assert list(decode(backend, resumed)) == one_pass
    assert resumed.stats.reused_tokens == 2 * BACKGROUND_PREFILL_CHUNK
    backend._use_slot("main")


def test_pickled_weights_are_never_loaded(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    from exlsp.completion.service import ModelLoadError, create_backend

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        create_backend(ModelConfig(path=str(pickled), device="cpu"))
