"""A backend that generates nothing, at once: for measuring the server's own overhead.

It loads only the model directory's tokenizer, so prompts are built exactly as
for a real model, and answers every job with end-of-sequence before any token.
Suggestions are therefore always empty; it never invents text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from exlsp.completion.backends.base import GenerationJob, ModelInfo
from exlsp.completion.tokenizer import HfTokenizer


class InstantBackend:
    name = "instant"

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = HfTokenizer(model_dir)
        self.info = ModelInfo(path=str(model_dir), backend=self.name)

    def stream(self, job: GenerationJob) -> Iterator[int]:
        t0 = time.perf_counter()
        job.stats.prompt_tokens = len(job.prompt)
        job.stats.prefilled_tokens = 0
        job.stats.reused_tokens = len(job.prompt)
        job.stats.stop_reason = "eos"
        job.stats.prefill_ms = (time.perf_counter() - t0) * 1000
        return iter(())

    def reset_cache(self) -> None:
        pass

    def close(self) -> None:
        pass
