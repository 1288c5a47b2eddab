"""The decode loop, written once for every backend.

A backend only starts a `Run` on its KV cache (fit the prompt to its context,
pick the slot, keep the longest common prefix), prefills, and steps: each call
returns the next greedy token(s). Everything a job asks for is applied here:
stop ids, max tokens, the deadline and cancellation (between two steps; a
backend checks `job.should_stop` inside a long prefill too), time to first
token and every other stat.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from exlsp.completion.backends.base import BackendUnavailable, GenerationJob


class Run(Protocol):
    """One job on a backend's KV cache, from `backend.start(job)`."""

    prompt_tokens: int  # after fitting to the context
    reused_tokens: int  # prompt tokens whose K/V were kept
    prefilled_tokens: int  # prompt tokens run so far (what a stopped prefill reached)
    max_tokens: int  # job.max_tokens, fitted to the room left in the context
    # Why the model ended when a step returned no token ("eos", "max_tokens",
    # "context_full"); the loop then says "eos" where this is empty.
    end_reason: str

    def prefill(self) -> list[int] | None:
        """Run the prompt's uncached tokens; the first token(s), or None if stopped."""
        ...

    def step(self) -> list[int] | None:
        """The token(s) after all returned so far; [] when the model ended, None if stopped.

        Several tokens come back at once where a backend drafts (n-gram drafting)
        or a remote server streams text pieces.
        """
        ...

    def failed(self, error: BaseException) -> BaseException | None:
        """Recover after `error` (reset the cache); an error to raise instead, if any."""
        ...

    def close(self) -> Mapping[str, Any]:
        """End the run (the job ended, however); figures the backend measured itself
        (a remote server's reused tokens and timings) to apply to the job's stats."""
        ...


def decode(backend: Any, job: GenerationJob) -> Iterator[int]:
    """Yield the tokens `backend` generates for `job`, filling `job.stats`."""
    stats = job.stats
    reason = job.should_stop()
    if reason:
        stats.stop_reason = reason
        return
    t0 = time.perf_counter()
    try:
        run: Run = backend.start(job)
    except BaseException as e:
        stats.stop_reason = "unavailable" if isinstance(e, BackendUnavailable) else "error"
        raise
    stats.prompt_tokens = run.prompt_tokens
    stats.reused_tokens = run.reused_tokens
    replacement: BaseException | None = None
    first_at: float | None = None
    try:
        pending = run.prefill()
        stats.prefilled_tokens = run.prefilled_tokens
        stats.prefill_ms = (time.perf_counter() - t0) * 1000
        max_tokens = min(job.max_tokens, run.max_tokens)
        generated = 0
        while True:
            if pending is None:
                stats.stop_reason = job.should_stop() or "cancelled"
                return
            if not pending:
                stats.stop_reason = run.end_reason or "eos"
                return
            if generated >= max_tokens:
                stats.stop_reason = "max_tokens"
                return
            for token in pending:
                if token in job.stop_ids:
                    stats.stop_reason = "eos"
                    return
                generated += 1
                stats.generated_tokens = generated
                if first_at is None:
                    first_at = time.perf_counter()
                    stats.ttft_ms = (first_at - t0) * 1000
                yield token
                if generated >= max_tokens:
                    stats.stop_reason = "max_tokens"
                    return
                reason = job.should_stop()
                if reason:
                    stats.stop_reason = reason
                    return
            pending = run.step()
    except GeneratorExit:
        stats.stop_reason = stats.stop_reason or "closed"
        raise
    except Exception as e:
        stats.stop_reason = "error"
        replacement = run.failed(e)
        if replacement is None:
            raise
    finally:
        if first_at is not None:
            stats.decode_ms = (time.perf_counter() - first_at) * 1000
        for name, value in run.close().items():
            setattr(stats, name, value)
    # Raised here, not in the handler: the original error's frames (which may hold
    # GPU tensors) are released by now.
    raise replacement
