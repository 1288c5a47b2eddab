"""exllamav2's dynamic generator behind the decode loop, for benchmarks only.

`Exl2DynamicBackend` drives ``ExLlamaV2DynamicGenerator(paged=False)`` with greedy
settings and the job's stop ids on the model and KV cache of a loaded exllamav2
backend, and implements `start(job) -> Run`, so `benchmarks/gpu_bench.py` runs it
through the same `decode()` as the runtime's `forward` loop and compares them.

Why the runtime does not use the generator (exllamav2 0.3.2's sources):

- reuse is the same token-level longest common prefix (the unpaged generator
  compares the job with its single page up to ``kv_position_revert``), so it
  brings no reuse the loop lacks; its paged mode needs flash-attn and reuses
  only whole 256-token pages plus one partial page;
- per token it copies the full-vocabulary logits to a pinned float32 host
  buffer, samples on the CPU, decodes text, hashes pages and holds back tokens
  that end in a partial UTF-8 character (held tokens arrive late, or only in
  the final result's ``held`` entry); the loop does one on-GPU argmax and one
  8-byte copy, which matters for a 1.5B model whose decode step is ~2-3 ms;
- cancellation: ``iterate()`` prefills a whole chunk (up to ``max_input_len``)
  before it returns, while ``model.forward`` takes an ``abort_event`` it checks
  between layers;
- with n-gram drafting it stops ``num_draft_tokens`` short of ``max_new_tokens``,
  and a failed ``iterate()`` leaves its page table in an unknown state;
- it needs an ``ExLlamaV2Tokenizer`` (the runtime uses ``HfTokenizer`` ids).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exlsp.completion.backends.base import GenerationJob
from exlsp.completion.backends.exllamav2 import (
    ExLlamaV2Backend,
    load_exllamav2_backend,
)
from exlsp.completion.backends.gpu import GpuOutOfMemoryError
from exlsp.completion.config import ModelConfig


@dataclass
class DynamicGeneratorApi:
    """What the dynamic generator's backend needs from exllamav2 (fakes replace it in tests)."""

    make_generator: Callable[[], Any]  # -> ExLlamaV2DynamicGenerator(paged=False)
    make_job: Callable[[list[int], int, list[int]], Any]  # (ids, max_new_tokens, stop ids)
    num_draft_tokens: int = 0


class Exl2DynamicBackend:
    """A loaded exllamav2 backend's model and cache, generated from by the dynamic generator."""

    name = "exllamav2-dynamic"

    def __init__(self, backend: ExLlamaV2Backend, api: DynamicGeneratorApi) -> None:
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.info = backend.info
        self.vram_bytes = backend.vram_bytes
        self._api = api
        self._generator: Any = None  # made at the first job, again after a failure

    def reset_cache(self) -> None:
        self.backend.reset_cache()
        if self._generator is not None:
            self._generator.reset_page_table()

    def start(self, job: GenerationJob) -> _DynamicRun:
        return _DynamicRun(self, job)

    def _recover(self, prompt_tokens: int, error: BaseException) -> GpuOutOfMemoryError | None:
        self._generator = None
        return self.backend._recover(prompt_tokens, error)

    def close(self) -> None:
        self._generator = None
        self.backend.close()


