"""The engine with a scripted backend: type-ahead, attaching, latest wins, deadline, snippets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from exlsp.completion.config import CompletionConfig
from exlsp.completion.engine import CompletionEngine
from exlsp.completion.fim import TEMPLATES, FimTokens
from exlsp.completion.typeahead import accepted_place, accepted_view, place_key
from exlsp.completion.types import (
    CompletionRequest,
    CursorContext,
    DocumentView,
    InvalidPosition,
    Snippet,
)
from exlsp.completion.worker import BackendWorker
from exlsp.server.documents import split_lines
from tests.fakes import CharTokenizer, ScriptedBackend

DOC = "def add(a, b):\n    \n\nprint(add(1, 2))\n"


def req(text: str, line: int, character: int, uri: str = "file:///m.py") -> CompletionRequest:
    return CompletionRequest(DocumentView(uri, split_lines(text), line, character, "python"))


@pytest.fixture
async def make_engine() -> AsyncIterator[Callable[..., tuple[CompletionEngine, ScriptedBackend]]]:
    workers: list[BackendWorker] = []

    async def make(script, step_s: float = 0.0, context=None, **cfg):  # type: ignore[no-untyped-def]
        tok = CharTokenizer()
        backend = ScriptedBackend(tok, script, step_s)
        worker = BackendWorker("test")
        workers.append(worker)
        await worker.load(lambda: backend)
        fim = FimTokens.resolve(TEMPLATES["qwen2.5-coder"], tok)
        # Prefetching adds background jobs: only the tests about it turn it on.
        config = CompletionConfig(**{"prefetch": False, **cfg})
        engine = CompletionEngine(worker, tok, fim, config, context)
        return engine, backend

    yield make  # type: ignore[misc]
    for w in workers:
        w.close()


async def test_completes_and_reports_stats(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda prompt: "return a + b\n\ndef other():\n")
    result = await engine.complete(req(DOC, 1, 4))
    assert [s.text for s in result.suggestions] == ["return a + b"]
    st = result.stats
    assert st.source == "model"
    assert st.prompt_tokens == len(backend.jobs[0].prompt)
    assert st.prefilled_tokens == st.prompt_tokens
    assert st.generated_tokens >= len("return a + b")


async def test_filters_stop_generation_early(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda p: "return a + b\nprint('x')\n" + "z" * 200, 0.002)
    result = await engine.complete(req(DOC, 1, 4))
    assert result.suggestions[0].text == "return a + b"
    # The scope filter cut at the dedented line: the job stopped long before 200 more tokens.
    assert backend.jobs[0].stats.generated_tokens < 60


async def test_type_ahead_answers_without_a_model_call(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda p: "return a + b\n")
    await engine.complete(req(DOC, 1, 4))
    typed = DOC.replace("    \n", "    ret\n", 1)
    result = await engine.complete(req(typed, 1, 7))
    assert result.stats.source == "type-ahead"
    assert result.suggestions[0].text == "urn a + b"
    assert len(backend.jobs) == 1
    # Backspace to where it was: the cached suggestion again.
    again = await engine.complete(req(DOC, 1, 4))
    assert again.suggestions[0].text == "return a + b"
    assert len(backend.jobs) == 1


async def test_typing_away_from_the_suggestion_asks_the_model(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda p: "return a + b\n")
    await engine.complete(req(DOC, 1, 4))
    await engine.complete(req(DOC.replace("    \n", "    x\n", 1), 1, 5))
    assert len(backend.jobs) == 2
    # The second prompt differs only after the middle marker: most of it was reused.
    st = backend.jobs[1].stats
    assert st.prefilled_tokens <= 3
    assert st.reused_tokens == st.prompt_tokens - st.prefilled_tokens


async def test_a_consistent_request_attaches_to_the_running_generation(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda p: "return a + b\n", step_s=0.02)
    first = asyncio.create_task(engine.complete(req(DOC, 1, 4)))
    await asyncio.sleep(0.07)  # a few tokens are out: "ret..."
    typed = DOC.replace("    \n", "    r\n", 1)
    second = await engine.complete(req(typed, 1, 5))
    assert second.stats.source == "attached"
    assert second.suggestions[0].text == "eturn a + b"
    assert (await first).suggestions[0].text == "return a + b"
    assert len(backend.jobs) == 1


async def test_latest_request_wins(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda p: "x" * 40 + "\n", step_s=0.01)
    first = asyncio.create_task(engine.complete(req(DOC, 1, 4)))
    await asyncio.sleep(0.05)
    other = "def sub(a, b):\n    \n"
    second = await engine.complete(req(other, 1, 4, uri="file:///other.py"))
    r1 = await first
    assert backend.jobs[0].stats.stop_reason == "cancelled"
    assert backend.jobs[0].stats.generated_tokens < 20
    assert second.suggestions
    assert r1.stats.stop_reason == "cancelled"


async def test_cancelled_request_cancels_its_generation_after_the_grace(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda p: "y" * 200 + "\n", step_s=0.01, attachGraceMs=20)
    task = asyncio.create_task(engine.complete(req(DOC, 1, 4)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    job = backend.jobs[0]
    assert job.stats.stop_reason == "cancelled"
    assert job.stats.generated_tokens < 30


async def test_deadline_returns_what_is_ready(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(
        lambda p: "value = 1 + 2 + 3 + 4 + 5 + 6\n", step_s=0.02, deadlineMs=150
    )
    result = await engine.complete(req(DOC, 1, 4))
    assert backend.jobs[0].stats.stop_reason == "deadline"
    text = result.suggestions[0].text
    assert 0 < len(text) < len("value = 1 + 2 + 3 + 4 + 5 + 6")
    assert "value = 1 + 2 + 3 + 4 + 5 + 6".startswith(text)


async def test_invalid_positions_are_rejected(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, _ = await make_engine(lambda p: "x")
    with pytest.raises(InvalidPosition):
        await engine.complete(req(DOC, 99, 0))
    with pytest.raises(InvalidPosition):
        await engine.complete(req(DOC, 0, 500))


async def test_the_cursor_line_is_cut_once_per_request(  # type: ignore[no-untyped-def]
    make_engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = await make_engine(lambda p: "return a + b\n")
    cuts: list[CursorContext] = []
    cut = CursorContext.at.__func__  # type: ignore[attr-defined]

    def counting(cls, doc, multiline=False):  # type: ignore[no-untyped-def]
        cuts.append(cut(cls, doc, multiline))
        return cuts[-1]

    monkeypatch.setattr(CursorContext, "at", classmethod(counting))
    result = await engine.complete(req(DOC, 1, 4))
    assert [s.text for s in result.suggestions] == ["return a + b"]
    assert len(cuts) == 1, "the prompt, the filters and type-ahead share the request's cut"
    assert result.cursor is cuts[0]
    assert (result.cursor.left, result.cursor.right, result.cursor.ending) == ("    ", "", "\n")
    assert result.cursor.above == ("def add(a, b):",)
    assert result.cursor.below == ("", "print(add(1, 2))", "")
    assert result.cursor.multiline


def test_cursor_context_checks_the_position() -> None:
    doc = req("ab\r\ncd", 1, 2).document
    cursor = CursorContext.at(doc)
    assert (cursor.left, cursor.right, cursor.ending, cursor.above) == ("cd", "", "", ("ab",))
    for line, character in [(2, 0), (-1, 0), (0, 3), (0, -1)]:
        with pytest.raises(InvalidPosition):
            CursorContext.at(req("ab\r\ncd", line, character).document)


class CountingContext:
    def __init__(self) -> None:
        self.calls = 0

    async def snippets(self, document: DocumentView, budget_chars: int) -> list[Snippet]:
        self.calls += 1
        return [Snippet("util.py", f"def helper_{self.calls}():\n    pass\n")]


async def test_snippets_are_sticky_while_typing(make_engine) -> None:  # type: ignore[no-untyped-def]
    ctx = CountingContext()
    engine, backend = await make_engine(lambda p: "pass\n", context=ctx, snippetRefreshLines=10)
    text = "".join(f"x{i} = {i}\n" for i in range(100))
    lines = split_lines(text)
    for n in range(8):
        lines[50] = "y" * n + "\n"
        await engine.complete(CompletionRequest(DocumentView("u", list(lines), 50, n, "python")))
    assert ctx.calls == 1
    await engine.complete(CompletionRequest(DocumentView("u", list(lines), 80, 0, "python")))
    assert ctx.calls == 2
    # The snippet is in the prompt the backend saw.
    assert "helper_2" in backend.tokenizer.decode(backend.jobs[-1].prompt)


async def test_background_jobs_yield_to_completions(make_engine) -> None:  # type: ignore[no-untyped-def]
    from exlsp.completion.backends.base import GenerationJob

    engine, backend = await make_engine(lambda p: "z" * 100 + "\n", step_s=0.01)
    worker = engine.worker
    tok = backend.tokenizer
    hover = worker.submit(
        GenerationJob(prompt=tok.encode("explain"), stop_ids=frozenset(), max_tokens=100),
        background=True,
    )
    await asyncio.sleep(0.05)
    result = await engine.complete(req(DOC, 1, 4))
    assert result.stats.source == "model"
    await hover.done
    assert hover.job.stats.stop_reason == "cancelled"  # preempted by the completion
    # A background job submitted while a completion runs waits and does not cancel it.
    first = asyncio.create_task(engine.complete(req(DOC.replace("    \n", "    q\n"), 1, 5)))
    await asyncio.sleep(0.03)
    later = worker.submit(
        GenerationJob(prompt=tok.encode("explain"), stop_ids=frozenset(), max_tokens=3),
        background=True,
    )
    done = await first
    assert done.stats.stop_reason != "cancelled"
    await later.done
    assert later.job.stats.generated_tokens == 3


class SlowContext:
    """Snippets after `delay_s`; counts the fetches that finish and those that start."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.started = 0
        self.finished = 0

    async def snippets(self, document: DocumentView, budget_chars: int) -> list[Snippet]:
        self.started += 1
        await asyncio.sleep(self.delay_s)
        self.finished += 1
        return [Snippet("util.py", f"def helper_{self.started}():\n    pass\n")]


