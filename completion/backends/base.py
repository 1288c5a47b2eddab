"""The backend protocol: streaming token generation with KV reuse.

A backend is driven from exactly one thread (the `BackendWorker`'s). It only
starts a run on its KV cache, prefills and steps (`completion/decode.py`'s
`Run`); the one decode loop, `decode`, applies stop ids, max tokens, the
deadline, cancellation and the stats for every backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from exlsp.completion.tokenizer import Tokenizer
from exlsp.completion.types import KvReuseStats


class BackendUnavailable(RuntimeError):
    """The backend cannot serve now (a remote server is down, refuses or answers garbage).

    The message is for the user; `retry_in` is how long, in seconds, the backend
    answers every job with this error before it tries again.
    """

    def __init__(self, message: str, retry_in: float = 0.0) -> None:
        super().__init__(message)
        self.retry_in = retry_in


class BackendDied(RuntimeError):
    """The backend cannot go on (a crashed device, a corrupted state): every later job
    would fail too. The service then serves with the next model of the fallback chain.

    An error a backend recovers from (exllamav2's out-of-memory during a generation
    resets its cache and goes on) is not this; neither is a remote outage.
    """


def is_fatal(error: BaseException) -> bool:
    """A generation error after which the backend cannot serve again."""
    # A CUDA error (an illegal memory access, a device-side assert) poisons the
    # process's CUDA context: every later call fails with it.
    return isinstance(error, BackendDied) or str(error).startswith("CUDA error")


@dataclass
class GenerationJob:
    prompt: Sequence[int]
    stop_ids: frozenset[int]
    max_tokens: int
    deadline: float = float("inf")  # time.monotonic() seconds
    reuse_cache: bool = True  # False: drop the KV cache first (the no-reuse baseline)
    # Which KV cache the job uses where a backend keeps several: background work
    # (hover, code actions) must not evict the completion's cached prompt.
    slot: str = "main"
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: KvReuseStats = field(default_factory=KvReuseStats)

    def should_stop(self) -> str | None:
        """The reason to stop before the next decode step, if any."""
        if self.cancel.is_set():
            return "cancelled"
        if time.monotonic() >= self.deadline:
            return "deadline"
        return None


@dataclass(frozen=True)
class ModelInfo:
    path: str
    backend: str
    architectures: tuple[str, ...] = ()
    model_type: str = ""
    context_length: int = 4096
    parameters: int | None = None
    device: str = "cpu"
    dtype: str = ""


class Backend(Protocol):
    # Read-only: a backend may hold a narrower tokenizer (HfTokenizer).
    @property
    def name(self) -> str: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def info(self) -> ModelInfo: ...

    def start(self, job: GenerationJob) -> Any:
        """A `decode.Run` for `job.prompt` on the KV cache (its common prefix kept)."""
        ...

    def reset_cache(self) -> None:
        """Forget the KV cache (the next job prefills its whole prompt)."""
        ...

    def close(self) -> None: ...


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    # Fast path: compare in blocks (list slices compare in C).
    lo = 0
    step = 256
    while lo + step <= n and list(a[lo : lo + step]) == list(b[lo : lo + step]):
        lo += step
    while lo < n and a[lo] == b[lo]:
        lo += 1
    return lo
