"""The exllamav2 backend on a real GPU, with a small EXL2 model built here.

Skipped (with the reason) where there is no CUDA GPU or exllamav2 cannot be
imported. The model is converted from a random-weight `tiny` build by
`benchmarks/build_exl2.py`; set `EXLSP_GPU_EXL2_MODEL` to an EXL2 directory to
use another, or `EXLSP_GPU_TEST_SIZE` to convert another size.

On a GPU, reused and fresh prefills run kernels of different shapes, so greedy
tokens may differ where the top two logits nearly tie: a difference is accepted
only at such a tie, checked against the logits of a fresh prefill.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from exlsp.benchmarks.exl2_dynamic import Exl2DynamicBackend, dynamic_api
from exlsp.completion.backends.base import GenerationJob
from exlsp.completion.backends.exllamav2 import (
    ExLlamaV2Backend,
    ExLlamaV2LoadError,
    import_exllamav2,
    kv_cache_bytes,
    load_exllamav2_backend,
    round_seq_len,
)
from exlsp.completion.backends.gpu import GpuOutOfMemoryError
from exlsp.completion.config import ModelConfig
from exlsp.completion.decode import decode
from exlsp.completion.models import read_model_config
from exlsp.completion.tokenizer import Tokenizer

pytestmark = pytest.mark.gpu

# Logit margin (FP16 logits) under which two greedy choices count as a tie.
TIE_MARGIN = 0.05


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return f"no CUDA GPU (torch {torch.__version__})"
    if importlib.util.find_spec("exllamav2") is None:
        return "exllamav2 is not installed (pip install exllamav2==0.3.2)"
    return None


@pytest.fixture(scope="module")
def exl2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        import_exllamav2()
    except ExLlamaV2LoadError as e:
        pytest.skip(f"exllamav2 is not importable: {e}")
    given = os.environ.get("EXLSP_GPU_EXL2_MODEL")
    if given:
        return Path(given)
    from exlsp.benchmarks.build_exl2 import build_exl2

    size = os.environ.get("EXLSP_GPU_TEST_SIZE", "tiny")
    out = tmp_path_factory.mktemp("exl2") / f"qwen2.5-coder-{size}-4.0bpw"
    return build_exl2("qwen2.5-coder", size, out, bits=4.0)


def _load(model_dir: Path, **overrides: object) -> ExLlamaV2Backend:
    config = ModelConfig(path=str(model_dir), backend="exllamav2", cacheType="fp16", maxSeqLen=4096)
    for key, value in overrides.items():
        setattr(config, key, value)
    return load_exllamav2_backend(config)


@pytest.fixture(scope="module")
def backend(exl2_dir: Path) -> Iterator[ExLlamaV2Backend]:
    b = _load(exl2_dir)
    yield b
    b.close()


@pytest.fixture(scope="module")
def fresh_backend(exl2_dir: Path) -> Iterator[ExLlamaV2Backend]:
    b = _load(exl2_dir)
    yield b
    b.close()


def typing_session(tokenizer: Tokenizer, keystrokes: int = 60) -> list[list[int]]:
    """FIM prompts (cache-stable layout) of someone typing `keystrokes` characters."""
    tok = tokenizer
    source = inspect.getsource(textwrap)
    lines = source.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if len(line) > 40 and i > 60)
    fim = [tok.token_to_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")]
    assert all(i is not None for i in fim), "the test model needs Qwen2.5-Coder FIM tokens"
    prompts = []
    line_no, col = start, 0
    for _ in range(keystrokes):
        line = lines[line_no]
        col += 1
        if col >= len(line):  # Enter: the finished line moves into the prefix
            line_no, col = line_no + 1, 0
        prefix = "".join(lines[max(0, line_no - 60) : line_no])
        typed = lines[line_no][:col]
        # The line is typed as new text: right of the cursor, only its line end.
        suffix = "\n" + "".join(lines[line_no + 1 : line_no + 15])
        prompts.append(
            [fim[0], *tok.encode(prefix), fim[1], *tok.encode(suffix), fim[2], *tok.encode(typed)]
        )
    return prompts


def generate(
    b: ExLlamaV2Backend | Exl2DynamicBackend,
    prompt: list[int],
    *,
    reuse: bool = True,
    max_tokens: int = 16,
) -> tuple[list[int], GenerationJob]:
    job = GenerationJob(
        prompt=prompt, stop_ids=frozenset(), max_tokens=max_tokens, reuse_cache=reuse
    )
    return list(decode(b, job)), job


def margin(b: ExLlamaV2Backend, ids: list[int], a: int, c: int) -> float:
    """|logit(a) - logit(c)| after a fresh prefill of `ids`."""
    b.reset_cache()
    with torch.inference_mode():
        logits = b._forward(ids, last_only=True, abort=None)
    b.reset_cache()
    row = logits[0, -1].float()
    return float((row[a] - row[c]).abs())


def test_reuse_matches_a_fresh_cache_over_a_typing_session(
    backend: ExLlamaV2Backend, fresh_backend: ExLlamaV2Backend
) -> None:
    prompts = typing_session(backend.tokenizer, 60)
    assert len(prompts) >= 50
    differing = 0
    prefilled_inline = []
    for k, prompt in enumerate(prompts):
        a, job_a = generate(backend, prompt)
        b, job_b = generate(fresh_backend, prompt, reuse=False)
        assert job_b.stats.reused_tokens == 0
        assert len(a) == len(b) == 16
        if k:
            prefilled_inline.append(job_a.stats.prefilled_tokens)
        if a != b:
            differing += 1
            i = next(j for j in range(len(a)) if a[j] != b[j])
            m = margin(fresh_backend, prompt + b[:i], a[i], b[i])
            assert m <= TIE_MARGIN, f"step {k}: token {i} differs with logit margin {m:.4f}"
    assert differing <= len(prompts) // 5
    # typing costs a few tokens of prefill, not the prompt
    assert sorted(prefilled_inline)[len(prefilled_inline) // 2] <= 4


def test_cancel_mid_generation_and_continue(backend: ExLlamaV2Backend) -> None:
    prompt = typing_session(backend.tokenizer, 5)[-1]
    job = GenerationJob(prompt=prompt, stop_ids=frozenset(), max_tokens=500)
    got = []
    for token in decode(backend, job):
        got.append(token)
        if len(got) == 5:
            job.cancel.set()
    assert len(got) == 5
    assert job.stats.stop_reason == "cancelled"
    out, job2 = generate(backend, prompt + got, max_tokens=8)
    assert len(out) == 8
    assert job2.stats.reused_tokens >= len(prompt) + 3


def test_cancel_from_another_thread_stops_a_long_prefill(backend: ExLlamaV2Backend) -> None:
    tok = backend.tokenizer
    ids = tok.encode(inspect.getsource(textwrap))[:3500]
    job = GenerationJob(prompt=ids, stop_ids=frozenset(), max_tokens=100, reuse_cache=False)
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.extend(decode(backend, job)))
    t0 = time.perf_counter()
    worker.start()
    job.cancel.set()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert job.stats.stop_reason == "cancelled"
    assert time.perf_counter() - t0 < 5


def test_out_of_memory_at_load_is_reported_and_a_later_load_works(exl2_dir: Path) -> None:
    free, _ = torch.cuda.mem_get_info()
    per_token = max(kv_cache_bytes(read_model_config(exl2_dir), 1, "fp16"), 1)
    absurd = round_seq_len(4 * free // per_token)
    with pytest.raises(GpuOutOfMemoryError, match="not enough GPU memory") as err:
        _load(exl2_dir, maxSeqLen=absurd)
    assert "\n" not in str(err.value)
    b = _load(exl2_dir, maxSeqLen=2048)
    try:
        out, _ = generate(b, typing_session(b.tokenizer, 3)[-1], max_tokens=4)
        assert len(out) == 4
    finally:
        b.close()


def test_ngram_draft_and_dynamic_mode_agree_with_the_greedy_loop(
    exl2_dir: Path, fresh_backend: ExLlamaV2Backend
) -> None:
    prompts = typing_session(fresh_backend.tokenizer, 12)
    for generation, ngram in (("forward", True), ("dynamic", False)):
        loaded = _load(exl2_dir, ngramDraft=ngram)
        other: ExLlamaV2Backend | Exl2DynamicBackend = loaded
        if generation == "dynamic":
            other = Exl2DynamicBackend(loaded, dynamic_api(loaded, ngram))
        try:
            for k, prompt in enumerate(prompts):
                a, _ = generate(other, prompt)
                b, _ = generate(fresh_backend, prompt, reuse=False)
                if a != b:
                    i = next(j for j in range(len(a)) if a[j] != b[j])
                    m = margin(fresh_backend, prompt + b[:i], a[i], b[i])
                    assert m <= TIE_MARGIN, f"{generation}/{ngram} step {k}: margin {m:.4f}"
        finally:
            other.close()
