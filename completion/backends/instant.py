"""A backend that generates nothing, at once: for measuring the server's own overhead.

It loads only the model directory's tokenizer, so prompts are built exactly as
for a real model, and answers every job with end-of-sequence before any token.
Suggestions are therefore always empty; it never invents text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exlsp.completion.backends.base import GenerationJob, ModelInfo
from exlsp.completion.tokenizer import HfTokenizer


class InstantBackend:
    name = "instant"

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = HfTokenizer(model_dir)
        self.info = ModelInfo(path=str(model_dir), backend=self.name)

    def start(self, job: GenerationJob) -> _InstantRun:
        return _InstantRun(len(job.prompt))

    def reset_cache(self) -> None:
        pass

    def close(self) -> None:
        pass


class _InstantRun:
    """The whole prompt counts as reused; the model ends before its first token."""

    end_reason = "eos"
    prefilled_tokens = 0

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = self.reused_tokens = self.max_tokens = prompt_tokens

    def prefill(self) -> list[int]:
        return []

    def step(self) -> list[int]:
        return []

    def failed(self, error: BaseException) -> None:
        return None

    def close(self) -> dict[str, Any]:
        return {}
