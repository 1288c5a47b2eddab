"""The exllamav2 backend's control flow, on a deterministic fake of the exllamav2 surface.

The fake model is causal and keeps its state in the fake cache: position p's state
mixes the cached state of p-1 with token p, and the logits at p read every cached
state up to p (and, in induction mode, the cached tokens). So a wrong cache rewind,
a stale position or a token missing from the cache changes the outputs, and the
reuse tests can fail.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from exlsp.benchmarks.exl2_dynamic import DynamicGeneratorApi, Exl2DynamicBackend
from exlsp.completion.backends.base import Backend, GenerationJob, ModelInfo, common_prefix_length
from exlsp.completion.backends.exllamav2 import (
    ExLlamaV2Backend,
    ExLlamaV2LoadError,
    NgramDraft,
    StaleExtensionLockError,
    extension_build_dir,
    find_stale_extension_lock,
    import_exllamav2,
    kv_cache_bytes,
    load_exllamav2_backend,
    round_seq_len,
    safetensors_parameter_count,
)
from exlsp.completion.backends.exllamav2.extension import _lock_holder_alive
from exlsp.completion.backends.gpu import GpuOutOfMemoryError
from exlsp.completion.config import ModelConfig
from exlsp.completion.decode import decode

VOCAB = 64
EOS = 63


class FakeCache:
    def __init__(self, max_seq_len: int = 1024) -> None:
        self.max_seq_len = max_seq_len
        self.current_seq_len = 0
        self.tokens: list[int] = [-1] * max_seq_len
        self.state: list[int] = [0] * max_seq_len


def _mix(prev: int, token: int, pos: int) -> int:
    return (prev * 1_000_003 + token * 7_919 + pos * 31 + 17) % 2_147_483_647


class FakeExlModel:
    """`model.forward(input_ids, cache, last_id_only=, abort_event=)` like exllamav2's:
    processes the input in chunks, advances `cache.current_seq_len` after each one and
    returns None when `abort_event` is set before a chunk."""

    def __init__(
        self,
        *,
        induction: bool = False,
        chunk: int = 16,
        delay_s: float = 0.0,
        banned: Sequence[int] = (),
    ) -> None:
        self.induction = induction
        self.chunk = chunk
        self.delay_s = delay_s
        self.banned = set(banned)
        self.calls = 0
        self.q_lens: list[int] = []
        self.fail_on_call: int | None = None
        self.on_chunk: Callable[[int], None] | None = None
        self.unloaded = False

    def _logits(self, cache: FakeCache, pos: int) -> list[float]:
        # Like attention, the logits read every cached position up to `pos`.
        st = (cache.state[pos] + sum(cache.state[:pos])) % 2_147_483_647
        out = [float(((st * 2_654_435_761 + v * 40_503) >> 7) % 1000) for v in range(VOCAB)]
        if self.induction:
            tok = cache.tokens[pos]
            for p in range(pos - 1, -1, -1):
                if cache.tokens[p] == tok:
                    out[cache.tokens[p + 1]] += 10_000.0
                    break
        for b in self.banned:
            out[b] = -1e9
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: FakeCache,
        *,
        last_id_only: bool = False,
        abort_event: Any = None,
        **_: Any,
    ) -> torch.Tensor | None:
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        ids = [int(t) for t in input_ids[0].tolist()]
        self.q_lens.append(len(ids))
        assert cache.current_seq_len + len(ids) <= cache.max_seq_len
        if self.delay_s:
            time.sleep(self.delay_s)
        rows: list[list[float]] = []
        for begin in range(0, len(ids), self.chunk):
            if abort_event is not None and abort_event.is_set():
                return None
            past = cache.current_seq_len
            part = ids[begin : begin + self.chunk]
            for i, tok in enumerate(part):
                pos = past + i
                prev = cache.state[pos - 1] if pos > 0 else 12_345
                cache.state[pos] = _mix(prev, tok, pos)
                cache.tokens[pos] = tok
            end = past + len(part)
            want = range(end - 1, end) if last_id_only else range(past, end)
            if not last_id_only or begin + self.chunk >= len(ids):
                rows = (
                    [self._logits(cache, p) for p in want]
                    if last_id_only
                    else [*rows, *(self._logits(cache, p) for p in want)]
                )
            cache.current_seq_len = end
            if self.on_chunk is not None:
                self.on_chunk(end)
        return torch.tensor([rows], dtype=torch.float16)

    def unload(self) -> None:
        self.unloaded = True


class FakeTokenizer:
    bos_id = None
    eos_ids = frozenset({EOS})
    special_tokens: frozenset[str] = frozenset()

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(65 + i % 26) for i in ids)

    def token_to_id(self, token: str) -> int | None:
        return None


INFO = ModelInfo(path="fake", backend="exllamav2")


def make_backend(
    model: FakeExlModel | None = None, *, max_seq_len: int = 1024, **kw: Any
) -> ExLlamaV2Backend:
    return ExLlamaV2Backend(
        model or FakeExlModel(), FakeCache(max_seq_len), FakeTokenizer(), INFO, **kw
    )


def run(
    backend: ExLlamaV2Backend | Exl2DynamicBackend,
    prompt: Sequence[int],
    *,
    max_tokens: int = 12,
    stop: Sequence[int] = (EOS,),
    reuse: bool = True,
    deadline: float = float("inf"),
) -> tuple[list[int], GenerationJob]:
    job = GenerationJob(
        prompt=list(prompt),
        stop_ids=frozenset(stop),
        max_tokens=max_tokens,
        reuse_cache=reuse,
        deadline=deadline,
    )
    return list(decode(backend, job)), job


def typing_prompts(steps: int = 50) -> list[list[int]]:
    """Prompts of an editor session: header, suffix, then the cursor line as typed;
    a few backspaces, and two moves to a new line (which change the suffix)."""
    header = [(i * 7 + 3) % 60 for i in range(80)]
    suffix = [(i * 11 + 5) % 60 for i in range(20)]
    prompts = []
    typed: list[int] = []
    for k in range(steps):
        if k % 13 == 7 and typed:
            typed.pop()  # backspace
        elif k % 20 == 19:
            header = header + typed + [10]  # Enter: the line moves into the prefix
            typed = []
            suffix = suffix[1:]
        else:
            typed.append((k * 5 + 1) % 60)
        prompts.append([*header, 61, *suffix, 62, *typed])
    return prompts


# --- the protocol and reuse ----------------------------------------------------


def test_is_a_backend() -> None:
    backend: Backend = make_backend()
    assert backend.name == "exllamav2"


def test_reuse_counts_follow_the_cached_tokens_across_typing() -> None:
    backend = make_backend()
    cached: list[int] = []  # what the cache must hold after each job, by the contract
    for prompt in typing_prompts(50):
        out, job = run(backend, prompt, max_tokens=6)
        expected_reused = min(common_prefix_length(cached, prompt), len(prompt) - 1)
        assert job.stats.reused_tokens == expected_reused
        assert job.stats.prefilled_tokens == len(prompt) - expected_reused
        assert job.stats.prompt_tokens == len(prompt)
        # Stopped at max_tokens: the last token was never fed; stopped on EOS: all were.
        fed = out[:-1] if job.stats.stop_reason == "max_tokens" else out
        cached = prompt + fed
        assert backend._cached == cached
        assert backend.cache.current_seq_len == len(cached)


def test_typing_reuses_almost_everything() -> None:
    backend = make_backend()
    prompts = typing_prompts(50)
    prefilled = []
    for prompt in prompts:
        _, job = run(backend, prompt, max_tokens=4)
        prefilled.append(job.stats.prefilled_tokens)
    assert prefilled[0] == len(prompts[0])
    typed_inline = [p for k, p in enumerate(prefilled[1:], 1) if k % 20 != 19]
    assert max(typed_inline) <= 3  # a keystroke costs the changed token(s), not the prompt


def test_accepting_the_suggestion_reuses_the_generated_tokens() -> None:
    backend = make_backend()
    prompt = typing_prompts(3)[-1]
    out, _ = run(backend, prompt, max_tokens=8, stop=())
    _, job = run(backend, prompt + out[:5], max_tokens=8, stop=())
    assert job.stats.reused_tokens == len(prompt) + 4  # the 5th is the last prompt token
    assert job.stats.prefilled_tokens == 1


def test_reuse_is_exact_for_every_step_of_a_typing_sequence() -> None:
    reused = make_backend()
    fresh = make_backend()
    prompts = typing_prompts(50)
    for k, prompt in enumerate(prompts):
        a, job_a = run(reused, prompt, max_tokens=10)
        b, job_b = run(fresh, prompt, max_tokens=10, reuse=False)
        assert a == b, f"step {k}"
        assert job_b.stats.reused_tokens == 0
        if k:
            assert job_a.stats.reused_tokens > 0
    # and the fake is sensitive to the cache: corrupting one cached state changes outputs
    a, _ = run(reused, prompts[-1], max_tokens=10, stop=())
    reused.cache.state[5] += 1
    c, _ = run(reused, prompts[-1], max_tokens=10, stop=())
    assert c != a


def test_no_reuse_baseline_prefills_everything() -> None:
    backend = make_backend()
    prompt = typing_prompts(5)[-1]
    run(backend, prompt)
    _, job = run(backend, prompt, reuse=False)
    assert job.stats.reused_tokens == 0
    assert job.stats.prefilled_tokens == len(prompt)


def test_identical_prompt_prefills_its_last_token() -> None:
    backend = make_backend()
    prompt = typing_prompts(5)[-1]
    a, _ = run(backend, prompt)
    b, job = run(backend, prompt)
    assert a == b
    assert job.stats.prefilled_tokens == 1
    assert job.stats.reused_tokens == len(prompt) - 1


def test_prompt_longer_than_the_cache_keeps_its_end() -> None:
    backend = make_backend(max_seq_len=64)
    prompt = list(range(60)) * 2
    out, job = run(backend, prompt, max_tokens=8, stop=())
    assert len(out) == 8
    assert job.stats.prompt_tokens == 64 - 8
    assert backend.cache.current_seq_len <= 64


def test_generation_never_overflows_the_cache() -> None:
    backend = make_backend(max_seq_len=32)
    prompt = list(range(20))
    out, job = run(backend, prompt, max_tokens=100, stop=())
    assert job.stats.stop_reason == "max_tokens"
    assert job.stats.prompt_tokens + len(out) <= 32
    assert backend.cache.current_seq_len <= 32


# --- stopping ----------------------------------------------------------------


def test_stops_on_a_stop_id_without_yielding_it() -> None:
    backend = make_backend()
    prompt = typing_prompts(4)[-1]
    free, _ = run(backend, prompt, max_tokens=10, stop=())
    assert len(set(free[:6])) > 1
    stop = free[3]
    first = free.index(stop)
    out, job = run(backend, prompt, max_tokens=10, stop=(stop,))
    assert out == free[:first]
    assert job.stats.stop_reason == "eos"
    assert job.stats.generated_tokens == first


def test_stops_at_max_tokens() -> None:
    backend = make_backend()
    out, job = run(backend, typing_prompts(4)[-1], max_tokens=7, stop=())
    assert len(out) == 7
    assert job.stats.stop_reason == "max_tokens"
    assert job.stats.generated_tokens == 7
    assert job.stats.ttft_ms is not None and job.stats.prefill_ms > 0


def test_past_deadline_generates_nothing() -> None:
    backend = make_backend()
    out, job = run(backend, typing_prompts(4)[-1], deadline=time.monotonic() - 1)
    assert out == []
    assert job.stats.stop_reason == "deadline"


def test_deadline_stops_between_decode_steps() -> None:
    model = FakeExlModel(delay_s=0.02)
    backend = make_backend(model)
    t0 = time.monotonic()
    out, job = run(backend, [1, 2, 3], max_tokens=1000, stop=(), deadline=t0 + 0.15)
    elapsed = time.monotonic() - t0
    assert job.stats.stop_reason == "deadline"
    assert 1 <= len(out) < 50
    assert elapsed < 0.15 + 0.5  # one step past the deadline at most (plus a slow machine)


def test_cancel_stops_before_the_next_forward() -> None:
    model = FakeExlModel()
    backend = make_backend(model)
    job = GenerationJob(prompt=typing_prompts(4)[-1], stop_ids=frozenset(), max_tokens=100)
    got = []
    calls_at_cancel = 0
    for token in decode(backend, job):
        got.append(token)
        if len(got) == 3:
            job.cancel.set()
            calls_at_cancel = model.calls
    assert len(got) == 3  # nothing after the cancel
    assert model.calls == calls_at_cancel  # no forward after the cancel
    assert job.stats.stop_reason == "cancelled"


def test_cancel_from_another_thread_within_one_step() -> None:
    model = FakeExlModel(delay_s=0.01)
    backend = make_backend(model)
    job = GenerationJob(prompt=[1, 2, 3, 4], stop_ids=frozenset(), max_tokens=10_000)
    got: list[int] = []
    calls_at_cancel: list[int] = []

    def consume() -> None:
        got.extend(decode(backend, job))

    worker = threading.Thread(target=consume)
    worker.start()
    time.sleep(0.1)
    job.cancel.set()
    calls_at_cancel.append(model.calls)
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert job.stats.stop_reason == "cancelled"
    assert model.calls - calls_at_cancel[0] <= 1  # at most the step already running


def test_cancel_during_prefill_aborts_and_keeps_the_finished_chunks() -> None:
    model = FakeExlModel(chunk=16)
    backend = make_backend(model)
    prompt = [(i * 3) % 60 for i in range(100)]
    job = GenerationJob(prompt=prompt, stop_ids=frozenset(), max_tokens=5)

    def cancel_after_two_chunks(end: int) -> None:
        if end >= 32:
            job.cancel.set()

    model.on_chunk = cancel_after_two_chunks
    assert list(decode(backend, job)) == []
    assert job.stats.stop_reason == "cancelled"
    assert job.stats.prefilled_tokens == 32
    assert backend._cached == prompt[:32]
    model.on_chunk = None
    out, job2 = run(backend, prompt, max_tokens=5, stop=())
    assert job2.stats.reused_tokens == 32
    fresh, _ = run(make_backend(), prompt, max_tokens=5, stop=())
    assert out == fresh


def test_closing_the_stream_keeps_the_cache_consistent() -> None:
    backend = make_backend()
    prompt = typing_prompts(6)[-1]
    job = GenerationJob(prompt=prompt, stop_ids=frozenset(), max_tokens=20)
    stream = decode(backend, job)
    first = [next(stream) for _ in range(4)]
    stream.close()
    assert job.stats.stop_reason == "closed"
    assert backend._cached == prompt + first[:3]
    assert backend.cache.current_seq_len == len(backend._cached)


# --- n-gram drafting -----------------------------------------------------------


def repetitive_prompt() -> list[int]:
    line = [5, 9, 14, 2, 33, 7, 21, 40, 8, 3, 17, 29]
    return line * 4 + line[:5]


def test_ngram_draft_proposes_what_followed_the_last_occurrence() -> None:
    import numpy as np

    seq = np.array([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 2, 3], dtype=np.int64)
    draft = NgramDraft(max_ngram=3, min_ngram=2, max_tokens=3)
    assert draft.propose(seq, len(seq)) == [7, 8, 2]  # after the most recent "2 3"
    assert draft.propose(seq, 9) == [4, 5, 9]  # "1 2 3" seen at the start
    assert draft.propose(seq, 3) == []
    assert draft.propose(np.array([4, 4, 4, 4]), 4) == [4]  # overlapping the tail: 1 token


def test_ngram_draft_gives_the_same_tokens_with_fewer_forwards() -> None:
    prompt = repetitive_prompt()
    plain_model = FakeExlModel(induction=True)
    draft_model = FakeExlModel(induction=True)
    plain = make_backend(plain_model)
    drafted = make_backend(draft_model, ngram_draft=True)
    a, job_a = run(plain, prompt, max_tokens=40, stop=())
    b, job_b = run(drafted, prompt, max_tokens=40, stop=())
    assert a == b
    assert len(a) == 40
    assert draft_model.calls < plain_model.calls / 2
    assert max(draft_model.q_lens[1:]) > 1  # verification passes of several tokens
    assert job_a.stats.stop_reason == job_b.stats.stop_reason == "max_tokens"
    # the cache holds exactly the accepted tokens (the last one is never fed)
    assert drafted._cached == prompt + b[:-1]
    assert drafted.cache.current_seq_len == len(drafted._cached)


def test_ngram_draft_matches_plain_greedy_over_a_typing_sequence() -> None:
    plain = make_backend(FakeExlModel(induction=True))
    drafted = make_backend(FakeExlModel(induction=True), ngram_draft=True)
    for k, prompt in enumerate(typing_prompts(50)):
        a, ja = run(plain, prompt, max_tokens=12)
        b, jb = run(drafted, prompt, max_tokens=12)
        assert a == b, f"step {k}"
        assert ja.stats.stop_reason == jb.stats.stop_reason
        fresh, _ = run(make_backend(FakeExlModel(induction=True)), prompt, max_tokens=12)
        assert b == fresh, f"step {k}"


def test_ngram_draft_respects_stop_ids_and_max_tokens() -> None:
    prompt = repetitive_prompt()
    plain = make_backend(FakeExlModel(induction=True))
    free, _ = run(plain, prompt, max_tokens=30, stop=())
    stop = free[7]
    for max_tokens in (1, 2, 5, 13):
        drafted = make_backend(FakeExlModel(induction=True), ngram_draft=True)
        out, job = run(drafted, prompt, max_tokens=max_tokens, stop=())
        assert out == free[:max_tokens]
        assert job.stats.stop_reason == "max_tokens"
    drafted = make_backend(FakeExlModel(induction=True), ngram_draft=True)
    out, job = run(drafted, prompt, max_tokens=30, stop=(stop,))
    assert out == free[: free.index(stop)]
    assert job.stats.stop_reason == "eos"


# --- errors ------------------------------------------------------------------


def test_out_of_memory_while_decoding_resets_and_the_next_job_works() -> None:
    model = FakeExlModel()
    backend = make_backend(model)
    prompt = typing_prompts(8)[-1]
    run(backend, prompt)
    model.fail_on_call = model.calls + 4  # the prefill, two decode steps, then OOM
    job = GenerationJob(prompt=[*prompt, 1], stop_ids=frozenset(), max_tokens=20)
    got: list[int] = []
    with pytest.raises(GpuOutOfMemoryError, match="GPU out of memory while generating"):
        for token in decode(backend, job):
            got.append(token)
    assert len(got) == 3
    assert job.stats.stop_reason == "error"
    assert backend._cached == []
    assert backend.cache.current_seq_len == 0
    out, job2 = run(backend, [*prompt, 1], max_tokens=8, stop=())
    assert job2.stats.reused_tokens == 0
    fresh, _ = run(make_backend(), [*prompt, 1], max_tokens=8, stop=())
    assert out == fresh


def test_out_of_memory_during_prefill_is_reported() -> None:
    model = FakeExlModel()
    backend = make_backend(model)
    model.fail_on_call = 1
    with pytest.raises(GpuOutOfMemoryError):
        run(backend, [1, 2, 3])
    out, _ = run(backend, [1, 2, 3], stop=())
    assert len(out) == 12


def test_out_of_memory_memory_is_released_after_the_failed_frames_are_gone() -> None:
    import weakref

    class Scratch:
        pass

    held: list[weakref.ref[Scratch]] = []

    class Failing(FakeExlModel):
        def forward(self, *a: Any, **kw: Any) -> torch.Tensor | None:
            if self.calls == 2:
                scratch = Scratch()  # a GPU buffer the failed forward's frame holds
                held.append(weakref.ref(scratch))
                self.calls += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
            return super().forward(*a, **kw)

    backend = make_backend(Failing())
    seen: list[bool] = []
    backend._release_memory = lambda: seen.append(held[0]() is None)  # type: ignore[method-assign]
    with pytest.raises(GpuOutOfMemoryError) as err:
        run(backend, [1, 2, 3], stop=())
    assert err.value.__context__ is None  # raised outside the handler
    assert seen == [True]


def test_other_errors_reset_the_cache_and_propagate() -> None:
    class Broken(FakeExlModel):
        def forward(self, *a: Any, **kw: Any) -> torch.Tensor | None:
            if self.calls == 2:
                self.calls += 1
                raise ValueError("kernel failed")
            return super().forward(*a, **kw)

    backend = make_backend(Broken())
    job = GenerationJob(prompt=[1, 2, 3], stop_ids=frozenset(), max_tokens=5)
    with pytest.raises(ValueError, match="kernel failed"):
        list(decode(backend, job))
    assert job.stats.stop_reason == "error"
    assert backend.cache.current_seq_len == 0


def test_empty_prompt_is_refused() -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        run(make_backend(), [])


def test_close_unloads_the_model() -> None:
    model = FakeExlModel()
    closed = []
    backend = make_backend(model, on_close=lambda: closed.append(1))
    backend.close()
    assert model.unloaded and closed == [1]


# --- the dynamic generator (benchmarks/exl2_dynamic.py) ----------------------------


class FakeDynamicJob:
    def __init__(self, ids: list[int], max_new_tokens: int, stop: list[int]) -> None:
        self.ids = ids
        self.max_new_tokens = max_new_tokens
        self.stop = set(stop)
        self.cached_tokens = 0
        self.is_finished = False


class FakeDynamicGenerator:
    """Unpaged `ExLlamaV2DynamicGenerator`: one sequence, longest-common-prefix reuse,
    one token per `iterate()`; tokens with id % 5 == 0 are held back with the next one
    (exllamav2 holds tokens that end in a partial UTF-8 character)."""

    def __init__(self, model: FakeExlModel, cache: FakeCache) -> None:
        self.model = model
        self.cache = cache
        self.seq: list[int] = []  # the page's tokens (those in the cache)
        self.job: FakeDynamicJob | None = None
        self.cancelled: list[FakeDynamicJob] = []
        self.iterations = 0

    def reset_page_table(self) -> None:
        self.seq = []

    def enqueue(self, job: FakeDynamicJob) -> None:
        self.job = job
        self.started = False
        self.held: list[int] = []
        self.new = 0

    def cancel(self, job: FakeDynamicJob) -> None:
        self.cancelled.append(job)
        self.job = None

    def _step(self, ids: list[int]) -> int:
        logits = self.model.forward(torch.tensor([ids]), self.cache, last_id_only=True)
        assert logits is not None
        self.seq += ids
        return int(torch.argmax(logits[0, -1]).item())

    def iterate(self) -> list[dict[str, Any]]:
        self.iterations += 1
        job = self.job
        assert job is not None
        if not self.started:
            self.started = True
            match = min(common_prefix_length(self.seq, job.ids), len(job.ids) - 1)
            job.cached_tokens = match
            del self.seq[match:]
            self.cache.current_seq_len = match
            self.next = self._step(job.ids[match:])
            return [{"job": job, "stage": "started"}, {"job": job, "stage": "prefill"}]
        token = self.next
        self.held.append(token)
        r: dict[str, Any] = {"job": job, "stage": "streaming", "eos": False}
        if token in job.stop:
            r.update(
                eos=True, eos_reason="stop_token", held={"token_ids": torch.tensor([self.held])}
            )
            job.is_finished = True
            return [r]
        self.new += 1
        if self.new >= job.max_new_tokens:
            r.update(eos=True, eos_reason="max_new_tokens", token_ids=torch.tensor([self.held]))
            job.is_finished = True
            return [r]
        if token % 5 != 0:
            r["token_ids"] = torch.tensor([self.held])
            self.held = []
        self.next = self._step([token])
        return [r]


def make_dynamic(
    model: FakeExlModel | None = None,
) -> tuple[Exl2DynamicBackend, FakeDynamicGenerator]:
    model = model or FakeExlModel()
    cache = FakeCache()
    gens: list[FakeDynamicGenerator] = []

    def make_generator() -> FakeDynamicGenerator:
        gens.append(FakeDynamicGenerator(model, cache))
        return gens[-1]

    api = DynamicGeneratorApi(make_generator, FakeDynamicJob)
    backend = Exl2DynamicBackend(ExLlamaV2Backend(model, cache, FakeTokenizer(), INFO), api)
    run(backend, [1, 2])  # creates the generator
    return backend, gens[-1]


def test_dynamic_mode_gives_the_forward_mode_tokens() -> None:
    dynamic, _ = make_dynamic()
    forward = make_backend()
    for k, prompt in enumerate(typing_prompts(30)):
        a, ja = run(forward, prompt, max_tokens=10)
        b, jb = run(dynamic, prompt, max_tokens=10)
        assert a == b, f"step {k}"
        assert ja.stats.stop_reason == jb.stats.stop_reason
        if k:
            assert jb.stats.reused_tokens > 0
        assert jb.stats.reused_tokens + jb.stats.prefilled_tokens == len(prompt)


def test_dynamic_mode_stop_id_releases_held_tokens_but_not_the_stop() -> None:
    dynamic, _ = make_dynamic()
    prompt = typing_prompts(9)[-1]
    free, _ = run(make_backend(), prompt, max_tokens=20, stop=())
    stop = next(t for t in free[2:] if t % 5 != 0)
    out, job = run(dynamic, prompt, max_tokens=20, stop=(stop,))
    assert out == free[: free.index(stop)]
    assert job.stats.stop_reason == "eos"


def test_dynamic_mode_cancel_cancels_the_generator_job() -> None:
    dynamic, gen = make_dynamic()
    job = GenerationJob(prompt=[4, 5, 6], stop_ids=frozenset(), max_tokens=100)
    got = []
    for token in decode(dynamic, job):
        got.append(token)
        if len(got) == 2:
            job.cancel.set()
            iterations = gen.iterations
    assert len(got) == 2
    assert gen.iterations == iterations
    assert gen.cancelled and job.stats.stop_reason == "cancelled"


def test_dynamic_mode_out_of_memory_rebuilds_the_generator() -> None:
    model = FakeExlModel()
    dynamic, gen = make_dynamic(model)
    model.fail_on_call = model.calls + 3
    with pytest.raises(GpuOutOfMemoryError):
        run(dynamic, [7, 8, 9], max_tokens=10, stop=())
    out, _ = run(dynamic, [7, 8, 9], max_tokens=10, stop=())
    assert dynamic._generator is not gen
    assert out == run(make_backend(), [7, 8, 9], max_tokens=10, stop=())[0]


# --- the build lock, the loader, model facts -------------------------------------


def test_stale_build_lock_is_reported_with_its_path(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.write_text("")
    (tmp_path / "build.ninja").write_text("")
    old = time.time() - 3600
    for p in (lock, tmp_path / "build.ninja"):
        os.utime(p, (old, old))
    stale = find_stale_extension_lock(tmp_path, holder_alive=lambda _: False)
    assert stale is not None and stale[0] == lock
    message = str(StaleExtensionLockError(*stale))
    assert str(lock) in message and "rm " in message and "60 min" in message


def test_fresh_or_held_or_active_lock_is_not_stale(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.write_text("")
    assert find_stale_extension_lock(tmp_path, holder_alive=lambda _: False) is None  # new
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert find_stale_extension_lock(tmp_path, holder_alive=lambda _: True) is None  # held
    (tmp_path / "q_gemm.cuda.o").write_text("")  # a build elsewhere is writing objects
    assert find_stale_extension_lock(tmp_path, holder_alive=lambda _: False) is None
    assert find_stale_extension_lock(tmp_path / "missing") is None


def test_a_lock_held_open_by_a_live_process_is_seen(tmp_path: Path) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc on this system")
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # what torch's FileBaton does
    try:
        assert _lock_holder_alive(lock) is True
    finally:
        os.close(fd)
    assert _lock_holder_alive(lock) is False


def test_import_refuses_a_stale_lock_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = tmp_path / "exllamav2_ext"
    build.mkdir()
    lock = build / "lock"
    lock.write_text("")
    old = time.time() - 1800
    os.utime(lock, (old, old))
    os.utime(build, (old, old))
    assert extension_build_dir() == build
    monkeypatch.delitem(sys.modules, "exllamav2", raising=False)
    with pytest.raises(StaleExtensionLockError) as err:
        import_exllamav2()
    assert f"rm '{lock}'" in str(err.value)


def test_default_build_dir_follows_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    path = extension_build_dir()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    accel = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    assert path.name == "exllamav2_ext"
    assert path.parent.name.startswith(tag) and path.parent.name.endswith("_" + accel)
    assert str(path).startswith("/x/cache/torch_extensions/")


def test_loader_without_a_gpu_says_so(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    (tmp_path / "config.json").write_text("{}")
    config = ModelConfig(path=str(tmp_path), backend="exllamav2")
    with pytest.raises(ExLlamaV2LoadError, match="needs a CUDA GPU"):
        load_exllamav2_backend(config)


def test_loader_checks_its_settings(tmp_path: Path) -> None:
    with pytest.raises(ExLlamaV2LoadError, match=r"model\.path"):
        load_exllamav2_backend(ModelConfig(backend="exllamav2"))
    with pytest.raises(ExLlamaV2LoadError, match=r"no config\.json"):
        load_exllamav2_backend(ModelConfig(path=str(tmp_path), backend="exllamav2"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ExLlamaV2LoadError, match="cacheType"):
        load_exllamav2_backend(ModelConfig(path=str(tmp_path), cacheType="fp8"))


def test_the_retired_generation_mode_setting_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("EXLSP_EXLLAMAV2_GENERATION", "dynamic")
    with pytest.raises(ExLlamaV2LoadError, match=r"benchmarks/exl2_dynamic\.py"):
        load_exllamav2_backend(ModelConfig(path=str(tmp_path), backend="exllamav2"))


def test_seq_len_rounding_and_cache_size() -> None:
    assert round_seq_len(1) == 256
    assert round_seq_len(8192) == 8192
    assert round_seq_len(8193) == 8448
    cfg = {
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "hidden_size": 1536,
    }
    fp16 = kv_cache_bytes(cfg, 8192, "fp16")
    assert fp16 == 28 * 8192 * 2 * 128 * 4  # 224 MiB for Qwen2.5-1.5B
    assert kv_cache_bytes(cfg, 8192, "q4") < kv_cache_bytes(cfg, 8192, "q8") < fp16


def test_parameter_count_from_headers_counts_exl2_layers_unpacked(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(100, 32, dtype=torch.float16),
            "model.layers.0.mlp.up_proj.q_weight": torch.zeros(16, 48, dtype=torch.int32),
            "model.layers.0.mlp.up_proj.q_invperm": torch.zeros(128, dtype=torch.int32),
            "model.layers.0.mlp.up_proj.q_scale": torch.zeros(4, 48, dtype=torch.int32),
            "model.layers.0.mlp.up_proj.q_scale_max": torch.zeros(4, dtype=torch.float16),
            "model.layers.0.mlp.up_proj.q_groups": torch.zeros(8, dtype=torch.int16),
            "model.norm.weight": torch.zeros(32, dtype=torch.float16),
        },
        str(tmp_path / "output.safetensors"),
    )
    assert safetensors_parameter_count(tmp_path) == 100 * 32 + 128 * 48 + 32
    assert safetensors_parameter_count(tmp_path / "none") is None


# -- a cache of its own for background work -----------------------------------------


def background_job(prompt: Sequence[int], max_tokens: int = 4) -> GenerationJob:
    return GenerationJob(
        prompt=list(prompt), stop_ids=frozenset({EOS}), max_tokens=max_tokens, slot="background"
    )


def test_background_jobs_keep_the_completion_cache() -> None:
    made: list[FakeCache] = []

    def factory() -> FakeCache:
        made.append(FakeCache(1024))
        return made[-1]

    backend = make_backend(cache_factory=factory)
    fresh = make_backend()
    prompt = [(i * 7 + 3) % 60 for i in range(200)]
    run(backend, prompt)
    hover = [(i * 5 + 1) % 60 for i in range(150)]
    hover_out = list(decode(backend, background_job(hover)))
    assert len(made) == 1  # made at the first background job
    assert hover_out == list(decode(fresh, background_job(hover)))
    out, job = run(backend, [*prompt, 9])
    assert job.stats.reused_tokens == len(prompt)  # the completion cache survived the hover
    assert out == run(fresh, [*prompt, 9], reuse=False)[0]
    again = background_job([*hover, 11])
    list(decode(backend, again))
    assert again.stats.reused_tokens == len(hover)  # and the background cache its own
    assert len(made) == 1


def test_without_memory_for_a_second_cache_background_work_shares_the_one() -> None:
    tries = 0

    def factory() -> FakeCache:
        nonlocal tries
        tries += 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    backend = make_backend(cache_factory=factory)
    prompt = [(i * 7 + 3) % 60 for i in range(100)]
    run(backend, prompt)
    hover = background_job([(i * 5 + 1) % 60 for i in range(50)])
    assert list(decode(backend, hover))  # served, on the shared cache
    _, job = run(backend, [*prompt, 9])
    assert job.stats.reused_tokens == 0  # the hover displaced the completion's prompt
    list(decode(backend, background_job([1, 2, 3])))
    assert tries == 1  # no second try at the allocation


# --- loading on a fake exllamav2 module ------------------------------------------------


class FakeExl2Module:
    """The part of exllamav2 the loader calls; `load_error` is raised by load_autosplit."""

    load_error: ClassVar[BaseException] = RuntimeError("set by the test")
    unloaded: ClassVar[list[Any]] = []

    class ExLlamaV2Config:
        def __init__(self, path: str) -> None:
            self.max_input_len = 2048

        def arch_compat_overrides(self, quiet: bool = False) -> None:
            pass

    class ExLlamaV2:
        def __init__(self, config: Any) -> None:
            self.config = config

        def load_autosplit(self, cache: Any, progress: bool = False) -> None:
            raise FakeExl2Module.load_error

        def unload(self) -> None:
            FakeExl2Module.unloaded.append(self)

    class ExLlamaV2Cache_Q4:
        def __init__(self, model: Any, max_seq_len: int, lazy: bool = False) -> None:
            self.model = model


def _fake_exl2_load(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    from exlsp.completion.backends import gpu
    from exlsp.completion.backends.exllamav2 import loader as exl2_loader

    d = tmp_path / "exl2"
    d.mkdir()
    for f in tiny_model.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(gpu, "cuda_summary", lambda _t: ("Fake GPU", 10.0, 16.0))
    monkeypatch.setattr(exl2_loader, "import_exllamav2", lambda _torch: FakeExl2Module)
    monkeypatch.setattr(FakeExl2Module, "load_error", error)
    monkeypatch.setattr(FakeExl2Module, "unloaded", [])
    load_exllamav2_backend(
        ModelConfig(path=str(d), backend="exllamav2", maxSeqLen=1000, cacheType="q4")
    )


def test_out_of_memory_at_load_unloads_and_says_what_did_not_fit(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB\nmore detail")
    with pytest.raises(GpuOutOfMemoryError) as info:
        _fake_exl2_load(tiny_model, tmp_path, monkeypatch, oom)
    assert re.fullmatch(
        r"not enough GPU memory for exl2: weights 0\.00 GiB \+ q4 KV cache \d+\.\d\d GiB "
        r"\(maxSeqLen 1024\) > 10\.00 GiB free of 16\.00 GiB on Fake GPU; lower "
        r"model\.maxSeqLen or cacheType \(CUDA out of memory\. Tried to allocate 1 GiB\)",
        str(info.value),
    ), str(info.value)
    assert len(FakeExl2Module.unloaded) == 1  # what the failed load placed is freed


def test_other_errors_at_load_propagate_as_they_are(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="unsupported architecture"):
        _fake_exl2_load(tiny_model, tmp_path, monkeypatch, ValueError("unsupported architecture"))
    assert FakeExl2Module.unloaded == []