async def test_a_cancelled_request_leaves_its_snippet_fetch_to_the_next(make_engine) -> None:  # type: ignore[no-untyped-def]
    ctx = SlowContext(0.2)
    engine, backend = await make_engine(lambda p: "pass\n", context=ctx)
    lines = split_lines("x = 1\n" * 20)
    first = asyncio.create_task(
        engine.complete(CompletionRequest(DocumentView("u", list(lines), 5, 0, "python")))
    )
    await asyncio.sleep(0.05)
    first.cancel()  # the editor moved on while the snippets were being fetched
    with pytest.raises(asyncio.CancelledError):
        await first
    lines[5] = "y\n"
    result = await engine.complete(
        CompletionRequest(DocumentView("u", list(lines), 5, 1, "python"))
    )
    assert result.stats.source == "model"
    assert ctx.started == 1  # the second request waited for the first one's fetch
    assert "helper_1" in backend.tokenizer.decode(backend.jobs[-1].prompt)


async def test_snippets_refresh_while_idle_and_the_new_prompt_is_prefilled(make_engine) -> None:  # type: ignore[no-untyped-def]
    ctx = CountingContext()
    engine, backend = await make_engine(lambda p: "pass\n", context=ctx, snippetRefreshIdleMs=100)
    lines = split_lines("x = 1\n" * 20)
    lines[5] = "y = \n"
    await engine.complete(CompletionRequest(DocumentView("u", lines, 5, 4, "python")))
    assert ctx.calls == 1
    await asyncio.sleep(0.4)  # idle: the snippets are fetched again, the prompt prefilled
    assert ctx.calls == 2
    assert engine.warmups == 1
    warm = backend.jobs[-1]
    assert warm.max_tokens == 1
    assert "helper_2" in backend.tokenizer.decode(warm.prompt)
    lines[5] = "y = 2\n"
    result = await engine.complete(CompletionRequest(DocumentView("u", lines, 5, 5, "python")))
    assert "helper_2" in backend.tokenizer.decode(backend.jobs[-1].prompt)
    # The warm-up paid for the new snippets: this keystroke prefills only what was typed.
    assert result.stats.prefilled_tokens == 1
    assert result.stats.reused_tokens == result.stats.prompt_tokens - 1


