"""The GPU backend: EXL2 weights resident on a CUDA GPU, driven by exllamav2 0.3.2.

It keeps the KV cache contract of the reference backend (keep one sequence's
cache between jobs, reuse its longest common prefix with the new prompt, prefill
at least the last prompt token, decode greedily) with a small loop over
``model.forward(ids, cache)``, run by `decode()`. The cache is one sequence;
rewinding it is setting ``cache.current_seq_len`` to the common-prefix length,
because every attention call reads keys/values ``[0, past_len)`` and writes
``[past_len, past_len + q_len)`` (for the Q4/Q6/Q8 caches too: their writes
re-quantize from the aligned block start). ``model.forward`` takes an
``abort_event`` it checks between layers, so a stale keystroke or the deadline
stops a long prefill at once; the chunks already done stay in the cache for the
next job. With ``model.ngramDraft`` a step verifies an n-gram draft taken from
the prompt in the same forward pass. No ``ExLlamaV2Tokenizer`` (prompts are
``HfTokenizer`` ids for every backend) and no flash-attn (without it exllamav2
uses torch SDPA) are needed.

exllamav2's dynamic generator is measured against this loop by the benchmarks
only (benchmarks/exl2_dynamic.py says why the runtime does not use it).

On a GPU, reuse is exact up to floating-point rounding: a prompt prefilled in
one chunk and the same prompt prefilled as cached prefix + new tokens run
kernels of different shapes (and a Q cache stores the prefix quantized, while a
chunk attends to its own keys in FP16), so greedy tokens can differ where the
top two logits nearly tie. The unit tests check exactness on a deterministic
fake; the GPU test checks agreement up to such ties.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from exlsp.completion.backends.base import GenerationJob, ModelInfo, common_prefix_length
from exlsp.completion.backends.gpu import GpuOutOfMemoryError, is_out_of_memory, release_cuda
from exlsp.completion.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# --- generation helpers -------------------------------------------------------------


class _StopSignal:
    """Duck-typed `abort_event` for `model.forward`: set once the job is cancelled or
    past its deadline, so a long prefill stops between two layers."""

    def __init__(self, job: GenerationJob) -> None:
        self._job = job

    def is_set(self) -> bool:
        return self._job.should_stop() is not None


class NgramDraft:
    """Prompt-lookup drafting: after the most recent earlier occurrence of the last
    `n` tokens (n from `max_ngram` down to `min_ngram`), propose what followed it.

    FIM completions often copy identifiers and whole lines from the prompt; the
    model then verifies the proposal in one forward pass.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, max_tokens: int = 4) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_tokens = max_tokens

    def propose(self, seq: Any, length: int, limit: int | None = None) -> list[int]:
        """Draft tokens to follow `seq[:length]` (`seq`: a 1-D numpy integer array)."""
        limit = self.max_tokens if limit is None else min(limit, self.max_tokens)
        if limit <= 0:
            return []
        import numpy as np

        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if length <= n:
                continue
            tail = seq[length - n : length]
            # Starts i <= length - n - 1: the match ends before the tail itself does,
            # so at least one token follows it.
            idx = np.flatnonzero(seq[: length - n] == tail[0])
            for j in range(1, n):
                if idx.size == 0:
                    break
                idx = idx[seq[idx + j] == tail[j]]
            if idx.size:
                start = int(idx[-1]) + n
                return [int(t) for t in seq[start : min(start + limit, length)]]
        return []


# --- the backend ----------------------------------------------------------------


