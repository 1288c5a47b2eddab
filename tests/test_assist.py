"""Hover and refactor domain: targets, prompts, output parsing, edits, the Assistant."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from exlsp.completion.assist.assistant import ELLIPSIS, Assistant, CodeActionsConfig, HoverConfig
from exlsp.completion.assist.edits import (
    RefactorRefused,
    apply_edit,
    available_refactors,
    check_parses,
    minimal_edit,
    rewrite_edit,
)
from exlsp.completion.assist.prompts import (
    clean_docstring,
    docstring_slot,
    extract_code,
    fim_docstring_prompt,
    read_chat_template,
    render_chat,
)
from exlsp.completion.assist.syntax import ParsedDocument, Span, hover_target, parse
from exlsp.completion.backends.base import GenerationJob
from exlsp.completion.fim import TEMPLATES, FimTokens
from exlsp.completion.worker import BackendWorker
from tests.fakes import QWEN_SPECIALS, CharTokenizer, ScriptedBackend

CHAT_SPECIALS = (*QWEN_SPECIALS, "<|im_start|>", "<|im_end|>")
QWEN_CHAT = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SOURCE = '''import math


class Shape:
    """A shape."""

    def scaled(self, factor):
        s = self.size * factor
        return Shape(s)


def area(radius):
    x = math.pi * radius ** 2
    return x


def total(shapes):
    return sum(area(s) for s in shapes)
'''


def lines_of(text: str) -> list[str]:
    return [line + "\n" for line in text.split("\n")]


def parsed(text: str = SOURCE, language: str = "python") -> ParsedDocument:
    doc = parse(lines_of(text), language)
    assert doc is not None
    return doc


def tokenizer() -> CharTokenizer:
    return CharTokenizer(CHAT_SPECIALS)


def fim_tokens(tok: CharTokenizer) -> FimTokens:
    return FimTokens.resolve(TEMPLATES["qwen2.5-coder"], tok)


# -- targets ------------------------------------------------------------------------


def test_hover_target_on_a_call_explains_the_definition_in_the_file() -> None:
    doc = parsed()
    line = 17  # "    return sum(area(s) for s in shapes)"
    char = lines_of(SOURCE)[line].index("area") + 1
    target = hover_target(doc, line, char)
    assert target is not None
    definition, span, symbol = target
    assert (definition.name, symbol) == ("area", "area")
    assert span == Span(line, char - 1, line, char + 3)


def test_hover_target_inside_a_body_is_the_enclosing_definition() -> None:
    doc = parsed()
    target = hover_target(doc, 7, 9)  # `s` in "s = self.size"
    assert target is not None
    assert target[0].name == "scaled"
    assert hover_target(doc, 1, 0) is None  # blank line at module level


def test_available_refactors_list_kinds_without_a_model() -> None:
    doc = parsed()
    inside = [o.refactor for o in available_refactors(doc, Span(12, 4, 13, 12))]
    assert inside == ["docstring", "simplify", "extract", "annotate", "rename"]
    cursor = [o.refactor for o in available_refactors(doc, Span(12, 4, 12, 4))]
    assert "extract" not in cursor
    cls = available_refactors(doc, Span(4, 4, 4, 4))
    assert cls[0].title == "Improve the docstring of Shape"
    assert available_refactors(doc, Span(0, 0, 0, 3)) == []


# -- prompts ---------------------------------------------------------------------------


def test_render_chat_keeps_file_text_out_of_control_tokens() -> None:
    tok = tokenizer()
    messages = [{"role": "user", "content": "code with <|im_start|> inside"}]
    ids = render_chat(QWEN_CHAT, messages, tok)
    start = tok.token_to_id("<|im_start|>")
    end = tok.token_to_id("<|im_end|>")
    assert ids.count(start) == 2  # the user turn and the generation prompt, not the file's
    assert ids.count(end) == 1
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert "code with <|im_start|> inside" in tok.decode(ids)


def test_read_chat_template_forms(tmp_path: Path) -> None:
    assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_CHAT}))
    assert read_chat_template(tmp_path) == QWEN_CHAT
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert read_chat_template(tmp_path) == "y"
    (tmp_path / "chat_template.jinja").write_text("z")
    assert read_chat_template(tmp_path) == "z"


def test_fim_docstring_prompt_python() -> None:
    tok = tokenizer()
    fim = fim_tokens(tok)
    doc = parsed()
    area = doc.definition_named("area")
    assert area is not None
    prompt, slot = fim_docstring_prompt(doc, area, tok, fim)
    text = tok.decode(prompt.ids)
    assert prompt.mode == "fim" and prompt.stop_text == '"""'
    assert text.startswith("<|fim_prefix|>import math")
    assert text.endswith(
        'def area(radius):\n    """<|fim_suffix|>"""\n    x = math.pi * radius ** 2\n'
        "    return x\n<|fim_middle|>"
    )
    assert slot.quotes and slot.indent == "    "


