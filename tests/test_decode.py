"""The one decode loop: what it applies for every backend, checked with a scripted Run."""

from __future__ import annotations

import time
from typing import Any

import pytest

from exlsp.completion.backends.base import BackendUnavailable, GenerationJob
from exlsp.completion.decode import decode


class StepRun:
    """Returns `steps[0]` from prefill, then each next list from step()."""

    def __init__(self, steps: list[list[int] | None], **figures: Any) -> None:
        self.steps = list(steps)
        self.prompt_tokens = 10
        self.reused_tokens = 7
        self.prefilled_tokens = 3
        self.max_tokens = 1000
        self.end_reason = ""
        self.figures = figures
        self.closed = 0
        self.on_step: Any = None
        self.error: BaseException | None = None
        self.replacement: BaseException | None = None

    def prefill(self) -> list[int] | None:
        return self.step()

    def step(self) -> list[int] | None:
        if self.on_step is not None:
            self.on_step()
        if self.error is not None and len(self.steps) == 1:
            raise self.error
        return self.steps.pop(0) if self.steps else []

    def failed(self, error: BaseException) -> BaseException | None:
        return self.replacement

    def close(self) -> dict[str, Any]:
        self.closed += 1
        return self.figures


class StepBackend:
    def __init__(self, run: StepRun | BaseException) -> None:
        self.run = run

    def start(self, job: GenerationJob) -> StepRun:
        if isinstance(self.run, BaseException):
            raise self.run
        return self.run


def job(**kw: Any) -> GenerationJob:
    kw.setdefault("stop_ids", frozenset({0}))
    kw.setdefault("max_tokens", 100)
    return GenerationJob(prompt=list(range(1, 11)), **kw)


def test_tokens_until_a_stop_id_with_stats() -> None:
    run = StepRun([[5], [6, 7], [0, 9]])
    j = job()
    assert list(decode(StepBackend(run), j)) == [5, 6, 7]
    s = j.stats
    assert (s.stop_reason, s.generated_tokens) == ("eos", 3)
    assert (s.prompt_tokens, s.reused_tokens, s.prefilled_tokens) == (10, 7, 3)
    assert s.ttft_ms is not None and s.prefill_ms >= 0
    assert run.closed == 1


def test_max_tokens_cuts_inside_a_multi_token_step_and_the_run_may_lower_it() -> None:
    j = job(max_tokens=3)
    assert list(decode(StepBackend(StepRun([[5, 6], [7, 8, 9]])), j)) == [5, 6, 7]
    assert j.stats.stop_reason == "max_tokens"
    run = StepRun([[5], [6], [7]])
    run.max_tokens = 2  # no more room in the context
    j = job()
    assert list(decode(StepBackend(run), j)) == [5, 6]
    assert j.stats.stop_reason == "max_tokens"


def test_the_model_end_reason_of_an_empty_step() -> None:
    run = StepRun([[5], []])
    run.end_reason = "context_full"
    j = job()
    assert list(decode(StepBackend(run), j)) == [5]
    assert j.stats.stop_reason == "context_full"
    j = job()
    assert list(decode(StepBackend(StepRun([[5], []])), j)) == [5]
    assert j.stats.stop_reason == "eos"


def test_cancel_between_steps_and_a_stopped_prefill() -> None:
    j = job()
    run = StepRun([[5], [6], [7]])
    run.on_step = lambda: len(run.steps) == 2 and j.cancel.set()
    # The token of the step during which the cancel came is the last one.
    assert list(decode(StepBackend(run), j)) == [5, 6]
    assert j.stats.stop_reason == "cancelled" and run.steps == [[7]]
    j = job(deadline=time.monotonic() + 3600)
    run = StepRun([None])  # the backend saw the deadline pass inside its prefill
    assert list(decode(StepBackend(run), j)) == []
    assert j.stats.stop_reason == "cancelled"
    j = job(deadline=time.monotonic() - 1)
    assert list(decode(StepBackend(StepRun([[5]])), j)) == []
    assert j.stats.stop_reason == "deadline"


def test_a_failure_is_replaced_by_the_backend_error_and_the_run_closes() -> None:
    run = StepRun([[5], [6]])
    run.error = RuntimeError("CUDA out of memory")
    run.replacement = MemoryError("GPU out of memory; the cache was reset")
    j = job()
    out: list[int] = []
    with pytest.raises(MemoryError) as info:
        for t in decode(StepBackend(run), j):
            out.append(t)
    assert out == [5] and j.stats.stop_reason == "error" and run.closed == 1
    assert info.value.__context__ is None  # raised outside the handler: frames released
    run = StepRun([[5], [6]])
    run.error = ValueError("bad")
    with pytest.raises(ValueError):
        list(decode(StepBackend(run), job()))


def test_figures_from_the_backend_replace_the_estimates() -> None:
    run = StepRun([[5], [0]], reuse_known=True, reused_tokens=9, prefilled_tokens=1)
    j = job()
    list(decode(StepBackend(run), j))
    assert (j.stats.reused_tokens, j.stats.prefilled_tokens, j.stats.reuse_known) == (9, 1, True)


def test_a_start_failure_names_the_reason() -> None:
    j = job()
    with pytest.raises(BackendUnavailable):
        list(decode(StepBackend(BackendUnavailable("down", retry_in=1)), j))
    assert j.stats.stop_reason == "unavailable"
    j = job()
    with pytest.raises(ValueError):
        list(decode(StepBackend(ValueError("empty prompt")), j))
    assert j.stats.stop_reason == "error"


def test_closing_the_generator_early_closes_the_run() -> None:
    run = StepRun([[5], [6], [7]])
    j = job()
    gen = decode(StepBackend(run), j)
    assert next(gen) == 5
    gen.close()
    assert run.closed == 1 and j.stats.stop_reason == "closed"
