"""The exllamav3 backend on CPU, against a fake of the exllamav3 surface it drives.

exllamav3 is never imported here. `FakeExl3` mirrors what the backend uses of
exllamav3 1.6.5, each behaviour from the source named next to it (paths under
exllamav3/ in the wheel or github.com/turboderp-org/exllamav3). The fake model
computes the next token from the tokens in the cache pages the job's block
table points to (its "K/V"), never from the job's prompt: a page reused with the
wrong contents changes the output, so the reuse tests can fail.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from exlsp.completion.backends import gpu
from exlsp.completion.backends.base import GenerationJob, ModelInfo, common_prefix_length
from exlsp.completion.backends.exllamav3 import (
    PAGE_SIZE,
    ExLlamaV3Backend,
    ExLlamaV3LoadError,
    GeneratorSettings,
    is_exl3_model,
    is_recurrent_architecture,
    load_exllamav3_backend,
)
from exlsp.completion.backends.exllamav3 import loader as exl3_loader
from exlsp.completion.backends.gpu import GpuOutOfMemoryError
from exlsp.completion.config import ModelConfig
from exlsp.completion.decode import decode
from exlsp.completion.service import ModelLoadError, create_backend

VOCAB = 97


class FakeTokenizer:
    """The project-side tokenizer (prompts arrive as ids): unused by these tests."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(32 + i) for i in ids)


class FakeModel:
    """The loaded model: `caps` (model/model.py, architecture/*.py `caps`), a token
    function over the cached K/V, and failure injection."""

    def __init__(self, recurrent: bool = False, cyclic: bool = False) -> None:
        self.cyclic = cyclic  # continues 1..6 cycles: an n-gram drafter's best case
        self.caps = {"recurrent_states": True} if recurrent else {}
        self.forwarded = 0  # tokens run through the model
        self.fail_prefill: BaseException | None = None
        self.fail_step: BaseException | None = None
        self.unloaded = False

    def next_token(self, kv: list[int]) -> int:
        if self.cyclic:
            return kv[-1] % 6 + 1
        # A function of every cached token and its position.
        return hash(tuple(kv)) % VOCAB

    def unload(self) -> None:
        self.unloaded = True


class FakeCache:
    """cache/cache.py `Cache(model, max_num_tokens, layer_type, **kwargs)`."""

    def __init__(self, model: FakeModel, max_num_tokens: int, **kwargs: Any) -> None:
        assert max_num_tokens % PAGE_SIZE == 0  # cache/fp16.py, cache/quant.py
        self.model = model
        self.max_num_tokens = max_num_tokens
        self.kwargs = kwargs


class Page:
    def __init__(self, index: int) -> None:
        self.page_index = index
        self.phash: Any = ("free", index)  # pagetable.py reset_page_table: a random hash
        self.prev_hash: Any = None
        self.sequence: list[int] = []  # the page's tokens (its K/V, for the fake model)
        self.ref_count = 0
        self.access_serial = 0

    @property
    def kv_position(self) -> int:
        return len(self.sequence)


