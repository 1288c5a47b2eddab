"""EXL3 weights resident on a CUDA GPU, driven by exllamav3 1.6.5's `Generator`.

Design: this backend drives exllamav3's own `Generator`/`Job` (greedy
`ArgmaxSampler`, one job at a time) and does not run a forward loop of its own
like the exllamav2 backend. From reading exllamav3 1.6.5's sources:

- the cache is paged (`cache/cache.py`: `Cache(model, max_num_tokens)` must be a
  multiple of 256 tokens; the attention reads K/V through a block table), so a
  forward loop would have to rebuild `generator/pagetable.py`'s page allocation,
  block index and hashing to use it at all;
- prefix reuse comes with it, down to the token: `Job.prepare_for_queue` hashes
  the prompt's full 256-token pages, `PageTable.allocate_pages` revives every page
  whose hash chain matches (any earlier prompt, not only the last one: hover and
  code-action jobs, whatever their `slot`, share the one paged cache and evict
  the completion's pages, least recently used first, only when it is full), and
  `Job.prefill` copies
  the longest partial match of the next page from any cached page
  (`ext.count_match_tensor` + `Cache.copy_page`, counted in `job.cached_tokens`);
  the last prompt token always runs in the first generation step;
- the persistent tiers exist only through it: `Generator(cpu_cache_size=...)`
  attaches a pinned-RAM `CPUPageCache` to the page table and
  `disk_cache_dir=...` a `DiskPageCache` behind it (a per-model subdirectory
  keyed by a fingerprint of the model, cache settings and kernels; pages are
  flushed when the generator goes idle and on `close()`, and read back in a
  later process), which is what keeps a workspace's prompt warm across restarts;
- n-gram drafting is built in (`ngram_match_min`, `num_draft_tokens`): an
  `iterate()` can return several tokens, which `decode()` handles;
- the costs: `iterate()` decodes each token's text and holds tokens that end in
  a partial UTF-8 character (they come later, or in the final result's `held`);
  `model.forward` has no abort event, so a prefill stops between chunks:
  `max_chunk_size` (model.prefillChunk) bounds how long a cancelled keystroke or
  a passed deadline keeps the GPU, and whatever chunks ran stay cached.

Per run: `start` enqueues a `Job` for the fitted prompt (max_new_tokens with
room for a draft window, the job's stop ids as stop conditions); `prefill` and
`step` call `iterate()` until the job gets token(s) or ends, checking the job's
cancel flag and deadline between two calls; `close` cancels an unfinished job
(its pages go back to the page table with their contents, for the next
keystroke) and reports `cached_pages * 256 + cached_tokens` as reused tokens.
An error result (`Generator.reap_failed_job` turns a failed prefill into a
`stage: "error"` result) is raised; after any failure the generator is
rebuilt on a fresh page table over the same cache, and an out-of-memory error
becomes `GpuOutOfMemoryError` with the server up.

Hybrid and recurrent models (`caps["recurrent_states"]`): the generator skips
the partial-page copy for them and resumes only at a stored recurrent
checkpoint, so reuse snaps to 256-token page boundaries (`exlsp doctor` says so).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from exlsp.completion.backends.base import GenerationJob, ModelInfo
from exlsp.completion.backends.gpu import (
    GpuOutOfMemoryError,
    is_out_of_memory,
)
from exlsp.completion.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PAGE_SIZE = 256  # exllamav3/util/tensor.py: PAGE_SIZE
NGRAM_MATCH_MIN = 2  # shortest n-gram the drafter matches (exllamav2's min_ngram too)
NGRAM_DRAFT_TOKENS = 4
# Prompt tokens per prefill pass of a background job (hover, code actions): the
# longest a completion that preempts it waits (one page; the generator reads
# `max_chunk_size` at each pass, Job.prefill).
BACKGROUND_PREFILL_CHUNK = PAGE_SIZE


@dataclass(frozen=True)
class GeneratorSettings:
    """The `exllamav3.Generator` arguments this backend sets."""

    max_chunk_size: int = 2048
    cpu_cache_bytes: int = 0  # the pinned-RAM page tier; 0: none
    disk_cache_dir: str | None = None  # the disk tier (needs the RAM tier)
    disk_cache_bytes: int = 0
    ngram_draft: bool = False

    @property
    def num_draft_tokens(self) -> int:
        return NGRAM_DRAFT_TOKENS if self.ngram_draft else 0

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            # One job at a time (one worker thread): a batch of 1 keeps the pinned
            # staging buffers small (the default sizes them for 256 sequences).
            "max_batch_size": 1,
            "max_chunk_size": self.max_chunk_size,
        }
        if self.cpu_cache_bytes:
            kw["cpu_cache_size"] = self.cpu_cache_bytes
            if self.disk_cache_dir:
                kw["disk_cache_dir"] = self.disk_cache_dir
                if self.disk_cache_bytes:
                    kw["disk_cache_size"] = self.disk_cache_bytes
        if self.ngram_draft:
            kw["ngram_match_min"] = NGRAM_MATCH_MIN
            kw["num_draft_tokens"] = NGRAM_DRAFT_TOKENS
        return kw


def _token_ids(value: Any) -> list[int]:
    """A result's `token_ids` (a (1, n) tensor) as a list."""
    if value is None:
        return []
    flat = value.flatten() if hasattr(value, "flatten") else value
    items: Iterable[Any] = flat.tolist() if hasattr(flat, "tolist") else flat
    return [int(t) for t in items]