class ExLlamaV2Backend:
    """One sequence's KV cache on the GPU; driven from one worker thread."""

    name = "exllamav2"

    def __init__(
        self,
        model: Any,
        cache: Any,
        tokenizer: Tokenizer,
        info: ModelInfo,
        *,
        ngram_draft: bool = False,
        ngram: NgramDraft | None = None,
        on_close: Callable[[], None] | None = None,
        cache_factory: Callable[[], Any] | None = None,
    ) -> None:
        import numpy
        import torch

        self._torch = torch
        self._np = numpy
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        self.info = info
        self.ngram_draft = ngram_draft
        self._ngram = (ngram or NgramDraft()) if ngram_draft else None
        self._on_close = on_close
        self._cached: list[int] = []  # tokens whose K/V are in the cache, in order
        # Background work (hover, code actions) gets a cache of its own, made at its
        # first job, so that it never evicts the completion's prompt; the slot not in
        # use is parked here with its token list.
        self._cache_factory = cache_factory
        self._slot = "main"
        self._parked: dict[str, tuple[Any, list[int]]] = {}
        self.max_slots = 4  # caches kept, the current one included (a model host's `hostSlots`)
        self.vram_bytes: int | None = None  # set by the loader
        # n-gram drafting, over the backend's life (for benchmarks)
        self.draft_proposed = 0
        self.draft_accepted = 0

    @property
    def max_seq_len(self) -> int:
        return int(self.cache.max_seq_len)

    # -- KV cache ------------------------------------------------------------

    def reset_cache(self) -> None:
        self._cached = []
        if self.cache is not None:
            self.cache.current_seq_len = 0

    def _keep(self, n: int) -> None:
        del self._cached[n:]
        self.cache.current_seq_len = n

    def _use_slot(self, slot: str) -> None:
        """Switch to `slot`'s cache, making it at its first use.

        Where a second cache cannot be had (no factory, or no GPU memory for it),
        every slot shares the one cache, as before.
        """
        if slot == self._slot:
            return
        if slot not in self._parked and self._parked and len(self._parked) + 2 > self.max_slots:
            # All slots taken (a model host's editors): the least recently used cache serves.
            self._parked[slot] = (self._parked.pop(next(iter(self._parked)))[0], [])
        if slot not in self._parked:
            if self._cache_factory is None:
                return
            try:
                cache = self._cache_factory()
            except Exception as e:
                self._cache_factory = None
                if not is_out_of_memory(e):
                    raise
                self._release_memory()
                log.warning(
                    "exllamav2: no GPU memory for a second KV cache; background work "
                    "(hover, code actions) shares the completion cache (%s)",
                    str(e).splitlines()[0] if str(e) else type(e).__name__,
                )
                return
            self._parked[slot] = (cache, [])
        self._parked[self._slot] = (self.cache, self._cached)
        self.cache, self._cached = self._parked.pop(slot)
        self._slot = slot

    def _forward(self, ids: list[int], *, last_only: bool, abort: Any) -> Any:
        """Run `ids` after the cached tokens; the logits, or None if aborted.

        Whatever was processed before an abort (whole prefill chunks) stays cached.
        """
        torch = self._torch
        before = self.cache.current_seq_len
        input_ids = torch.tensor([ids], dtype=torch.long)
        try:
            logits = self.model.forward(
                input_ids, self.cache, last_id_only=last_only, abort_event=abort
            )
        finally:
            done = self.cache.current_seq_len - before
            self._cached.extend(ids[: max(done, 0)])
        return logits

    def _recover(self, prompt_tokens: int, error: BaseException) -> GpuOutOfMemoryError | None:
        """Reset after a failed step. For an out-of-memory error, the error to raise
        once the original exception (whose frames hold GPU tensors) is released."""
        self.reset_cache()
        if not is_out_of_memory(error):
            return None
        return GpuOutOfMemoryError(
            f"GPU out of memory while generating ({prompt_tokens} prompt tokens, "
            f"KV cache of {self.max_seq_len} tokens); the KV cache was reset, "
            "the next request starts from an empty cache"
        )

    def _release_memory(self) -> None:
        release_cuda(self._torch)

    # -- generation ----------------------------------------------------------

    def start(self, job: GenerationJob) -> _ForwardRun:
        reserve = self._ngram.max_tokens if self._ngram else 0
        self._use_slot(job.slot)
        prompt, max_tokens = self._fit(job, reserve)
        if not job.reuse_cache:
            self.reset_cache()
        # At least the last prompt token is prefilled: its logits give the first token.
        keep = min(common_prefix_length(self._cached, prompt), len(prompt) - 1)
        self._keep(keep)
        return _ForwardRun(self, job, prompt, keep, max_tokens)

    def _fit(self, job: GenerationJob, reserve: int) -> tuple[list[int], int]:
        prompt = list(job.prompt)
        if not prompt:
            raise ValueError("empty prompt")
        max_tokens = max(0, min(job.max_tokens, self.max_seq_len - 1 - reserve))
        room = self.max_seq_len - max_tokens - reserve
        if len(prompt) > room:
            # Keep the end of the prompt (the cursor side); the engine's budgets
            # normally prevent this.
            prompt = prompt[-room:]
        return prompt, max_tokens

    def close(self) -> None:
        self._cached = []
        self._parked.clear()
        if self.model is not None:
            with contextlib.suppress(Exception):
                self.model.unload()
        self.model = None
        self.cache = None
        if self._on_close is not None:
            self._on_close()


