"""The latency benchmark's own pieces: where it types, its figures, and a short replay."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from exlsp.benchmarks.latency import (
    Keystroke,
    plan_replay,
    run_replay,
    summarize,
    table,
)
from exlsp.benchmarks.provenance import percentile


def count_chars(text: str) -> int:
    return len(text)


def test_plan_types_at_the_first_code_line_with_enough_text_above() -> None:
    text = "a = 1\n" * 10 + "# a comment\n\n    b = 2\n" + "c = 3\n" * 10
    plan = plan_replay(text, 8, count_chars, min_tokens_before=60)
    assert plan.start_line == 12  # 60 characters above: the comment and the blank skipped
    assert plan.typed == "    b = "
    assert plan.text_before + plan.typed + plan.text_after == text
    assert plan.document == plan.text_before + plan.text_after


def test_plan_stays_inside_a_short_file() -> None:
    text = "x = 1\ny = 2\n"
    plan = plan_replay(text, 6, count_chars, min_tokens_before=1000)
    assert len(plan.typed) == 6
    assert plan.text_before + plan.typed + plan.text_after == text


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5
    assert percentile([], 50) is None


def _done(i: int, kind: str, latency: float, **stats: object) -> Keystroke:
    k = Keystroke(i, "x", kind, "typing", 0, i, i)
    k.outcome = "completed"
    k.latency_ms = latency
    k.stats = dict(stats)
    return k


def test_summary_counts_completed_requests_only() -> None:
    model = dict(source="model", promptTokens=1200, totalMs=12.0, promptBuildMs=0.5)
    records = [
        _done(
            0,
            "line",
            10.0,
            reusedTokens=1199,
            prefilledTokens=1,
            **model,
            generatedTokens=11,
            ttftMs=1.5,
            queueMs=0.0,
        ),
        _done(
            1,
            "newline",
            30.0,
            reusedTokens=1000,
            prefilledTokens=200,
            **model,
            generatedTokens=1,
            ttftMs=20.0,
            queueMs=0.0,
        ),
        _done(
            2,
            "line",
            1.0,
            source="type-ahead",
            promptTokens=1201,
            reusedTokens=0,
            prefilledTokens=0,
            totalMs=0.4,
        ),
    ]
    cancelled = Keystroke(3, "y", "line", "typing", 0, 3, 3)
    cancelled.outcome = "cancelled"
    cancelled.latency_ms = 100.0
    s = summarize([*records, cancelled])
    assert s["requests"]["completed"] == 3 and s["requests"]["cancelled"] == 1
    assert s["latency_ms"]["max"] == 30.0  # the cancelled request is not a latency
    assert s["kv_model"]["line"]["prefilled"]["p50"] == 1
    assert s["kv_model"]["newline"]["prefilled"]["p50"] == 200
    assert s["kv_all"]["line"]["n"] == 2
    assert s["sources"] == {"model": 2, "type-ahead": 1}
    # 10 tokens after the first in 12 - 0.5 - 0 - 1.5 = 10 ms.
    assert s["decode"]["tok_s"] == 1000.0
    assert "reuse" in table({"reuse": s})


@pytest.mark.e2e
def test_a_short_replay_through_the_server(tiny_model: Path, tmp_path: Path) -> None:
    """The instant backend: every request answers, and stats match their request."""
    text = "".join(f"def f{i}(x):\n    return x * {i} + len(str(x))\n\n" for i in range(40))
    file = tmp_path / "replay.py"
    file.write_text(text, encoding="utf-8")
    result = run_replay(
        [sys.executable, "-m", "exlsp.server", "serve"],
        file,
        keystrokes=12,
        rate_hz=50,
        paced_keystrokes=3,
        init_options={
            "model": {"path": str(tiny_model), "backend": "instant"},
            "completion": {"prefixTokens": 256, "suffixTokens": 64},
        },
    )
    counts = result["requests"]
    assert counts["sent"] == 12 and counts["errors"] == 0
    # On a busy machine a request can still be running at the next keystroke.
    assert counts["completed"] + counts["cancelled"] == 12 and counts["completed"] >= 6
    assert counts["with_stats"] + counts["stats_superseded"] == counts["completed"]
    assert result["paced"]["requests"]["with_stats"] == 3  # paced: nothing is cancelled
    assert result["plan"]["tokens_before_cursor"] >= 256
    assert result["prompt_tokens"]["min"] > 100
    assert result["latency_ms"]["p50"] > 0
    assert result["server"]["exit_code"] == 0
    rows = result["request_log"]
    assert [r["i"] for r in rows] == list(range(-1, 15))


def test_the_accepting_typist_takes_what_matches() -> None:
    from exlsp.benchmarks.latency import AcceptStep, accept_length, accept_summary

    assert accept_length("width=70)", "width=70)\n") == len("width=70)")  # all of it
    # They part inside "wide"/"width": the typist takes "self." only.
    assert accept_length("self.wide = 1", "self.width = width\n") == len("self.")
    assert accept_length("):", "):\n") == 2  # short, but all of it
    assert accept_length("x, y", "x + y") == 0  # "x" alone: quicker typed
    steps = [
        AcceptStep(0, 100.0, False, 9, 9),
        AcceptStep(9, 2.0, True, 5, 0, "prefetch"),
        AcceptStep(9, 50.0, False, 0, 0),
        AcceptStep(10, 60.0, False, 0, 0),
    ]
    summary = accept_summary(steps)
    assert summary["accepts"] == 1 and summary["accepted_chars"] == 9
    assert summary["keystrokes"] == 3
    assert summary["accepted_chars_per_keystroke"] == 3.0
    assert summary["wait_after_accept_ms"]["n"] == 1
    assert summary["wait_after_accept_ms"]["p50"] == 2.0
    assert summary["sources_after_accept"] == {"prefetch": 1}