async def test_snippets_stay_fixed_while_typing_even_if_an_idle_fetch_ends(make_engine) -> None:  # type: ignore[no-untyped-def]
    ctx = SlowContext(0.3)
    engine, backend = await make_engine(lambda p: "pass\n", context=ctx, snippetRefreshIdleMs=60)
    lines = split_lines("x = 1\n" * 20)
    lines[5] = "y = \n"
    await engine.complete(CompletionRequest(DocumentView("u", lines, 5, 4, "python")))
    await asyncio.sleep(0.1)  # a short pause: an idle fetch starts
    assert ctx.started == 2
    for n in range(12):  # typing resumes, faster than the idle time, past the fetch's end
        lines[5] = "y = " + "z" * (n + 1) + "\n"
        await engine.complete(CompletionRequest(DocumentView("u", lines, 5, 5 + n, "python")))
        await asyncio.sleep(0.04)
    assert ctx.finished == 2
    prompts = [backend.tokenizer.decode(j.prompt) for j in backend.jobs]
    assert all("helper_1" in p and "helper_2" not in p for p in prompts)
    assert engine.warmups == 0


# -- type-ahead that survives small edits -------------------------------------------

FUNC = "import os\n\n\ndef add(a, b):\n    \n\n\nprint(add(1, 2))\n"