class ExLlamaV3Backend:
    """exllamav3's paged generator over one model and cache; driven from one thread.

    `api` is the exllamav3 module (or a fake of it): `Generator`, `Job`, `ArgmaxSampler`.
    """

    name = "exllamav3"

    def __init__(
        self,
        api: Any,
        model: Any,
        cache: Any,
        exl_tokenizer: Any,
        tokenizer: Tokenizer,
        info: ModelInfo,
        *,
        settings: GeneratorSettings | None = None,
        recurrent: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        import torch

        self._torch = torch
        self._api = api
        self.model = model
        self.cache = cache
        self._exl_tokenizer = exl_tokenizer
        self.tokenizer = tokenizer
        self.info = info
        self.settings = settings or GeneratorSettings()
        self.recurrent = recurrent
        self.max_seq_len = int(info.context_length)
        self._generator: Any = None
        self._on_close = on_close
        self.vram_bytes: int | None = None  # set by the loader

    # -- the generator -------------------------------------------------------

    def generator(self) -> Any:
        """The generator, made at first use and after a reset or a failure."""
        if self._generator is None:
            self._generator = self._api.Generator(
                model=self.model,
                cache=self.cache,
                tokenizer=self._exl_tokenizer,
                **self.settings.kwargs(),
            )
        return self._generator

    def _drop_generator(self) -> None:
        gen, self._generator = self._generator, None
        if gen is not None:
            with contextlib.suppress(Exception):
                gen.clear_queue()
            with contextlib.suppress(Exception):
                gen.close()

    def reset_cache(self) -> None:
        """A fresh page table over the same cache (the RAM and disk tiers keep their
        pages: they are the persistent cache and are read back by the new generator)."""
        self._drop_generator()

    def cache_stats(self) -> dict[str, Any]:
        """exllamav3's `Generator.get_cache_stats()` (tiers, hit rates), for benchmarks."""
        return dict(self.generator().get_cache_stats())

    def flush_to_disk(self) -> None:
        """Write every complete page to the disk tier now (it also happens when the
        generator goes idle and on close)."""
        gen = self._generator
        if gen is not None and getattr(gen, "disk_page_cache", None) is not None:
            gen.flush_cache_to_disk(wait=True)

    # -- generation ----------------------------------------------------------

    def start(self, job: GenerationJob) -> _ExLlamaV3Run:
        prompt = list(job.prompt)
        if not prompt:
            raise ValueError("empty prompt")
        reserve = self.settings.num_draft_tokens
        max_tokens = max(0, min(job.max_tokens, self.max_seq_len - 1 - reserve))
        room = max(1, self.max_seq_len - 1 - max_tokens - reserve)
        if len(prompt) > room:
            # Keep the prompt's end (the cursor side); the engine's budgets normally prevent it.
            prompt = prompt[-room:]
        if not job.reuse_cache:
            self.reset_cache()
        gen = self.generator()
        gen.max_chunk_size = (
            self.settings.max_chunk_size if job.slot == "main" else BACKGROUND_PREFILL_CHUNK
        )
        xjob = self._api.Job(
            input_ids=self._torch.tensor([prompt], dtype=self._torch.long),
            # At least 1 (the Job asserts it); the decode loop cuts at `max_tokens`.
            max_new_tokens=max(1, max_tokens),
            stop_conditions=sorted(job.stop_ids),
            sampler=self._api.ArgmaxSampler(),
            decode_special_tokens=True,
        )
        gen.enqueue(xjob)
        return _ExLlamaV3Run(self, gen, xjob, job, prompt, max_tokens)

    def close(self) -> None:
        # Generator.close() flushes the pages still only in VRAM/RAM to the disk tier.
        self._drop_generator()
        if self.model is not None:
            with contextlib.suppress(Exception):
                self.model.unload()
        self.model = None
        self.cache = None
        if self._on_close is not None:
            self._on_close()


class _ExLlamaV3Run:
    """One `Job` on the backend's generator."""

    def __init__(
        self,
        backend: ExLlamaV3Backend,
        gen: Any,
        xjob: Any,
        job: GenerationJob,
        prompt: list[int],
        max_tokens: int,
    ) -> None:
        self._b = backend
        self._gen = gen
        self._xjob = xjob
        self._job = job
        self.prompt_tokens = len(prompt)
        # Known once the generator has allocated the job's pages (close() reports them).
        self.reused_tokens = 0
        self.prefilled_tokens = 0
        self.max_tokens = max_tokens
        self.end_reason = ""
        self._first = False  # a token (or the end) came: the prompt is in the cache
        self._ended = False

    def _reused(self) -> int:
        """The job's cached prompt tokens: whole pages revived or skipped plus the
        partial page copied (Job.prefill / Job.allocate_pages; the eos result's
        `cached_tokens` is the same sum)."""
        x = self._xjob
        cached = int(getattr(x, "cached_pages", 0)) * PAGE_SIZE + int(
            getattr(x, "cached_tokens", 0)
        )
        return max(0, min(cached, self.prompt_tokens - 1))

    def _progress(self) -> None:
        self.reused_tokens = self._reused()
        if self._first:
            self.prefilled_tokens = self.prompt_tokens - self.reused_tokens
            return
        # A stopped prefill: the position its chunks reached (Sequence.kv_position).
        seqs = getattr(self._xjob, "sequences", None) or ()
        position = int(getattr(seqs[0], "kv_position", 0)) if seqs else 0
        self.prefilled_tokens = max(0, min(position, self.prompt_tokens) - self.reused_tokens)

    def _advance(self) -> list[int] | None:
        """`iterate()` until this job gets token(s) or ends; None if the job was stopped."""
        while True:
            if self._job.should_stop():
                return None
            tokens: list[int] = []
            ended = False
            for r in self._gen.iterate():
                if r.get("job") is not self._xjob:
                    continue
                stage = r.get("stage")
                if stage == "error":
                    self._ended = True
                    error = r.get("error")
                    raise error if isinstance(error, BaseException) else RuntimeError(str(error))
                if stage != "streaming":
                    continue
                tokens += _token_ids(r.get("token_ids"))
                if r.get("eos"):
                    held = r.get("held") or {}
                    tokens += _token_ids(held.get("token_ids"))
                    ended = True
                    reason = r.get("eos_reason")
                    self.end_reason = "max_tokens" if reason == "max_new_tokens" else "eos"
            if ended:
                self._ended = True
            if tokens or ended:
                self._first = True
                return tokens
            if not any(j is self._xjob for j in (*self._gen.active_jobs, *self._gen.pending_jobs)):
                self._ended = True
                raise RuntimeError("exllamav3's generator dropped the job without a result")

    def prefill(self) -> list[int] | None:
        try:
            return self._advance()
        finally:
            self._progress()

    def step(self) -> list[int] | None:
        if self._ended:
            return []
        return self._advance()

    def failed(self, error: BaseException) -> BaseException | None:
        # A failed iterate() leaves the page table in an unknown state.
        self._ended = True
        self._b._drop_generator()
        if not is_out_of_memory(error):
            return None
        return GpuOutOfMemoryError(
            f"GPU out of memory while generating ({self.prompt_tokens} prompt tokens, "
            f"paged cache of {self._b.max_seq_len} tokens); the page table was reset, "
            "the next request starts from an empty cache"
        )

    def close(self) -> dict[str, Any]:
        if not self._ended and self._b._generator is self._gen:
            # Its pages go back to the page table with their contents (reused next time).
            with contextlib.suppress(Exception):
                self._gen.cancel(self._xjob)
        self._progress()
        return {"reused_tokens": self.reused_tokens, "prefilled_tokens": self.prefilled_tokens}