def test_fim_docstring_prompt_replaces_an_existing_docstring() -> None:
    doc = parsed()
    shape = doc.definition_named("Shape")
    assert shape is not None
    slot = docstring_slot(doc, shape)
    assert "A shape." not in slot.after
    assert slot.after.startswith('"""\n\n    def scaled')


def test_docstring_slot_other_languages_uses_comments_above() -> None:
    js = "// old note\nfunction add(a, b) {\n  return a + b;\n}\n"
    doc = parsed(js, "javascript")
    add = doc.definition_named("add")
    assert add is not None
    slot = docstring_slot(doc, add)
    assert slot.before == "// " and slot.after.startswith("\nfunction add(a, b) {")
    assert slot.replace == (0, 4)  # the old comment is replaced too


# -- output parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
        ("```\nx = 1\n```", "x = 1\n"),
        ("<think>hmm ```no```</think>\n```py\ny = 2\n```", "y = 2\n"),
        ("```python\ndef f():\n    return", None),  # cut before the fence closed
        ("no code at all", None),
    ],
)
def test_extract_code(reply: str, code: str | None) -> None:
    assert extract_code(reply) == code


def test_clean_docstring() -> None:
    doc = parsed()
    area = doc.definition_named("area")
    assert area is not None
    slot = docstring_slot(doc, area)
    assert clean_docstring('Area of a circle.\n\n    Args: r\n    """ trailing', slot) == (
        "Area of a circle.\n\nArgs: r"
    )
    js = parsed("function f() {}\n", "javascript")
    f = js.definition_named("f")
    assert f is not None
    jslot = docstring_slot(js, f)
    assert clean_docstring("Does f.\n// More.\nfunction g", jslot) == "Does f.\nMore."


# -- edits -------------------------------------------------------------------------------


def test_minimal_edit_touches_only_the_changed_lines() -> None:
    old = "def f(a):\n    x = a\n    return x\n"
    new = "def f(a):\n    value = a\n    return value\n"
    edit = minimal_edit(old, new, 10)
    assert edit is not None
    assert edit.span == Span(11, 0, 13, 0)
    assert edit.text == "    value = a\n    return value\n"
    assert minimal_edit(old, old, 0) is None
    lines = ["before\n", *lines_of(old)[:-1], "after\n"]
    edit = minimal_edit(old, new, 1)
    assert edit is not None
    assert apply_edit(lines, edit) == ["before", *new.rstrip("\n").split("\n"), "after"]


def test_rewrite_edit_reindents_a_method_and_parse_check_accepts_it() -> None:
    doc = parsed()
    scaled = doc.definition_named("scaled")
    assert scaled is not None
    code = "def scaled(self, factor):\n    return Shape(self.size * factor)\n"
    edit = rewrite_edit(doc, scaled, code)
    assert edit is not None
    assert edit.span.start_line == 7  # the header line is kept
    assert edit.span == Span(7, 0, 9, 0)
    assert edit.text == "        return Shape(self.size * factor)\n"
    check_parses(lines_of(SOURCE), "python", edit)


def test_parse_check_refuses_code_that_does_not_parse() -> None:
    doc = parsed()
    area = doc.definition_named("area")
    assert area is not None
    edit = rewrite_edit(doc, area, "def area(radius:\n    return (radius\n")
    assert edit is not None
    with pytest.raises(RefactorRefused, match="does not parse as python"):
        check_parses(lines_of(SOURCE), "python", edit)


# -- the assistant -------------------------------------------------------------------------


async def assistant_with(
    script: Callable[[str], str], chat: bool, step_s: float = 0.0
) -> tuple[Assistant, ScriptedBackend, BackendWorker]:
    tok = tokenizer()
    backend = ScriptedBackend(tok, script, step_s=step_s)
    worker = BackendWorker("test")
    await worker.load(lambda: backend)  # type: ignore[arg-type, return-value]
    assistant = Assistant(worker, tok, fim_tokens(tok), QWEN_CHAT if chat else None)
    return assistant, backend, worker