async def test_type_ahead_survives_an_edit_above_the_cursor(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda p: "return a + b\n")
    await engine.complete(req(FUNC, 4, 4))
    edited = FUNC.replace("import os\n", "import os\nimport sys\n")  # three lines up and more
    result = await engine.complete(req(edited, 5, 4))
    assert result.stats.source == "type-ahead"
    assert result.suggestions[0].text == "return a + b"
    assert len(backend.jobs) == 1


async def test_type_ahead_continues_on_the_next_suggested_line(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda p: "total = a + b\n    return total\n\n\nx")
    first = await engine.complete(req(FUNC, 4, 4))
    assert first.suggestions[0].text == "total = a + b\n    return total"
    # The user typed the first line and pressed Enter; the editor indented the new line.
    typed = FUNC.replace("    \n", "    total = a + b\n    \n", 1)
    after_enter = await engine.complete(req(typed, 5, 4))
    assert after_enter.stats.source == "type-ahead"
    assert after_enter.suggestions[0].text == "return total"
    typed_more = typed.replace("    \n", "    ret\n", 1)
    more = await engine.complete(req(typed_more, 5, 7))
    assert more.suggestions[0].text == "urn total"
    assert len(backend.jobs) == 1


async def test_type_ahead_survives_a_cursor_move_away_and_back(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda p: "return a + b\n")
    await engine.complete(req(FUNC, 4, 4))
    # Up to the imports to fix something (a request there), then back to the function.
    fixed = FUNC.replace("import os", "import sys")
    await engine.complete(req(fixed, 0, len("import sys")))
    jobs = len(backend.jobs)
    back = await engine.complete(req(fixed, 4, 4))
    assert back.stats.source == "type-ahead"
    assert back.suggestions[0].text == "return a + b"
    assert len(backend.jobs) == jobs


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.replace("def add(a, b):", "def add(a, b, c):"),  # the line above
        lambda t: t,  # nothing changed: the control
        lambda t: t.replace("\n\n\nprint", "\nc = 3\n\nprint", 1),  # the line below
    ],
    ids=["line-above", "unchanged", "line-below"],
)
async def test_no_type_ahead_when_the_text_near_the_cursor_differs(make_engine, change) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda p: "return a + b\n")
    await engine.complete(req(FUNC, 4, 4))
    changed = change(FUNC)
    result = await engine.complete(req(changed, 4, 4))
    if changed == FUNC:
        assert result.stats.source == "type-ahead"  # the control: the same text hits
    else:
        assert result.stats.source == "model"
        assert len(backend.jobs) == 2