class _ForwardRun:
    """One job in the `forward` mode: greedy, one forward pass per step of the last
    uncached token plus any n-gram draft, whose accepted tokens come back together."""

    end_reason = ""

    def __init__(
        self,
        backend: ExLlamaV2Backend,
        job: GenerationJob,
        prompt: list[int],
        keep: int,
        max_tokens: int,
    ) -> None:
        self._b = backend
        self._prompt = prompt
        self._abort = _StopSignal(job)
        self.prompt_tokens = len(prompt)
        self.reused_tokens = keep
        self.prefilled_tokens = 0
        self.max_tokens = max_tokens
        self._draft = backend._ngram
        self._seq: Any = None  # the prompt and the tokens so far, for the draft's lookup
        if self._draft is not None:
            np = backend._np
            self._seq = np.zeros(len(prompt) + max_tokens + self._draft.max_tokens + 1, np.int64)
            self._seq[: len(prompt)] = prompt
        self._length = len(prompt)
        self._generated = 0
        # Greedy tokens returned but not yet in the cache (the last one never is).
        self._pending: list[int] = []
        self._oom = False

    def _take(self, tokens: list[int]) -> list[int]:
        self._pending = tokens
        return tokens

    def prefill(self) -> list[int] | None:
        b = self._b
        # Whatever was processed before an abort (whole chunks) stays cached.
        logits = b._forward(self._prompt[self.reused_tokens :], last_only=True, abort=self._abort)
        self.prefilled_tokens = len(b._cached) - self.reused_tokens
        if logits is None:
            return None
        return self._take([int(b._torch.argmax(logits[0, -1]).item())])

    def step(self) -> list[int] | None:
        b = self._b
        for token in self._pending:
            if self._seq is not None:
                self._seq[self._length] = token
            self._length += 1
        self._generated += len(self._pending)
        room = b.max_seq_len - len(b._cached) - 1
        if room < 0:
            self.end_reason = "context_full"
            return []
        proposal: list[int] = []
        if self._draft is not None:
            limit = min(room, self.max_tokens - self._generated - 1)
            proposal = self._draft.propose(self._seq, self._length, limit)
        logits = b._forward([self._pending[-1], *proposal], last_only=False, abort=self._abort)
        if logits is None:
            return None
        torch = b._torch
        if not proposal:
            return self._take([int(torch.argmax(logits[0, -1]).item())])
        greedy = [int(t) for t in torch.argmax(logits[0], dim=-1).tolist()]
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == greedy[accepted]:
            accepted += 1
        # Cached: the last token + the accepted drafts; the rejected drafts are dropped.
        b._keep(len(b._cached) - (len(proposal) - accepted))
        b.draft_proposed += len(proposal)
        b.draft_accepted += accepted
        return self._take(greedy[: accepted + 1])

    def failed(self, error: BaseException) -> BaseException | None:
        oom = self._b._recover(self.prompt_tokens, error)
        self._oom = oom is not None
        return oom

    def close(self) -> dict[str, Any]:
        if self._oom:  # the failed step's frames (and their GPU tensors) are gone by now
            self._b._release_memory()
        return {}
