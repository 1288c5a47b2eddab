"""Hover and refactor latency, and what hovers cost inline completions.

In one process with the configured model (default: the trained tiny model on
CPU), this measures:

- hover latency (p50/p95) over the definitions of a source file, cache cleared;
- resolve latency (p50/p95) of the docstring refactor (refusals counted too);
- inline-completion latency with and without hovers running in the background,
  rounds interleaved so drift on a shared machine hits both alike. Hover jobs
  yield to completions, so the ratio should stay within 1.10.

    python -m exlsp.benchmarks.assist_bench --rounds 3 --out benchmarks/results/assist-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exlsp.benchmarks import provenance
from exlsp.completion.assist.assistant import Assistant, CodeActionsConfig, HoverConfig
from exlsp.completion.assist.edits import RefactorRefused
from exlsp.completion.assist.service import assistant_for
from exlsp.completion.assist.syntax import Span, parse
from exlsp.completion.config import CompletionConfig, EngineConfig, ModelConfig
from exlsp.completion.service import CompletionService
from exlsp.completion.typeahead import TypeAheadCache
from exlsp.completion.types import CompletionRequest, DocumentView

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT / "completion" / "engine.py"


def dist(values: Sequence[float]) -> dict[str, Any]:
    return provenance.dist(values, digits=1)


async def hover_latencies(
    assistant: Assistant, lines: list[str], points: list[tuple[int, int]], config: HoverConfig
) -> tuple[list[float], int]:
    times: list[float] = []
    answered = 0
    for line, char in points:
        assistant._cache.clear()
        t0 = time.perf_counter()
        explanation = await assistant.explain(lines, "python", line, char, config)
        times.append((time.perf_counter() - t0) * 1000)
        answered += explanation is not None
    return times, answered


async def resolve_latencies(
    assistant: Assistant, lines: list[str], points: list[tuple[int, int]], config: CodeActionsConfig
) -> tuple[list[float], dict[str, int]]:
    times: list[float] = []
    outcomes: dict[str, int] = {}
    for line, char in points:
        assistant._cache.clear()
        t0 = time.perf_counter()
        try:
            await assistant.refactor(
                "docstring", lines, "python", Span(line, char, line, char), config
            )
            outcome = "edit"
        except RefactorRefused as e:
            outcome = "refused: " + str(e).split(";")[0]
        times.append((time.perf_counter() - t0) * 1000)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return times, outcomes


async def completion_latencies(
    service: CompletionService,
    lines: list[str],
    cursors: list[tuple[int, int]],
    gap_s: float,
    prefilled: list[int] | None = None,
) -> list[float]:
    engine = service.engine
    assert engine is not None
    engine.type_ahead = TypeAheadCache(engine.config.typeAheadEntries)  # no answers from before
    times: list[float] = []
    for line, char in cursors:
        view = DocumentView("file:///bench.py", lines, line, char, "python", "bench.py")
        t0 = time.perf_counter()
        result = await service.complete(CompletionRequest(view))
        times.append((time.perf_counter() - t0) * 1000)
        if prefilled is not None:
            prefilled.append(result.stats.prefilled_tokens)
        await asyncio.sleep(gap_s)
    return times


async def hover_loop(
    assistant: Assistant, lines: list[str], points: list[tuple[int, int]], config: HoverConfig
) -> None:
    """Hovers one after another, as a user moving the mouse over code while typing."""
    i = 0
    while True:
        assistant._cache.clear()
        line, char = points[i % len(points)]
        await assistant.explain(lines, "python", line, char, config)
        i += 1
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    source = Path(args.source)
    text = source.read_text(encoding="utf-8")
    lines = [line + "\n" for line in text.split("\n")]
    doc = parse(lines, "python")
    assert doc is not None
    defs = [d for d in doc.definitions() if d.kind == "function"][: args.hovers]
    points = [(d.span.start_line, d.span.start_char + 4) for d in defs]
    # Completion cursors: the end of non-blank lines inside those definitions.
    cursors = []
    for d in defs:
        line = min(d.span.start_line + 2, d.span.end_line)
        cursors.append((line, len(lines[line].rstrip("\n"))))

    model = ModelConfig(path=args.model, device="cpu", threads=args.threads)
    completion = CompletionConfig(deadlineMs=1500, maxTokens=24)
    service = CompletionService(EngineConfig(model=model, completion=completion))
    await service.start()
    if service.state != "ready":
        raise SystemExit(f"model failed to load: {service.error}")
    assistant = assistant_for(service)
    assert assistant is not None
    hover_cfg = HoverConfig()
    action_cfg = CodeActionsConfig()
    try:
        await completion_latencies(service, lines, cursors[:2], 0)  # warm up
        hover_ms, answered = await hover_latencies(assistant, lines, points, hover_cfg)
        resolve_ms, outcomes = await resolve_latencies(
            assistant, lines, points[: args.resolves], action_cfg
        )
        alone: list[float] = []
        with_hovers: list[float] = []
        prefill_alone: list[int] = []
        prefill_hovers: list[int] = []
        for _ in range(args.rounds):
            alone += await completion_latencies(service, lines, cursors, args.gap, prefill_alone)
            loop = asyncio.create_task(hover_loop(assistant, lines, points, hover_cfg))
            await asyncio.sleep(0.1)
            with_hovers += await completion_latencies(
                service, lines, cursors, args.gap, prefill_hovers
            )
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
    finally:
        service.close()
    a, h = dist(alone), dist(with_hovers)
    ratio = {k: round(h[k] / a[k], 3) if a.get(k) else None for k in ("p50", "p95", "mean")}
    return {
        "benchmark": "assist",
        "date": provenance.now(),
        "commit": provenance.commit_info(),
        "machine": provenance.machine_info(),
        "model": service.config.model.path or "default (trained tiny)",
        "mode": assistant.mode,
        "config": {
            "hover": vars(hover_cfg),
            "codeActions": vars(action_cfg),
            "threads": args.threads,
            "source": str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(source),
        },
        "hover_ms": dist(hover_ms),
        "hover_answered": answered,
        "resolve_ms": dist(resolve_ms),
        "resolve_outcomes": outcomes,
        "completion_ms_alone": a,
        "completion_ms_with_hovers": h,
        "completion_ratio_with_hovers": ratio,
        "hover_jobs_resumed": assistant.resumed,
        # Hover prompts displace the completion's KV cache: the next completion prefills more.
        "completion_prefilled_tokens_mean": {
            "alone": round(statistics.fmean(prefill_alone), 1) if prefill_alone else None,
            "with_hovers": round(statistics.fmean(prefill_hovers), 1) if prefill_hovers else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model directory (default: the tiny model)")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--hovers", type=int, default=12, help="definitions hovered")
    parser.add_argument("--resolves", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between completions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(f"{'':28}{'p50 ms':>10}{'p95 ms':>10}{'n':>5}")
    for name in ("hover_ms", "resolve_ms", "completion_ms_alone", "completion_ms_with_hovers"):
        d = result[name]
        print(f"{name:28}{d.get('p50', '-'):>10}{d.get('p95', '-'):>10}{d['n']:>5}")
    print(f"completion with/without hovers: {result['completion_ratio_with_hovers']}")
    print(f"resolve outcomes: {result['resolve_outcomes']}")
    print(f"completion prefilled tokens: {result['completion_prefilled_tokens_mean']}")
    if args.out:
        provenance.write_results(Path(args.out), result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
