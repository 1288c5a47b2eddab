"""Small fakes of the backend and tokenizer seams for unit tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

from exlsp.completion.backends.base import GenerationJob, ModelInfo, common_prefix_length

QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
_BASE = 0x110000  # above every code point


class CharTokenizer:
    """One token per character; special tokens get ids above the code points."""

    def __init__(self, specials: Sequence[str] = QWEN_SPECIALS, eos: str = "<|endoftext|>"):
        self._special = {s: _BASE + i for i, s in enumerate(specials)}
        self._names = {v: k for k, v in self._special.items()}
        self.special_tokens = frozenset(specials)
        self.bos_id = None
        self.eos_ids = frozenset({self._special[eos]})
        self.encode_calls = 0

    def encode(self, text: str) -> list[int]:
        self.encode_calls += 1
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._names.get(i, "\ufffd") if i >= _BASE else chr(i) for i in ids)

    def token_to_id(self, token: str) -> int | None:
        return self._special.get(token)


class ScriptedBackend:
    """Emits `script(prompt_text)` one character per step, `step_s` seconds per step.

    Tracks KV reuse like a real backend (longest common prefix with the last
    sequence), so the engine's reuse accounting can be checked.
    """

    name = "scripted"

    def __init__(self, tokenizer: CharTokenizer, script, step_s: float = 0.0):  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self.script = script
        self.step_s = step_s
        self.info = ModelInfo(path="<scripted>", backend=self.name)
        self.cached: list[int] = []
        self.jobs: list[GenerationJob] = []
        self.started = threading.Event()

    def stream(self, job: GenerationJob) -> Iterator[int]:
        self.jobs.append(job)
        prompt = list(job.prompt)
        if not job.reuse_cache:
            self.cached = []
        keep = min(common_prefix_length(self.cached, prompt), len(prompt) - 1)
        job.stats.prompt_tokens = len(prompt)
        job.stats.reused_tokens = keep
        job.stats.prefilled_tokens = len(prompt) - keep
        self.cached = prompt
        self.started.set()
        text = self.script(self.tokenizer.decode(prompt))
        t0 = time.perf_counter()
        for i, ch in enumerate(text):
            reason = job.should_stop()
            if reason:
                job.stats.stop_reason = reason
                return
            if self.step_s:
                time.sleep(self.step_s)
            if job.stats.ttft_ms is None:
                job.stats.ttft_ms = (time.perf_counter() - t0) * 1000
            job.stats.generated_tokens = i + 1
            self.cached.append(ord(ch))
            yield ord(ch)
            if i + 1 >= job.max_tokens:
                job.stats.stop_reason = "max_tokens"
                return
        job.stats.stop_reason = "eos"

    def reset_cache(self) -> None:
        self.cached = []

    def close(self) -> None:
        pass