def _chain_hashes(ids: list[int]) -> list[Any]:
    """generator/pagetable.py `Sequence.prepare`: one hash per full page of the
    prompt, chained through the previous page's hash."""
    hashes: list[Any] = []
    prev: Any = None
    for p in range(len(ids) // PAGE_SIZE):
        prev = (prev, tuple(ids[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]))
        hashes.append(prev)
    return hashes


class FakeSeq:
    def __init__(self, ids: list[int]) -> None:
        self.sequence_ids = list(ids)
        self.input_len = len(ids)
        self.kv_position = 0  # job.py prefill / receive_sample
        self.allocated_pages: list[Page] = []
        # Only pages whose tokens all go through prefill (the last prompt token runs in
        # the first generation step: job.py prefill `min(prefill_end, len - 1)`).
        self.page_hashes = _chain_hashes(ids[: len(ids) - 1])


class FakeJob:
    """generator/job.py `Job`: one sequence, max_new_tokens, stop_conditions (token
    ids), `cached_pages` / `cached_tokens` metrics, `is_finished`."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int | None = None,
        stop_conditions: list[int] | None = None,
        sampler: Any = None,
        decode_special_tokens: bool = False,
        **kwargs: Any,
    ) -> None:
        assert input_ids.device.type == "cpu" and input_ids.shape[0] == 1
        assert max_new_tokens is None or max_new_tokens >= 1  # Job.__init__
        assert isinstance(sampler, FakeArgmaxSampler)
        self.sequences = [FakeSeq([int(t) for t in input_ids[0].tolist()])]
        self.max_new_tokens = max_new_tokens
        self.stop_tokens = set(stop_conditions or ())
        self.new_tokens = 0
        self.cached_pages = 0
        self.cached_tokens = 0
        self.is_finished = False
        self.prefill_done = False
        self.sam: list[int] = []


class FakeArgmaxSampler:
    """generator/sampler/presets.py `ArgmaxSampler`."""


class FakeGenerator:
    """generator/generator.py `Generator` with generator/pagetable.py's page table."""

    instances: ClassVar[list[FakeGenerator]] = []

    def __init__(
        self,
        model: FakeModel,
        cache: FakeCache,
        tokenizer: Any,
        max_batch_size: int = 256,
        max_chunk_size: int = 2048,
        cpu_cache_size: int = 0,
        disk_cache_dir: str | None = None,
        disk_cache_size: int = 50 * 1024**3,
        ngram_match_min: int = 0,
        num_draft_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Generator.__init__: the disk tier writes through the CPU tier.
        if disk_cache_dir and not cpu_cache_size:
            raise ValueError("disk_cache_dir needs a CPU page cache tier")
        self.model = model
        self.cache = cache
        self.kwargs = dict(kwargs, max_batch_size=max_batch_size)
        self.max_chunk_size = max_chunk_size
        self.pages = [Page(i) for i in range(cache.max_num_tokens // PAGE_SIZE)]
        self.serial = 0
        self.pending_jobs: list[FakeJob] = []
        self.active_jobs: list[FakeJob] = []
        self.ngram_match_min = ngram_match_min
        self.num_draft_tokens = (num_draft_tokens or 4) if ngram_match_min else 0
        self.recurrent = bool(model.caps.get("recurrent_states"))
        # generator/cpu_cache.py CPUPageCache: complete pages evicted from VRAM, by hash.
        self.cpu_budget = cpu_cache_size // (PAGE_SIZE * 8)
        self.cpu_tier: dict[Any, list[int]] = {}
        # generator/disk_cache.py DiskPageCache: a per-model directory, read in a later process.
        self.disk_file = (
            Path(disk_cache_dir) / "fake-model" / "pages.json" if disk_cache_dir else None
        )
        self.disk_tier: dict[Any, list[int]] = {}
        if self.disk_file is not None and self.disk_file.is_file():
            for entry in json.loads(self.disk_file.read_text()):
                self.disk_tier[_freeze(entry[0])] = entry[1]
        self.on_iterate: Callable[[FakeGenerator], None] | None = None
        self.closed = False
        self.cancelled: list[FakeJob] = []
        self.steps_with_drafts = 0
        FakeGenerator.instances.append(self)

    # -- the page table (pagetable.py PageTable.allocate_pages / deallocate_pages) --

    def _find(self, h: Any) -> Page | None:
        for page in self.pages:
            if page.phash == h and page.kv_position == PAGE_SIZE:
                return page
        return None

    def _evict(self) -> Page:
        free = [p for p in self.pages if p.ref_count == 0]
        if not free:
            raise RuntimeError("cache full")
        page = min(free, key=lambda p: p.access_serial)
        if self.cpu_budget and page.kv_position == PAGE_SIZE and page.phash[0] != "free":
            self.cpu_tier[page.phash] = list(page.sequence)
            while len(self.cpu_tier) > self.cpu_budget:
                self.cpu_tier.pop(next(iter(self.cpu_tier)))
        page.phash = ("free", page.page_index, self.serial)
        page.prev_hash = None
        page.sequence = []
        return page

    def _allocate(self, job: FakeJob) -> None:
        seq = job.sequences[0]
        need = -(-(len(seq.sequence_ids) + job.max_new_tokens + self.num_draft_tokens) // PAGE_SIZE)
        pages: list[Page] = []
        cached = 0
        for h in seq.page_hashes:
            page = self._find(h)
            if page is None:
                tokens = self.cpu_tier.get(h) or self.disk_tier.get(h)
                if tokens is None:
                    break
                page = self._evict()  # restored from a tier instead of recomputed
                page.phash, page.sequence = h, list(tokens)
                page.prev_hash = h[0]
            page.ref_count += 1  # referenced at once: a later restore must not evict it
            pages.append(page)
            cached += 1
        while len(pages) < need:
            page = self._evict()
            page.ref_count += 1
            pages.append(page)
        for page in pages:
            self.serial += 1
            page.access_serial = self.serial
        seq.allocated_pages = pages
        seq.kv_position = cached * PAGE_SIZE
        job.cached_pages += cached  # Job.allocate_pages: metrics

    def _release(self, job: FakeJob) -> None:
        for page in job.sequences[0].allocated_pages:
            page.ref_count -= 1
        job.sequences[0].allocated_pages = []

    # -- the model over the pages --------------------------------------------

    def _write(self, job: FakeJob, tokens: list[int]) -> None:
        """Forward `tokens` at the job's position: their K/V go into its pages."""
        seq = job.sequences[0]
        for t in tokens:
            p = seq.kv_position // PAGE_SIZE
            page = seq.allocated_pages[p]
            if seq.kv_position % PAGE_SIZE == 0:
                # A page is linked to the previous page's hash (pagetable.py CachePage.prev_hash).
                page.prev_hash = seq.allocated_pages[p - 1].phash if p else None
            del page.sequence[seq.kv_position % PAGE_SIZE :]
            page.sequence.append(t)
            seq.kv_position += 1
            if page.kv_position == PAGE_SIZE:
                # job.py hash_completed_page: a complete page is published by its chain hash.
                page.phash = (page.prev_hash, tuple(page.sequence))
        self.model.forwarded += len(tokens)

    def _kv(self, job: FakeJob) -> list[int]:
        seq = job.sequences[0]
        out: list[int] = []
        for page in seq.allocated_pages:
            out += page.sequence
        return out[: seq.kv_position]

    def _prefill(self, job: FakeJob, results: list[dict[str, Any]]) -> None:
        """job.py `Job.prefill`: one chunk (page-aligned end, never the last prompt
        token), after copying the best partial page match from any cached page."""
        seq = job.sequences[0]
        end = min(
            (seq.kv_position + self.max_chunk_size) // PAGE_SIZE * PAGE_SIZE,
            len(seq.sequence_ids) - 1,
        )
        start = seq.kv_position
        if end > start and start % PAGE_SIZE == 0 and not self.recurrent:
            # job.py prefill: the partial-page match (skipped for recurrent models).
            p0 = start // PAGE_SIZE
            prev = seq.allocated_pages[p0 - 1].phash if p0 else None
            ids = seq.sequence_ids[start:end]
            best, best_page = 0, None
            for page in self.pages:
                if page.prev_hash != prev or page is seq.allocated_pages[p0]:
                    continue
                match = common_prefix_length(page.sequence, ids)
                if match > best:
                    best, best_page = match, page
            if best_page is not None and best > 1:
                seq.allocated_pages[p0].sequence = list(best_page.sequence[:best])
                seq.allocated_pages[p0].prev_hash = prev
                seq.kv_position += best
                job.cached_tokens += best
                start += best
        if end > start:
            if self.model.fail_prefill is not None:
                raise self.model.fail_prefill
            self._write(job, seq.sequence_ids[start:end])
        if seq.kv_position >= len(seq.sequence_ids) - 1:
            job.prefill_done = True
        results.append({"job": job, "stage": "prefill", "eos": False})

    def _draft(self, job: FakeJob) -> list[int]:
        """job.py get_ngram_draft: what followed the last occurrence of the current suffix."""
        ids = job.sequences[0].sequence_ids
        n = self.ngram_match_min
        suffix = ids[-n:]
        for i in range(len(ids) - n - 1, -1, -1):
            if ids[i : i + n] == suffix:
                return ids[i + n : i + n + self.num_draft_tokens]
        return []

    def _generate(self, job: FakeJob, results: list[dict[str, Any]]) -> None:
        """generator.py iterate_gen / job.py receive_sample: forward the last token (and a
        draft), accept the draft while it matches the argmax, stop tokens end the job
        unemitted, max_new_tokens ends it after the token."""
        if self.model.fail_step is not None:
            raise self.model.fail_step
        seq = job.sequences[0]
        draft = self._draft(job) if self.ngram_match_min else []
        emitted: list[int] = []
        eos_reason = None
        pending = [seq.sequence_ids[-1], *draft]
        self._write(job, pending[:1])
        for i in range(len(pending)):
            token = self.model.next_token(self._kv(job))
            if token in job.stop_tokens:
                eos_reason = "stop_token"
                break
            seq.sequence_ids.append(token)
            emitted.append(token)
            job.new_tokens += 1
            if job.new_tokens >= job.max_new_tokens:
                eos_reason = "max_new_tokens"
                break
            if i + 1 < len(pending) and pending[i + 1] == token:
                self._write(job, [token])  # the accepted draft token's K/V
                continue
            break
        if len(emitted) > 1:
            self.steps_with_drafts += 1
        r: dict[str, Any] = {"job": job, "stage": "streaming", "eos": eos_reason is not None}
        if emitted:
            r["token_ids"] = torch.tensor([emitted], dtype=torch.long)
        if eos_reason:
            r["eos_reason"] = eos_reason
            r["cached_pages"] = job.cached_pages
            r["cached_tokens"] = job.cached_pages * PAGE_SIZE + job.cached_tokens
            job.is_finished = True
            self._release(job)
            self.active_jobs.remove(job)
        results.append(r)

    # -- the public surface ----------------------------------------------------

    def enqueue(self, job: FakeJob) -> int:
        # Job.prepare_for_queue: the request must fit the cache.
        room = (
            len(self.pages) * PAGE_SIZE
            - len(job.sequences[0].sequence_ids)
            - 1
            - self.num_draft_tokens
        )
        assert room >= 1
        job.max_new_tokens = min(job.max_new_tokens or room, room)
        self.pending_jobs.append(job)
        return 0

    def cancel(self, job: FakeJob) -> None:
        """Generator.cancel: release the job's pages (their contents stay cached)."""
        self.cancelled.append(job)
        if job in self.pending_jobs:
            self.pending_jobs.remove(job)
        elif job in self.active_jobs:
            self._release(job)
            self.active_jobs.remove(job)

    def clear_queue(self) -> None:
        for job in list(self.active_jobs):
            self._release(job)
        self.active_jobs.clear()
        self.pending_jobs.clear()

    def iterate(self) -> list[dict[str, Any]]:
        """Generator.iterate: start pending jobs, one prefill chunk per job, then one
        generation step for every job whose prefill is done (in the same call); a
        failed prefill becomes an error result (Generator.reap_failed_job)."""
        assert not self.closed
        if self.on_iterate is not None:
            self.on_iterate(self)
        results: list[dict[str, Any]] = []
        for job in list(self.pending_jobs):
            self.pending_jobs.remove(job)
            self.active_jobs.append(job)
            self._allocate(job)
            results.append({"job": job, "stage": "started", "eos": False})
        for job in list(self.active_jobs):
            if not job.prefill_done:
                try:
                    self._prefill(job, results)
                except Exception as e:
                    self._release(job)
                    self.active_jobs.remove(job)
                    results.append({"job": job, "stage": "error", "eos": True, "error": e})
        for job in list(self.active_jobs):
            if job.prefill_done:
                self._generate(job, results)
        return results

    def get_cache_stats(self) -> dict[str, Any]:
        return {"page_size": PAGE_SIZE, "tier_cached_tokens": len(self.cpu_tier) * PAGE_SIZE}

    def flush_cache_to_disk(self, wait: bool = False) -> dict[str, Any]:
        """Generator.flush_cache_to_disk: every complete page goes to the disk tier."""
        assert self.disk_file is not None
        for page in self.pages:
            if page.kv_position == PAGE_SIZE and page.phash[0] != "free":
                self.disk_tier[page.phash] = list(page.sequence)
        self.disk_tier.update(self.cpu_tier)
        self.disk_file.parent.mkdir(parents=True, exist_ok=True)
        self.disk_file.write_text(json.dumps([[_thaw(h), t] for h, t in self.disk_tier.items()]))
        return {}

    @property
    def disk_page_cache(self) -> Any:
        return self.disk_file

    def close(self) -> None:
        """Generator.close: flushes to the disk tier, then releases the tiers."""
        if self.disk_file is not None:
            self.flush_cache_to_disk()
        self.closed = True


def _thaw(h: Any) -> Any:
    return None if h is None else [_thaw(h[0]), list(h[1])]


def _freeze(h: Any) -> Any:
    return None if h is None else (_freeze(h[0]), tuple(h[1]))


class FakeExl3:
    """The module surface: `Generator`, `Job`, `ArgmaxSampler` (exllamav3/__init__.py),
    and for the loader `Config`, `Model`, `Cache`, `CacheLayer_quant`, `Tokenizer`."""

    Generator = FakeGenerator
    Job = FakeJob
    ArgmaxSampler = FakeArgmaxSampler
    Cache = FakeCache

    class CacheLayer_quant:  # exllamav3's name
        pass

    class Config:
        @staticmethod
        def from_directory(directory: str) -> dict[str, str]:
            return {"directory": directory}

    load_error: BaseException | None = None
    recurrent = False

    class Model:
        @staticmethod
        def from_config(config: Any) -> FakeModel:
            model = FakeModel(recurrent=FakeExl3.recurrent)
            model.load = _loader(model)  # type: ignore[attr-defined]
            return model

    class Tokenizer:
        @staticmethod
        def from_config(config: Any) -> object:
            return object()


def _loader(model: FakeModel) -> Callable[..., None]:
    def load(**kwargs: Any) -> None:
        if FakeExl3.load_error is not None:
            raise FakeExl3.load_error

    return load


def make_backend(
    *,
    recurrent: bool = False,
    settings: GeneratorSettings | None = None,
    pages: int = 16,
    model: FakeModel | None = None,
) -> ExLlamaV3Backend:
    model = model or FakeModel(recurrent=recurrent)
    cache = FakeCache(model, pages * PAGE_SIZE)
    info = ModelInfo(path="fake", backend="exllamav3", context_length=pages * PAGE_SIZE)
    return ExLlamaV3Backend(
        FakeExl3,
        model,
        cache,
        object(),
        FakeTokenizer(),  # type: ignore[arg-type]
        info,
        settings=settings or GeneratorSettings(max_chunk_size=2048),
        recurrent=recurrent,
    )


def run(backend: Any, prompt: list[int], **kw: Any) -> tuple[list[int], GenerationJob]:
    job = GenerationJob(
        prompt=prompt, stop_ids=frozenset(kw.pop("stop_ids", ())), **{"max_tokens": 8, **kw}
    )
    return list(decode(backend, job)), job


def prompt_of(n: int, seed: int = 1) -> list[int]:
    return [(i * 7 + seed * 13 + i * i) % VOCAB for i in range(n)]


# --- reuse -------------------------------------------------------------------------


def test_keystrokes_reuse_agrees_with_a_fresh_cache() -> None:
    """60 keystrokes typing at the end of a 700-token prompt: every completion is the
    fresh cache's, the reuse is what the generator reported, and an in-line keystroke
    prefills at most 16 tokens."""
    backend = make_backend()
    text = prompt_of(700)
    inline = 0
    for k in range(60):
        # A typed token, or every tenth keystroke a deletion.
        text = text[:-3] if k % 10 == 9 else [*text, (k * 11) % VOCAB]
        tokens, job = run(backend, text)
        fresh_tokens, fresh_job = run(make_backend(), text)
        assert tokens == fresh_tokens
        assert fresh_job.stats.reused_tokens == 0
        stats = job.stats
        assert stats.prompt_tokens == len(text)
        assert stats.reused_tokens + stats.prefilled_tokens == len(text)
        assert stats.generated_tokens == len(tokens) == 8
        if k:
            assert stats.prefilled_tokens <= 16
            inline += 1
    assert inline == 59


def test_partial_page_is_reused_to_the_token() -> None:
    """The prompt diverges inside its third page: two whole pages come from the page
    table and the third's matching tokens from the partial-page copy (job.cached_tokens)."""
    backend = make_backend()
    a = prompt_of(700)
    run(backend, a)
    b = [*a[:600], 5, 6, 7]
    _, job = run(backend, b)
    assert job.stats.reused_tokens == 600
    assert job.stats.prefilled_tokens == 3
    gen = FakeGenerator.instances[-1]
    assert gen.model.forwarded  # the model ran


def test_recurrent_model_reuse_snaps_to_pages() -> None:
    backend = make_backend(recurrent=True)
    a = prompt_of(700)
    run(backend, a)
    _, job = run(backend, [*a[:600], 5, 6, 7])
    assert job.stats.reused_tokens == 2 * PAGE_SIZE
    assert job.stats.prefilled_tokens == 603 - 2 * PAGE_SIZE


def test_no_reuse_baseline_starts_a_fresh_page_table() -> None:
    backend = make_backend()
    a = prompt_of(600)
    run(backend, a)
    first = FakeGenerator.instances[-1]
    tokens, job = run(backend, a, reuse_cache=False)
    assert first.closed and FakeGenerator.instances[-1] is not first
    assert job.stats.reused_tokens == 0
    assert job.stats.prefilled_tokens == 600
    assert tokens == run(make_backend(), a)[0]


# --- cancellation, deadline, stop ids, max tokens ---------------------------------------


def test_cancel_during_prefill_stops_within_one_chunk_and_keeps_it() -> None:
    backend = make_backend(settings=GeneratorSettings(max_chunk_size=256))
    a = prompt_of(1000)
    job = GenerationJob(prompt=a, stop_ids=frozenset(), max_tokens=8)
    calls = 0

    def cancel_in_second(gen: FakeGenerator) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first call started the job and ran one chunk
            job.cancel.set()  # arrives while the second chunk runs

    gen = backend.generator()
    gen.on_iterate = cancel_in_second
    assert list(decode(backend, job)) == []
    assert job.stats.stop_reason == "cancelled"
    # Cancelled while the second chunk ran: it finished, the third never started.
    assert job.stats.prefilled_tokens == 2 * 256
    assert calls == 2
    assert gen.cancelled and not gen.active_jobs
    assert all(p.ref_count == 0 for p in gen.pages)
    gen.on_iterate = None
    _, again = run(backend, a)
    assert again.stats.reused_tokens == 2 * 256  # the chunks that ran stayed cached


def test_background_jobs_prefill_in_short_chunks() -> None:
    """A hover or code-action job prefills one page a pass, so a completion that
    preempts it (cancels it) waits for one page; completions keep their chunk."""
    backend = make_backend(settings=GeneratorSettings(max_chunk_size=1024))
    gen = backend.generator()
    seen: list[int] = []
    job = GenerationJob(
        prompt=prompt_of(1000), stop_ids=frozenset(), max_tokens=4, slot="background"
    )
    gen.on_iterate = lambda g: (seen.append(g.max_chunk_size), job.cancel.set())
    assert list(decode(backend, job)) == []
    assert job.stats.prefilled_tokens == PAGE_SIZE
    gen.on_iterate = None
    _, main = run(backend, prompt_of(1000, seed=3))
    assert main.stats.prefilled_tokens == 1000  # whole chunks of 1024
    assert seen == [PAGE_SIZE]
    assert gen.max_chunk_size == 1024


def test_deadline_stops_a_prefill() -> None:
    backend = make_backend(settings=GeneratorSettings(max_chunk_size=256))
    job = GenerationJob(prompt=prompt_of(1000), stop_ids=frozenset(), max_tokens=8)
    gen = backend.generator()

    def expire(_: FakeGenerator) -> None:
        job.deadline = 0.0

    gen.on_iterate = expire
    assert list(decode(backend, job)) == []
    assert job.stats.stop_reason == "deadline"
    assert gen.cancelled


def test_cancel_during_decode() -> None:
    backend = make_backend()
    job = GenerationJob(prompt=prompt_of(300), stop_ids=frozenset(), max_tokens=50)
    out = []
    for token in decode(backend, job):
        out.append(token)
        if len(out) == 3:
            job.cancel.set()
    assert len(out) == 3
    assert job.stats.stop_reason == "cancelled"
    gen = FakeGenerator.instances[-1]
    assert gen.cancelled and not gen.active_jobs


def test_stop_id_ends_the_job_in_the_generator() -> None:
    backend = make_backend()
    a = prompt_of(300)
    free, _ = run(backend, a, max_tokens=10)
    stop = free[4]
    tokens, job = run(make_backend(), a, max_tokens=10, stop_ids={stop})
    assert tokens == free[: free.index(stop)]
    assert job.stats.stop_reason == "eos"
    gen = FakeGenerator.instances[-1]
    assert not gen.cancelled  # the generator ended it itself (stop_conditions)


def test_max_tokens() -> None:
    tokens, job = run(make_backend(), prompt_of(300), max_tokens=5)
    assert len(tokens) == 5
    assert job.stats.stop_reason == "max_tokens"


def test_ngram_draft_steps_give_several_tokens_and_the_same_output() -> None:
    # A repetitive prompt: the drafter finds matches.
    a = [1, 2, 3, 4, 5, 6] * 60
    plain, _ = run(make_backend(model=FakeModel(cyclic=True)), a, max_tokens=40)
    assert plain == ([1, 2, 3, 4, 5, 6] * 7)[:40]
    drafted = make_backend(
        model=FakeModel(cyclic=True), settings=GeneratorSettings(ngram_draft=True)
    )
    gen_kwargs = drafted.settings.kwargs()
    assert gen_kwargs["ngram_match_min"] >= 1 and gen_kwargs["num_draft_tokens"] == 4
    tokens, job = run(drafted, a, max_tokens=40)
    assert tokens == plain
    assert FakeGenerator.instances[-1].steps_with_drafts > 0
    assert job.stats.stop_reason == "max_tokens"


# --- failures ----------------------------------------------------------------------


def test_prefill_error_is_raised_and_the_generator_rebuilt() -> None:
    model = FakeModel()
    backend = make_backend(model=model)
    run(backend, prompt_of(600))
    first = FakeGenerator.instances[-1]
    model.fail_prefill = RuntimeError("kernel failed")
    with pytest.raises(RuntimeError, match="kernel failed"):
        run(backend, prompt_of(600, seed=2))
    model.fail_prefill = None
    tokens, job = run(backend, prompt_of(600))
    assert FakeGenerator.instances[-1] is not first and first.closed
    assert job.stats.reused_tokens == 0  # a fresh page table
    assert tokens == run(make_backend(), prompt_of(600))[0]


def test_a_job_dropped_without_a_result_is_an_error() -> None:
    """The loop never waits forever on a job the generator no longer holds."""
    backend = make_backend()
    gen = backend.generator()
    gen.on_iterate = lambda g: g.pending_jobs.clear()
    with pytest.raises(RuntimeError, match="dropped the job"):
        run(backend, prompt_of(300))


def test_out_of_memory_while_generating_keeps_serving() -> None:
    model = FakeModel()
    backend = make_backend(model=model)
    model.fail_step = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    job = GenerationJob(prompt=prompt_of(300), stop_ids=frozenset(), max_tokens=8)
    with pytest.raises(GpuOutOfMemoryError, match="page table was reset"):
        list(decode(backend, job))
    assert job.stats.stop_reason == "error"
    model.fail_step = None
    tokens, _ = run(backend, prompt_of(300))
    assert len(tokens) == 8


# --- the persistent tiers ------------------------------------------------------------


def test_disk_tier_is_warm_after_a_restart(tmp_path: Path) -> None:
    settings = GeneratorSettings(
        cpu_cache_bytes=64 * 2**20, disk_cache_dir=str(tmp_path), disk_cache_bytes=2**30
    )
    a = prompt_of(2600)
    first = make_backend(settings=settings)
    run(first, a)
    first.close()  # Generator.close flushes to disk
    restarted = make_backend(settings=settings)
    again, job = run(restarted, [*a, 3])
    assert job.stats.reused_tokens >= 0.9 * len(a)
    assert again == run(make_backend(), [*a, 3])[0]


def test_ram_tier_restores_evicted_pages() -> None:
    settings = GeneratorSettings(cpu_cache_bytes=64 * 2**20)
    backend = make_backend(settings=settings, pages=8)
    a = prompt_of(1200, seed=1)
    run(backend, a)
    run(backend, prompt_of(1200, seed=5))  # evicts a's pages from the 8-page cache
    _, job = run(backend, a)
    assert job.stats.reused_tokens >= 4 * PAGE_SIZE


def test_generator_settings_from_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXLSP_CACHE_DIR", str(tmp_path))
    s = exl3_loader.generator_settings(
        ModelConfig(prefillChunk=700, pageCacheRamMiB=512, pageCacheDiskMiB=4096, ngramDraft=True)
    )
    assert s.max_chunk_size == 512
    kw = s.kwargs()
    assert kw["cpu_cache_size"] == 512 * 2**20
    assert kw["disk_cache_dir"] == str(tmp_path / "exl3-pages")
    assert kw["disk_cache_size"] == 4096 * 2**20
    assert kw["max_batch_size"] == 1
    off = exl3_loader.generator_settings(ModelConfig()).kwargs()
    assert (
        "cpu_cache_size" not in off and "disk_cache_dir" not in off and "ngram_match_min" not in off
    )
    with pytest.raises(ExLlamaV3LoadError, match="pageCacheRamMiB"):
        exl3_loader.generator_settings(ModelConfig(pageCacheDiskMiB=100))


# --- model detection and loading -----------------------------------------------------


def test_exl3_and_recurrent_detection() -> None:
    assert is_exl3_model({"quantization_config": {"quant_method": "exl3", "bits": 4.0}})
    assert not is_exl3_model({"quantization_config": {"quant_method": "exl2"}})
    assert not is_exl3_model({})
    assert is_recurrent_architecture({"architectures": ["Qwen3NextForCausalLM"]})
    assert not is_recurrent_architecture({"architectures": ["Qwen2ForCausalLM"]})


def _exl3_dir(tiny_model: Path, tmp_path: Path, arch: str = "Qwen2ForCausalLM") -> Path:
    d = tmp_path / "model-exl3"
    d.mkdir()
    for f in tiny_model.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = [arch]
    cfg["quantization_config"] = {"quant_method": "exl3", "version": "1.6.5", "bits": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _pretend_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "cuda_summary", lambda _t: ("Fake GPU", 10.0, 16.0))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


def test_load_with_the_fake_module(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pretend_gpu(monkeypatch)
    monkeypatch.setattr(FakeExl3, "recurrent", True)
    path = _exl3_dir(tiny_model, tmp_path)
    backend = load_exllamav3_backend(
        ModelConfig(path=str(path), backend="exllamav3", maxSeqLen=1000, cacheType="q6"),
        api=FakeExl3,
    )
    assert backend.info.dtype == "exl3-4.0bpw"
    assert backend.info.context_length == 1024
    assert backend.cache.kwargs["k_bits"] == 6 and backend.cache.kwargs["v_bits"] == 6
    assert backend.recurrent
    tokens, _ = run(backend, prompt_of(300))
    assert len(tokens) == 8
    backend.close()
    assert FakeGenerator.instances[-1].closed


def test_out_of_memory_at_load_is_reported(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pretend_gpu(monkeypatch)
    monkeypatch.setattr(FakeExl3, "load_error", torch.OutOfMemoryError("CUDA out of memory"))
    path = _exl3_dir(tiny_model, tmp_path)
    with pytest.raises(GpuOutOfMemoryError, match=r"not enough GPU memory .* 10\.00 GiB free"):
        load_exllamav3_backend(ModelConfig(path=str(path), backend="exllamav3"), api=FakeExl3)


def test_not_an_exl3_model(tiny_model: Path) -> None:
    with pytest.raises(ExLlamaV3LoadError, match="not an EXL3 model"):
        load_exllamav3_backend(ModelConfig(path=str(tiny_model), backend="exllamav3"))
    with pytest.raises(ModelLoadError, match="not an EXL3 model"):
        create_backend(ModelConfig(path=str(tiny_model), backend="exllamav3"))


def test_needs_a_gpu(tiny_model: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = _exl3_dir(tiny_model, tmp_path)
    with pytest.raises(ExLlamaV3LoadError, match="needs a CUDA GPU"):
        load_exllamav3_backend(ModelConfig(path=str(path), backend="exllamav3"))


# --- exlsp doctor ---------------------------------------------------------------------


def _doctor(model: ModelConfig) -> tuple[int, dict[str, str], list[str]]:
    import io

    from exlsp.server.doctor import run_doctor

    out = io.StringIO()
    rc = run_doctor(model, out, load=False)
    lines = out.getvalue().rstrip("\n").splitlines()
    table = {}
    for line in lines:
        if line.startswith("  ") and line[2] != " ":
            label, _, value = line[2:].partition("  ")
            table[label.strip()] = value.strip()
    return rc, table, lines


def test_doctor_on_an_exl3_model(tiny_model: Path, tmp_path: Path) -> None:
    path = _exl3_dir(tiny_model, tmp_path)
    rc, table, lines = _doctor(
        ModelConfig(path=str(path), backend="exllamav3", pageCacheRamMiB=256, pageCacheDiskMiB=1024)
    )
    assert table["weights"] == "EXL3 4.0 bpw"
    assert table["prefix reuse"].startswith("to the token")
    assert table["page tiers"].startswith("pinned RAM 256 MiB, disk 1024 MiB in ")
    assert "exllamav3" in table
    if not torch.cuda.is_available():
        assert rc == 1
        assert "exllamav3 backend needs a CUDA GPU" in lines[-2]


def test_doctor_says_reuse_snaps_to_pages_for_a_hybrid_model(
    tiny_model: Path, tmp_path: Path
) -> None:
    path = _exl3_dir(tiny_model, tmp_path, arch="Qwen3NextForCausalLM")
    _, table, _ = _doctor(ModelConfig(path=str(path), backend="exllamav3"))
    assert table["prefix reuse"].startswith("snaps to 256-token pages")
    assert table["page tiers"] == "RAM tier off"


def test_doctor_wants_the_right_backend_for_exl3(tiny_model: Path, tmp_path: Path) -> None:
    path = _exl3_dir(tiny_model, tmp_path)
    rc, _, lines = _doctor(ModelConfig(path=str(path), backend="transformers"))
    assert rc == 1
    assert "EXL3 model needs the exllamav3 backend" in lines[-2]
    from exlsp.server.doctor import DoctorReport, _exl3_model_rows

    report = DoctorReport()
    _exl3_model_rows(report, ModelConfig(backend="exllamav3"), {"model_type": "qwen2"})
    assert report.problem is not None and "EXL3 models only" in report.problem


# --- exlsp models ------------------------------------------------------------------------


def test_catalogue_sizes_exl3_for_the_families_exllamav3_loads() -> None:
    from exlsp.completion import models

    fits = models.size_all(24 * 2**30, "exllamav3", max_seq_len=8192, cache_type="q8")
    names = {f.variant.model.name for f in fits}
    assert "qwen2.5-coder-1.5b" in names and "codestral-22b" in names
    assert "deepseek-coder-6.7b" in names
    assert not any(n.startswith(("starcoder2", "codegemma")) for n in names)
    one = next(
        f for f in fits if f.variant.model.name == "qwen2.5-coder-1.5b" and f.variant.bpw == 4.0
    )
    m, v = one.variant.model, one.variant
    assert v.kind == "EXL3 4 bpw" and v.converted and v.source.endswith("(convert)")
    # Embeddings stay in system memory; the untied head is stored at 6 bits.
    body = m.parameters - m.head_parameters  # tied: one vocab x hidden table
    assert one.estimate.weights == round(body * 4.0 / 8 + m.head_parameters * 6.0 / 8)
    assert one.estimate.second_cache == 0  # one paged cache for every job
    assert one.estimate.kv_cache == m.kv_cache_bytes(8192, "q8")


# --- the GPU kit's EXL3 stages ----------------------------------------------------------------


def test_the_kit_exl3_run_replaces_the_exl2_tests_and_bench() -> None:
    from exlsp.benchmarks import gpu_kit
    from exlsp.benchmarks.gpu_kit import KitPaths

    plain = [s.name for s in gpu_kit.selected_stages(set())]
    exl3 = [s.name for s in gpu_kit.selected_stages({"exl3"})]
    assert not any(n.startswith("exl3") for n in plain)
    assert {"tiny", "tests", "bench-1.5b"} <= set(plain)
    assert not {"tiny", "tests", "bench-1.5b"} & set(exl3)
    for name in ("exl3-extension", "exl3-tiny", "exl3-tests", "exl3-model-1.5b", "exl3-bench-1.5b"):
        assert name in exl3
    # exllamav3 compiles beside exllamav2 (both extensions are in the run)
    assert exl3.index("exl3-extension") < exl3.index("extension")
    paths = KitPaths(out=Path("/tmp/out"))
    tests = {s.name: s for s in gpu_kit.STAGES}["exl3-tests"]
    assert "tests/test_gpu_exllamav3.py" in tests.argv(paths)
    assert tests.extra_env(paths)["EXLSP_GPU_EXL3_MODEL"].endswith("tiny-exl3-4.0")
    exl2_tests = {s.name: s for s in gpu_kit.STAGES}["tests"].argv(paths)
    assert "tests/test_gpu_exllamav3.py" not in exl2_tests


def test_the_kit_keystrokes_are_inline_edits_of_one_prompt() -> None:
    from exlsp.benchmarks.gpu_kit import keystroke_prompts

    base = list(range(100, 4164))
    prompts = keystroke_prompts(base, 40)
    assert len(prompts) == 40
    for before, after in zip([base, *prompts], prompts, strict=False):
        changed = len(after) - common_prefix_length(before, after)
        assert 1 <= changed <= 2  # a typed token, or a correction of the last two


def test_exl3_converter_command_is_short_for_random_weights() -> None:
    from exlsp.benchmarks.build_exl3 import convert_command, exl3_bits

    cmd = convert_command(Path("/hf"), Path("/work"), Path("/out"), 4.0, python="py")
    assert cmd[:3] == ["py", "-m", "exllamav3.conversion.convert_model"]
    assert cmd[cmd.index("-b") + 1] == "4.0" and cmd[cmd.index("-hb") + 1] == "6"
    assert "-cr" in cmd and "-cc" in cmd
    assert "-cr" not in convert_command(
        Path("/hf"), Path("/w"), Path("/o"), 4.0, fast_calibration=False
    )
    assert exl3_bits(Path("/nonexistent")) is None


# --- the fake against exllamav3's own source ---------------------------------------------------


def _exllamav3_source(path: str) -> str | None:
    """A file of the exllamav3 1.6.5 wheel carried for the GPU kit (.gpu-wheels/), if here."""
    import zipfile

    from exlsp.benchmarks.gpu_kit import WHEELS_DIR

    wheel = next(iter(sorted(WHEELS_DIR.glob("exllamav3-1.6.5-*.whl"))), None)
    if wheel is None:
        return None
    with zipfile.ZipFile(wheel) as z:
        return z.read(f"exllamav3/{path}").decode("utf-8")


def _params_and_methods(source: str, cls: str) -> tuple[set[str], set[str], bool]:
    import ast

    node = next(
        n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls
    )
    methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
    init = next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    params = {a.arg for a in init.args.args + init.args.kwonlyargs}
    return params, methods, init.args.kwarg is not None


def test_the_backend_calls_exllamav3_as_its_source_defines(tmp_path: Path) -> None:
    """Every keyword the backend passes and every method it calls exists in exllamav3
    1.6.5's source (read from the carried wheel, never imported)."""
    generator = _exllamav3_source("generator/generator.py")
    if generator is None:
        pytest.skip("no exllamav3 wheel in .gpu-wheels (bash benchmarks/gpu/prepare-wheels.sh)")
    job = _exllamav3_source("generator/job.py")
    cache = _exllamav3_source("cache/cache.py")
    assert job is not None and cache is not None
    g_params, g_methods, _ = _params_and_methods(generator, "Generator")
    settings = GeneratorSettings(
        cpu_cache_bytes=1, disk_cache_dir=str(tmp_path), disk_cache_bytes=1, ngram_draft=True
    )
    assert {"model", "cache", "tokenizer", *settings.kwargs()} <= g_params
    assert {
        "enqueue", "cancel", "iterate", "close", "clear_queue", "get_cache_stats",
        "flush_cache_to_disk",
    } <= g_methods  # fmt: skip
    j_params, _, _ = _params_and_methods(job, "Job")
    assert {
        "input_ids", "max_new_tokens", "stop_conditions", "sampler", "decode_special_tokens"
    } <= j_params  # fmt: skip
    assert "self.cached_pages = 0" in job and "self.cached_tokens = 0" in job
    c_params, _, c_kwargs = _params_and_methods(cache, "Cache")
    assert {"model", "max_num_tokens", "layer_type", "max_history"} <= c_params and c_kwargs
