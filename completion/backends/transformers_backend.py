"""The reference backend: any local Hugging Face causal LM, CPU or CUDA.

It keeps one sequence's KV cache between jobs. A new prompt is compared with
the tokens whose keys and values are in the cache (the previous prompt plus
what was generated after it); the longest common prefix is kept, the cache is
cropped to it, and only the rest is prefilled. Decoding is greedy, one token
per forward pass, and the job's cancel flag and deadline are checked between
two passes.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from exlsp.completion.backends.base import GenerationJob, ModelInfo, common_prefix_length
from exlsp.completion.config import ModelConfig
from exlsp.completion.tokenizer import HfTokenizer

log = logging.getLogger(__name__)

# Tokens per prefill pass of a background job: the longest a completion waits for one.
BACKGROUND_PREFILL_CHUNK = 64


def _pick_device(torch: Any, device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _pick_dtype(torch: Any, dtype: str, device: str) -> Any:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {
            "float32": torch.float32,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "float64": torch.float64,
        }[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}") from None


class TransformersBackend:
    name = "transformers"

    def __init__(self, config: ModelConfig, model_dir: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # stderr is the editor's log: no progress bars

        self._torch = torch
        self._cache_cls = DynamicCache
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.tokenizer = HfTokenizer(model_dir)
        self.device = _pick_device(torch, config.device)
        dtype = _pick_dtype(torch, config.dtype, self.device)
        hf_config = AutoConfig.from_pretrained(model_dir)
        loader: Any = AutoModelForCausalLM.from_pretrained
        # safetensors only: pickled weights (.bin, .pt) can run code when loaded.
        self.model: Any = loader(str(model_dir), dtype=dtype, use_safetensors=True)
        self.model.to(self.device)
        self.model.eval()
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old
        # name warns on every call and goes in 5.40).
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        limit = int(getattr(hf_config, "max_position_embeddings", 0) or 4096)
        self.context_length = min(limit, config.contextLength) if config.contextLength else limit
        self.info = ModelInfo(
            path=str(model_dir),
            backend=self.name,
            architectures=tuple(getattr(hf_config, "architectures", None) or ()),
            model_type=str(getattr(hf_config, "model_type", "")),
            context_length=self.context_length,
            parameters=sum(p.numel() for p in self.model.parameters()),
            device=self.device,
            dtype=str(dtype).removeprefix("torch."),
        )
        # The weights' memory (the KV cache grows with use on top of it).
        self.weight_bytes = sum(
            t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers())
        )
        self._past: Any = None
        self._cached: list[int] = []  # tokens whose K/V are in self._past, in order
        self._slot = "main"
        # The other slots' caches, least recently used first; with the current one
        # at most `max_slots` are kept (a model host serves several editors).
        self._parked: dict[str, tuple[Any, list[int]]] = {}
        self.max_slots = max(1, config.hostSlots)

    # -- KV cache ------------------------------------------------------------

    def reset_cache(self) -> None:
        self._past = None
        self._cached = []

    def _use_slot(self, slot: str) -> None:
        """Switch to the KV cache of `slot`, keeping the current one for later."""
        if slot == self._slot:
            return
        self._parked[self._slot] = (self._past, self._cached)
        self._past, self._cached = self._parked.pop(slot, (None, []))
        self._slot = slot
        while self._parked and len(self._parked) + 1 > self.max_slots:
            evicted = next(iter(self._parked))
            del self._parked[evicted]
            log.debug("KV cache of slot %s dropped (%d slots kept)", evicted, self.max_slots)

    def slot_bytes(self) -> dict[str, int]:
        """The KV cache memory of each slot (its DynamicCache tensors' bytes)."""
        caches = {**{s: past for s, (past, _) in self._parked.items()}, self._slot: self._past}
        return {slot: _cache_bytes(past) for slot, past in caches.items()}

    def _keep(self, n: int) -> None:
        """Crop the cache to its first `n` tokens."""
        drop = len(self._cached) - n
        if drop > 0 and self._past is not None:
            if n == 0:
                self.reset_cache()
                return
            self._past.crop(-drop)
            del self._cached[n:]

    def _forward(self, ids: list[int]) -> Any:
        torch = self._torch
        if self._past is None:
            self._past = self._cache_cls(config=self.model.config)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                **{self._cache_arg: self._past},
                use_cache=True,
                logits_to_keep=1,
            )
        self._cached.extend(ids)
        return out.logits[0, -1]

    def _prefill(self, ids: list[int], job: GenerationJob) -> Any:
        """Run `ids` after the cached tokens; the last logits, or None if stopped.

        A completion prefills in one pass: a newer keystroke shares most of its
        prompt, so finishing the pass is not wasted. Background work (hover, code
        actions) prefills in chunks and looks for preemption between them, so a
        completion that arrives waits for one chunk, not for a whole prompt. What
        was prefilled before a stop stays cached for the job's resumption.
        """
        # "main", or "<session>/main" in a model host.
        step = len(ids) if job.slot.rpartition("/")[2] == "main" else BACKGROUND_PREFILL_CHUNK
        logits = None
        for start in range(0, len(ids), step):
            if start and job.should_stop():
                return None
            logits = self._forward(ids[start : start + step])
        return logits

    # -- generation ----------------------------------------------------------

    def start(self, job: GenerationJob) -> _TransformersRun:
        prompt = list(job.prompt)
        if not prompt:
            raise ValueError("empty prompt")
        # Room for the prompt and the reply within the model's context; past it, the
        # prompt's end (the cursor side) is kept. The engine's budgets normally prevent it.
        room = max(1, self.context_length - min(job.max_tokens, self.context_length // 2))
        if len(prompt) > room:
            prompt = prompt[-room:]
        self._use_slot(job.slot)
        if not job.reuse_cache:
            self.reset_cache()
        # At least the last prompt token is prefilled: its logits give the first token.
        keep = min(common_prefix_length(self._cached, prompt), len(prompt) - 1)
        self._keep(keep)
        return _TransformersRun(self, job, prompt, keep)

    def close(self) -> None:
        self.reset_cache()
        self._parked.clear()
        self.model = None


def _cache_bytes(past: Any) -> int:
    if past is None:
        return 0
    total = 0
    for layer in getattr(past, "layers", ()):
        for value in vars(layer).values():
            if hasattr(value, "element_size") and hasattr(value, "numel"):
                total += int(value.numel() * value.element_size())
    return total


class _TransformersRun:
    """One job on the backend's cache: greedy, one token per forward pass."""

    end_reason = ""

    def __init__(
        self, backend: TransformersBackend, job: GenerationJob, prompt: list[int], keep: int
    ):
        self._b = backend
        self._job = job
        self._prompt = prompt
        self.prompt_tokens = len(prompt)
        self.reused_tokens = keep
        self.prefilled_tokens = len(prompt) - keep
        self.max_tokens = job.max_tokens
        self._last: int | None = None

    def _pick(self, logits: Any) -> list[int]:
        self._last = int(self._b._torch.argmax(logits).item())
        return [self._last]

    def prefill(self) -> list[int] | None:
        logits = self._b._prefill(self._prompt[self.reused_tokens :], self._job)
        return None if logits is None else self._pick(logits)

    def step(self) -> list[int] | None:
        assert self._last is not None
        if len(self._b._cached) + 1 >= self._b.context_length:
            self.end_reason = "context_full"
            return []
        return self._pick(self._b._forward([self._last]))

    def failed(self, error: BaseException) -> BaseException | None:
        # A failed forward leaves the cache in an unknown state.
        self._b.reset_cache()
        return None

    def close(self) -> dict[str, Any]:
        return {}