async def test_no_type_ahead_when_the_text_right_of_the_cursor_differs(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(lambda p: "foo(a)\n")
    await engine.complete(req("x = \n", 0, 4))
    result = await engine.complete(req("x = )\n", 0, 4))
    assert result.stats.source == "model"
    assert len(backend.jobs) == 2


# -- the next suggestion before Tab ----------------------------------------------------


def after_accept(prompt: str) -> str:
    """The model: a body at the empty line, a comment after the accepted line."""
    middle = prompt.rsplit("<|fim_middle|>", 1)[-1]
    return "  # the sum\n" if middle.endswith("return a + b") else "return a + b\n"


async def test_the_suggestion_after_an_accept_comes_from_the_cache(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(after_accept, prefetch=True, deadlineMs=60_000)
    first = await engine.complete(req(FUNC, 4, 4))
    assert first.suggestions[0].text == "return a + b"
    assert engine.prefetch_task is not None
    await engine.prefetch_task
    assert len(backend.jobs) == 2
    assert backend.jobs[1].slot == "background"
    # Accepted: the line now reads "    return a + b" and the cursor is at its end.
    accepted = FUNC.replace("    \n", "    return a + b\n", 1)
    result = await engine.complete(req(accepted, 4, len("    return a + b")))
    assert result.stats.source == "prefetch"
    assert result.suggestions[0].text == "  # the sum"
    assert len(backend.jobs) == 2  # no model call for it


async def test_an_accept_before_the_prefetch_ends_waits_for_it(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(after_accept, step_s=0.01, prefetch=True, deadlineMs=60_000)
    await engine.complete(req(FUNC, 4, 4))
    assert engine.prefetch_task is not None and not engine.prefetch_task.done()
    accepted = FUNC.replace("    \n", "    return a + b\n", 1)
    result = await engine.complete(req(accepted, 4, len("    return a + b")))
    assert result.stats.source == "prefetch"
    assert result.suggestions[0].text == "  # the sum"
    assert len(backend.jobs) == 2


async def test_a_keystroke_preempts_the_prefetch(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(
        lambda p: "return a + b\n" if "ret" not in p else "x" * 200 + "\n",
        step_s=0.005,
        prefetch=True,
    )
    await engine.complete(req(FUNC, 4, 4))
    prefetch = engine.prefetch_task
    assert prefetch is not None
    await asyncio.sleep(0.05)  # the prefetch is generating
    # The user types something else: the request needs the model and takes the backend.
    other = await engine.complete(req(FUNC.replace("    \n", "    q\n", 1), 4, 5))
    assert other.stats.source == "model"
    await prefetch
    assert backend.jobs[1].slot == "background"
    assert backend.jobs[1].stats.stop_reason == "cancelled"
    assert backend.jobs[1].stats.generated_tokens < 200
    # Nothing half-made was kept for the accepted state.
    accepted = FUNC.replace("    \n", "    return a + b\n", 1)
    assert engine.type_ahead.get(_key(req(accepted, 4, 16).document), "    return a + b") is None


async def test_no_prefetch_when_turned_off(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine, backend = await make_engine(after_accept, prefetch=False)
    await engine.complete(req(FUNC, 4, 4))
    assert engine.prefetch_task is None
    accepted = FUNC.replace("    \n", "    return a + b\n", 1)
    result = await engine.complete(req(accepted, 4, len("    return a + b")))
    assert result.stats.source == "model"
    assert len(backend.jobs) == 2


def _key(doc: DocumentView) -> tuple[str, str, str]:
    return place_key(doc.uri, CursorContext.at(doc))


def test_accepted_view_puts_the_cursor_after_the_insertion() -> None:
    doc = req("a = f(\r\nz\r\n", 0, 6).document
    one = accepted_view(doc, "x, y")
    assert list(one.lines) == ["a = f(x, y\r\n", "z\r\n", ""]
    assert (one.line, one.character) == (0, 10)
    two = accepted_view(doc, "x,\n  y)")
    assert list(two.lines) == ["a = f(x,\r\n", "  y)\r\n", "z\r\n", ""]
    assert (two.line, two.character) == (1, 4)


@pytest.mark.parametrize("text", ["x, y", "x,\n  y)", "a\nb\nc\nd\ne", "\n"])
@pytest.mark.parametrize("line", [0, 1, 5])
def test_the_accepted_place_is_the_place_of_the_accepted_document(text: str, line: int) -> None:
    source = "".join(f"line_{i} = f(\n" for i in range(8))
    doc = req(source, line, len(f"line_{line} = f(")).document
    after = accepted_view(doc, text)
    left = after.lines[after.line].rstrip("\n")[: after.character]
    assert accepted_place(doc, text) == (_key(after), left)


async def test_a_job_submitted_to_a_closed_worker_ends_at_once() -> None:
    # A fallback can replace the model while a request is being built: the request's
    # job then reaches a closed worker, whose thread will never run it.
    from exlsp.completion.backends.base import GenerationJob

    tok = CharTokenizer()
    worker = BackendWorker("test")
    await worker.load(lambda: ScriptedBackend(tok, lambda prompt: "x"))
    worker.close()
    handle = worker.submit(GenerationJob(prompt=[1, 2], stop_ids=frozenset(), max_tokens=4))

    async def drain() -> list[int]:
        return [t async for t in handle.tokens()]

    tokens = await asyncio.wait_for(drain(), timeout=10)  # it used to wait forever
    assert tokens == [] and handle.job.stats.stop_reason == "cancelled"