async def test_fim_hover_explains_and_caches_by_content() -> None:
    seen: list[str] = []

    def script(prompt: str) -> str:
        seen.append(prompt)
        return 'Area of a circle of the given radius."""\n    x = 3'

    assistant, backend, worker = await assistant_with(script, chat=False)
    try:
        explanation = await assistant.explain(
            lines_of(SOURCE), "python", 17, 16, HoverConfig(deadlineMs=5000)
        )
        assert explanation is not None
        assert explanation.text == "Area of a circle of the given radius."
        assert not explanation.cut
        assert "**area (function)**" in explanation.markdown()
        assert "def area(radius):" in explanation.plaintext()
        assert "<|fim_middle|>" in seen[0]
        # Same definition, another use of it: served from the cache, no new job.
        again = await assistant.explain(
            lines_of(SOURCE), "python", 11, 6, HoverConfig(deadlineMs=5000)
        )
        assert again is not None and again.cached and len(backend.jobs) == 1
    finally:
        worker.close()


async def test_chat_hover_uses_the_template() -> None:
    def script(prompt: str) -> str:
        assert prompt.startswith("<|im_start|>system\n")
        assert "```python\ndef area(radius):" in prompt
        return "Computes the **area**.\n\nPitfall: negative radius.<|im_end|>"

    assistant, _, worker = await assistant_with(script, chat=True)
    try:
        explanation = await assistant.explain(lines_of(SOURCE), "python", 11, 6, HoverConfig())
        assert explanation is not None
        assert explanation.text.startswith("Computes the **area**.")
    finally:
        worker.close()


async def test_hover_cut_by_the_deadline_is_marked() -> None:
    assistant, _, worker = await assistant_with(lambda p: "word " * 200, False, step_s=0.01)
    try:
        explanation = await assistant.explain(
            lines_of(SOURCE), "python", 11, 6, HoverConfig(deadlineMs=300, maxTokens=1000)
        )
        assert explanation is not None and explanation.cut
        assert explanation.markdown().endswith(ELLIPSIS)
        # A cut answer is not cached.
        assert not assistant._cache
    finally:
        worker.close()


async def test_a_completion_preempts_a_hover_which_then_resumes() -> None:
    script = lambda p: "word " * 40 + '"""'  # noqa: E731
    assistant, backend, worker = await assistant_with(script, False, 0.01)
    try:
        order: list[str] = []
        task = asyncio.create_task(
            assistant.explain(
                lines_of(SOURCE), "python", 11, 6, HoverConfig(deadlineMs=10000, maxTokens=1000)
            )
        )
        task.add_done_callback(lambda _: order.append("hover"))
        await asyncio.to_thread(backend.started.wait, 5)
        await asyncio.sleep(0.05)
        fg = worker.submit(GenerationJob(prompt=[1, 2], stop_ids=frozenset(), max_tokens=3))
        fg_tokens = [t async for t in fg.tokens()]
        order.append("completion")
        assert len(fg_tokens) == 3
        explanation = await asyncio.wait_for(task, 5)
        assert order == ["completion", "hover"]
        assert backend.jobs[0].stats.stop_reason == "cancelled"
        assert assistant.resumed == 1 and len(backend.jobs) == 3
        # The resumed job continued from what the first one had generated.
        assert list(backend.jobs[2].prompt[: len(backend.jobs[0].prompt)]) == list(
            backend.jobs[0].prompt
        )
        assert len(backend.jobs[2].prompt) > len(backend.jobs[0].prompt)
        assert explanation is not None and not explanation.cut
    finally:
        worker.close()


async def test_a_newer_hover_supersedes_an_older_one() -> None:
    assistant, backend, worker = await assistant_with(lambda p: "word " * 200, False, 0.01)
    try:
        config = HoverConfig(deadlineMs=10000, maxTokens=1000)
        old = asyncio.create_task(assistant.explain(lines_of(SOURCE), "python", 11, 6, config))
        await asyncio.to_thread(backend.started.wait, 5)
        await asyncio.sleep(0.05)
        new = asyncio.create_task(assistant.explain(lines_of(SOURCE), "python", 7, 9, config))
        older = await asyncio.wait_for(old, 5)
        assert older is not None and older.cut and assistant.resumed == 0
        new.cancel()
        with pytest.raises(asyncio.CancelledError):
            await new
    finally:
        worker.close()