class _DynamicRun:
    """One job on the dynamic generator: each step is one or more `iterate()` calls,
    up to the next tokens it streams for the job."""

    def __init__(self, owner: Exl2DynamicBackend, job: GenerationJob) -> None:
        self._owner = owner
        self._job = job
        self._api = api = owner._api
        self._prompt, self.max_tokens = owner.backend._fit(job, api.num_draft_tokens)
        if owner._generator is None:
            owner._generator = api.make_generator()
        self._gen = owner._generator
        if not job.reuse_cache:
            owner.reset_cache()
        self.prompt_tokens = len(self._prompt)
        self.reused_tokens = 0  # known once the generator streams (see close)
        self.prefilled_tokens = 0
        self.end_reason = ""
        self._djob: Any = None
        self._streaming = False
        self._ended = False
        self._oom = False

    def prefill(self) -> list[int] | None:
        # The generator ends n-gram jobs `num_draft_tokens` early: ask for more; the
        # decode loop stops at max_tokens.
        stop_ids = sorted(self._job.stop_ids)
        self._djob = self._api.make_job(
            self._prompt, self.max_tokens + self._api.num_draft_tokens, stop_ids
        )
        self._gen.enqueue(self._djob)
        return self.step()

    def step(self) -> list[int] | None:
        while not self._ended:
            if self._job.should_stop():
                return None
            ids: list[int] = []
            for r in self._gen.iterate():
                if r.get("job") is not self._djob or r.get("stage") != "streaming":
                    continue
                if not self._streaming:
                    self._streaming = True
                    self.reused_tokens = int(getattr(self._djob, "cached_tokens", 0))
                    self.prefilled_tokens = self.prompt_tokens - self.reused_tokens
                if r.get("token_ids") is not None:
                    ids += [int(t) for t in r["token_ids"].flatten().tolist()]
                held = r.get("held") or {}
                if r.get("eos"):
                    if held.get("token_ids") is not None:
                        ids += [int(t) for t in held["token_ids"].flatten().tolist()]
                    self._ended = True
                    eos = r.get("eos_reason")
                    self.end_reason = "max_tokens" if eos == "max_new_tokens" else "eos"
            if ids:
                return ids
        return []

    def failed(self, error: BaseException) -> BaseException | None:
        oom = self._owner._recover(self.prompt_tokens, error)
        self._oom = oom is not None
        return oom

    def close(self) -> dict[str, Any]:
        if self._djob is not None and self._gen is self._owner._generator and not self._ended:
            with contextlib.suppress(Exception):
                self._gen.cancel(self._djob)  # keeps what was cached (unpaged: page backup)
        if self._oom:  # the failed step's frames (and their GPU tensors) are gone by now
            self._owner.backend._release_memory()
        if not self._streaming:
            return {}
        # Known only once the generator streamed: they replace what start() said.
        return {"reused_tokens": self.reused_tokens, "prefilled_tokens": self.prefilled_tokens}


def dynamic_api(backend: ExLlamaV2Backend, ngram: bool) -> DynamicGeneratorApi:
    """exllamav2's dynamic generator and jobs on `backend`'s model and cache."""
    import torch
    from exllamav2 import ExLlamaV2Tokenizer
    from exllamav2.generator import (
        ExLlamaV2DynamicGenerator,
        ExLlamaV2DynamicJob,
        ExLlamaV2Sampler,
    )

    model, cache = backend.model, backend.cache
    tokenizer = ExLlamaV2Tokenizer(model.config)
    num_draft = 4 if ngram else 0
    settings = ExLlamaV2Sampler.Settings.greedy()

    def make_generator() -> Any:
        # max_batch_size=1: the default sizes a pinned logits buffer for 256 sequences.
        return ExLlamaV2DynamicGenerator(
            model,
            cache,
            tokenizer,
            paged=False,
            max_batch_size=1,
            use_ngram_draft=ngram,
            num_draft_tokens=max(num_draft, 1),
            filter_background_eval=False,
            max_sampling_threads=1,
        )

    def make_job(ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> Any:
        return ExLlamaV2DynamicJob(
            input_ids=torch.tensor([ids], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            gen_settings=settings,
            stop_conditions=stop_ids,
            decode_special_tokens=True,
        )

    return DynamicGeneratorApi(make_generator, make_job, num_draft)


def load_exl2_dynamic(config: ModelConfig) -> Exl2DynamicBackend:
    """Load `config`'s EXL2 model (as the runtime does) and drive it with the generator."""
    backend = load_exllamav2_backend(config)
    try:
        return Exl2DynamicBackend(backend, dynamic_api(backend, config.ngramDraft))
    except BaseException:
        backend.close()
        raise
