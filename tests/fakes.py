"""Small fakes of the backend and tokenizer seams for unit tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

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


class ScriptedRun:
    """One character a step; the script's end is the model's end of sequence."""

    end_reason = "eos"

    def __init__(self, backend: ScriptedBackend, job: GenerationJob, keep: int, text: str):
        self.backend = backend
        self.prompt_tokens = len(job.prompt)
        self.reused_tokens = keep
        self.prefilled_tokens = len(job.prompt) - keep
        self.max_tokens = job.max_tokens
        self.text = text
        self.at = 0

    def prefill(self) -> list[int] | None:
        return self.step()

    def step(self) -> list[int] | None:
        if self.at >= len(self.text):
            return []
        if self.backend.step_s:
            time.sleep(self.backend.step_s)
        token = ord(self.text[self.at])
        self.at += 1
        self.backend.cached.append(token)
        return [token]

    def failed(self, error: BaseException) -> BaseException | None:
        return None

    def close(self) -> dict[str, object]:
        return {}


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

    def start(self, job: GenerationJob) -> ScriptedRun:
        self.jobs.append(job)
        prompt = list(job.prompt)
        if not job.reuse_cache:
            self.cached = []
        keep = min(common_prefix_length(self.cached, prompt), len(prompt) - 1)
        self.cached = prompt
        self.started.set()
        return ScriptedRun(self, job, keep, self.script(self.tokenizer.decode(prompt)))

    def reset_cache(self) -> None:
        self.cached = []

    def close(self) -> None:
        pass
