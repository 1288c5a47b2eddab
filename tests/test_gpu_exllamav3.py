"""The exllamav3 backend on a real GPU, with a small EXL3 model built here.

Skipped (with the reason) where there is no CUDA GPU or exllamav3 is not
installed. The model is converted from a random-weight `tiny` build by
exllamav3's own converter (`benchmarks/build_exl3.py`, short calibration); set
`EXLSP_GPU_EXL3_MODEL` to an EXL3 directory to use another.

On a GPU, a prompt prefilled whole and the same prompt prefilled as cached
pages + new tokens run kernels of different shapes, so greedy tokens may differ
where the top two logits nearly tie: a difference is accepted only at such a
tie, checked against the logits of a fresh forward pass.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from exlsp.completion.backends.base import GenerationJob
from exlsp.completion.backends.exllamav3 import (
    PAGE_SIZE,
    ExLlamaV3Backend,
    load_exllamav3_backend,
)
from exlsp.completion.backends.gpu import GpuOutOfMemoryError
from exlsp.completion.config import ModelConfig
from exlsp.completion.decode import decode

pytestmark = pytest.mark.gpu

# Logit margin under which two greedy choices count as a tie.
TIE_MARGIN = 0.05
KEYSTROKES = 60

CODE = '''import os
from pathlib import Path


def read_config(path: Path) -> dict[str, str]:
    """Read KEY=VALUE lines, skipping comments and blank lines."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: dict[str, bytes] = {}

'''
TYPED = "    def get(self, key: str) -> bytes | None:\n        return self.entries.get(key)\n" * 2


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return f"no CUDA GPU (torch {torch.__version__})"
    if importlib.util.find_spec("exllamav3") is None:
        return "exllamav3 is not installed (pip install 'exlsp[exl3]')"
    return None


@pytest.fixture(scope="module")
def exl3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    given = os.environ.get("EXLSP_GPU_EXL3_MODEL")
    if given:
        return Path(given)
    from exlsp.benchmarks.build_exl3 import build_exl3

    out = tmp_path_factory.mktemp("exl3") / "qwen2.5-coder-tiny-exl3-4.0"
    return build_exl3("qwen2.5-coder", "tiny", out, 4.0)


def _config(path: Path, **kw: Any) -> ModelConfig:
    return ModelConfig(path=str(path), backend="exllamav3", maxSeqLen=4096, **kw)


@pytest.fixture(scope="module")
def backend(exl3_dir: Path) -> Iterator[ExLlamaV3Backend]:
    b = load_exllamav3_backend(_config(exl3_dir, prefillChunk=256))
    yield b
    b.close()


@pytest.fixture(scope="module")
def fresh(exl3_dir: Path) -> Iterator[ExLlamaV3Backend]:
    b = load_exllamav3_backend(_config(exl3_dir))
    yield b
    b.close()


def _run(b: ExLlamaV3Backend, prompt: list[int], **kw: Any) -> tuple[list[int], GenerationJob]:
    job = GenerationJob(prompt=prompt, stop_ids=frozenset(), **{"max_tokens": 16, **kw})
    return list(decode(b, job)), job


def _top2_margin(b: ExLlamaV3Backend, ids: list[int]) -> float:
    """The gap between the two best next-token logits after `ids`, without the cache."""
    with torch.inference_mode():
        logits = b.model.forward(
            torch.tensor([ids], dtype=torch.long),
            {"attn_mode": "flash_attn_nc", "last_tokens_only": 1},
        )
    top = torch.topk(logits[0, -1].float(), 2).values
    return float(top[0] - top[1])


def test_reuse_agrees_with_a_fresh_cache_over_keystrokes(
    backend: ExLlamaV3Backend, fresh: ExLlamaV3Backend
) -> None:
    tok = backend.tokenizer
    checked = 0
    for k in range(1, KEYSTROKES + 1):
        prompt = tok.encode(CODE + TYPED[:k])
        got, job = _run(backend, prompt)
        want, fresh_job = _run(fresh, prompt, reuse_cache=False)
        assert fresh_job.stats.reused_tokens == 0
        assert job.stats.reused_tokens + job.stats.prefilled_tokens == len(prompt)
        if k > 1:
            # In-line typing: only the changed tail is prefilled.
            assert job.stats.prefilled_tokens <= 16, (k, job.stats)
        if got != want:
            i = next(
                (n for n, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            margin = _top2_margin(fresh, prompt + want[:i])
            assert margin < TIE_MARGIN, (k, i, margin)
        checked += 1
    assert checked >= 50


def test_cancellation_stops_a_prefill_within_one_chunk(backend: ExLlamaV3Backend) -> None:
    prompt = [(i * 37 + 11) % 1000 + 10 for i in range(3000)]
    job = GenerationJob(prompt=prompt, stop_ids=frozenset(), max_tokens=16)
    gen = backend.generator()
    real = gen.iterate
    calls = 0

    def iterate_then_cancel() -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        out = real()
        job.cancel.set()  # arrives while the first chunk ran
        return out

    gen.iterate = iterate_then_cancel
    try:
        assert list(decode(backend, job)) == []
    finally:
        del gen.iterate
    assert job.stats.stop_reason == "cancelled"
    assert calls == 1
    assert 0 < job.stats.prefilled_tokens <= 256
    assert not gen.active_jobs and not gen.pending_jobs
    _, again = _run(backend, prompt)  # the chunk that ran stayed cached
    assert again.stats.reused_tokens >= PAGE_SIZE


def test_cancellation_during_decode(backend: ExLlamaV3Backend) -> None:
    job = GenerationJob(prompt=list(range(10, 500)), stop_ids=frozenset(), max_tokens=64)
    out = []
    for token in decode(backend, job):
        out.append(token)
        if len(out) == 2:
            job.cancel.set()
    assert job.stats.stop_reason == "cancelled"
    assert len(out) == 2
    gen = backend.generator()
    assert not gen.active_jobs and not gen.pending_jobs


def test_out_of_memory_at_load_is_reported_and_a_smaller_load_works(exl3_dir: Path) -> None:
    free, _ = torch.cuda.mem_get_info()
    # A paged cache past the free memory: an fp16 cache holds more than one byte a
    # token for any model, so as many tokens as there are free bytes cannot fit.
    tokens = (free // PAGE_SIZE + 1) * PAGE_SIZE
    with pytest.raises(GpuOutOfMemoryError, match="not enough GPU memory"):
        load_exllamav3_backend(
            ModelConfig(path=str(exl3_dir), backend="exllamav3", maxSeqLen=tokens, cacheType="fp16")
        )
    b = load_exllamav3_backend(_config(exl3_dir))
    try:
        tokens_out, _ = _run(b, list(range(10, 300)))
        assert len(tokens_out) == 16
    finally:
        b.close()


def test_the_disk_tier_is_warm_after_a_restart(exl3_dir: Path, tmp_path: Path) -> None:
    cfg = _config(exl3_dir, pageCacheRamMiB=256, pageCacheDiskMiB=1024, pageCacheDir=str(tmp_path))
    prompt = [(i * 53 + 7) % 1000 + 10 for i in range(3000)]
    first = load_exllamav3_backend(cfg)
    try:
        _run(first, prompt)
        first.flush_to_disk()
    finally:
        first.close()
    restarted = load_exllamav3_backend(cfg)
    try:
        _, job = _run(restarted, [*prompt, 42])
    finally:
        restarted.close()
    assert job.stats.reused_tokens >= 0.9 * len(prompt), job.stats