async def test_cancelling_the_request_cancels_the_job() -> None:
    assistant, backend, worker = await assistant_with(lambda p: "word " * 500, False, 0.01)
    try:
        task = asyncio.create_task(
            assistant.explain(lines_of(SOURCE), "python", 11, 6, HoverConfig(deadlineMs=20000))
        )
        await asyncio.to_thread(backend.started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        assert backend.jobs[0].cancel.is_set()
    finally:
        worker.close()


async def test_chat_refactor_gives_a_minimal_checked_edit() -> None:
    reply = "```python\ndef area(radius):\n    return math.pi * radius ** 2\n```<|im_end|>"
    assistant, _, worker = await assistant_with(lambda p: reply, chat=True)
    try:
        result = await assistant.refactor(
            "simplify", lines_of(SOURCE), "python", Span(12, 4, 12, 4), CodeActionsConfig()
        )
        assert result.edit.span == Span(12, 0, 14, 0)
        assert result.edit.text == "    return math.pi * radius ** 2\n"
    finally:
        worker.close()


async def test_chat_refactor_that_does_not_parse_is_refused() -> None:
    reply = "```python\ndef area(radius):\n    return (math.pi *\n```<|im_end|>"
    assistant, _, worker = await assistant_with(lambda p: reply, chat=True)
    try:
        with pytest.raises(RefactorRefused, match="does not parse"):
            await assistant.refactor(
                "simplify", lines_of(SOURCE), "python", Span(12, 4, 12, 4), CodeActionsConfig()
            )
    finally:
        worker.close()


async def test_fim_docstring_refactor_and_refusal_of_the_others() -> None:
    assistant, _, worker = await assistant_with(lambda p: 'Area of a circle."""', chat=False)
    try:
        result = await assistant.refactor(
            "docstring", lines_of(SOURCE), "python", Span(12, 4, 12, 4), CodeActionsConfig()
        )
        assert result.edit.span == Span(12, 0, 12, 0)
        assert result.edit.text == '    """Area of a circle."""\n'
        with pytest.raises(RefactorRefused, match="instruction-tuned"):
            await assistant.refactor(
                "simplify", lines_of(SOURCE), "python", Span(12, 4, 12, 4), CodeActionsConfig()
            )
    finally:
        worker.close()


async def test_refactor_cut_by_the_deadline_is_refused() -> None:
    assistant, _, worker = await assistant_with(lambda p: "word " * 200, False, step_s=0.01)
    try:
        with pytest.raises(RefactorRefused, match="did not finish within 200 ms"):
            await assistant.refactor(
                "docstring",
                lines_of(SOURCE),
                "python",
                Span(12, 4, 12, 4),
                CodeActionsConfig(deadlineMs=200, maxTokens=1000),
            )
    finally:
        worker.close()


async def test_documents_too_large_to_parse_get_no_hover_and_no_refactors() -> None:
    from exlsp.completion.assist.syntax import MAX_PARSE_CHARS

    filler = "# " + "x" * 97 + "\n"
    lines = lines_of(SOURCE) + [filler] * (MAX_PARSE_CHARS // len(filler) + 1)
    assert parse(lines_of(SOURCE), "python") is not None
    assert parse(lines, "python") is None  # over the limit: not parsed at all
    assistant, backend, worker = await assistant_with(lambda p: "never", chat=False)
    try:
        assert await assistant.explain(lines, "python", 17, 16, HoverConfig()) is None
        with pytest.raises(RefactorRefused):
            await assistant.refactor(
                "docstring", lines, "python", Span(17, 0, 17, 0), CodeActionsConfig()
            )
        assert backend.jobs == []
    finally:
        worker.close()


def test_a_text_is_parsed_once() -> None:
    lines = lines_of(SOURCE)
    first = parse(lines, "python")
    assert parse(list(lines), "python") is first  # same text: the same parse
    edited = [*lines[:-1], lines[-1] + "x = 1\n"]
    other = parse(edited, "python")
    assert other is not None and other is not first


async def test_a_backend_that_is_down_gives_no_hover_and_a_refused_refactor() -> None:
    from exlsp.completion.backends.base import BackendUnavailable

    def down(prompt: str) -> str:
        raise BackendUnavailable("the completion server at http://gpu-pool:8000 is not reachable")

    assistant, _, worker = await assistant_with(down, chat=True)
    try:
        assert await assistant.explain(lines_of(SOURCE), "python", 17, 16, HoverConfig()) is None
        with pytest.raises(RefactorRefused, match="gpu-pool:8000 is not reachable"):
            await assistant.refactor(
                "simplify", lines_of(SOURCE), "python", Span(17, 0, 17, 0), CodeActionsConfig()
            )
    finally:
        worker.close()
