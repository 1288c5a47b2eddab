"""Prompts for hover and refactors, and what is kept of the model's answer.

The model's chat template when it has one, else a fill-in-the-middle
docstring prompt for base coder models.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exlsp.completion import languages
from exlsp.completion.assist.syntax import Definition, ParsedDocument
from exlsp.completion.fim import FimTokens
from exlsp.completion.tokenizer import Tokenizer

if TYPE_CHECKING:
    from exlsp.completion.assist.edits import Refactor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssistPrompt:
    ids: list[int]
    stop_ids: frozenset[int]
    mode: str  # "chat" or "fim"
    # Text the answer ends at (FIM: the closing docstring quotes).
    stop_text: str = ""


_CHAT_STOPS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|EOT|>", "<|endoftext|>")
_SENTINEL = "\x00exlsp-content-{}\x00"
_SENTINEL_RE = re.compile("\x00exlsp-content-(\\d+)\x00")


def read_chat_template(model_dir: Path | None) -> str | None:
    """The model's chat template (tokenizer_config.json or chat_template.jinja), if any."""
    if model_dir is None:
        return None
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except OSError:
            return None
    try:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _split_specials(text: str, tokenizer: Tokenizer) -> list[int]:
    """Template text to ids: its special tokens become control tokens, the rest is text."""
    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    if not specials:
        return tokenizer.encode(text)
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    ids: list[int] = []
    pos = 0
    for m in pattern.finditer(text):
        ids += tokenizer.encode(text[pos : m.start()])
        tid = tokenizer.token_to_id(m.group(0))
        ids += [tid] if tid is not None else tokenizer.encode(m.group(0))
        pos = m.end()
    return ids + tokenizer.encode(text[pos:])


def render_chat(
    template: str, messages: Sequence[dict[str, str]], tokenizer: Tokenizer
) -> list[int]:
    """Render a chat template to token ids with a generation prompt.

    Message contents are rendered as placeholders and encoded separately, so
    text from the user's file can never become a control token.
    """
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    placeholders = [
        {"role": m["role"], "content": _SENTINEL.format(i)} for i, m in enumerate(messages)
    ]
    bos = getattr(tokenizer, "bos_token", None) or ""
    text = env.from_string(template).render(
        messages=placeholders, add_generation_prompt=True, bos_token=bos, eos_token=""
    )
    ids: list[int] = []
    pos = 0
    for m in _SENTINEL_RE.finditer(text):
        ids += _split_specials(text[pos : m.start()], tokenizer)
        ids += tokenizer.encode(messages[int(m.group(1))]["content"])
        pos = m.end()
    return ids + _split_specials(text[pos:], tokenizer)


def chat_stop_ids(tokenizer: Tokenizer) -> frozenset[int]:
    stops = {i for s in _CHAT_STOPS if (i := tokenizer.token_to_id(s)) is not None}
    return frozenset(stops | set(tokenizer.eos_ids))


_SYSTEM = "You are an expert programmer. Answer briefly and precisely."


def fence(language: str, code: str) -> str:
    return f"```{language}\n{code.rstrip()}\n```"


def explain_messages(definition: Definition, language: str, symbol: str) -> list[dict[str, str]]:
    about = f" Focus on `{symbol}`." if symbol and symbol != definition.name else ""
    return [
        {"role": "system", "content": _SYSTEM},
        {
            "role": "user",
            "content": (
                f"Explain this {language} {definition.kind} `{definition.name}` in at most "
                "five lines of Markdown: what it does, its inputs, its outputs, and pitfalls."
                f"{about} No preamble.\n\n{fence(language, definition.text)}"
            ),
        },
    ]


def refactor_messages(
    refactor: Refactor, definition: Definition, language: str, selected: str
) -> list[dict[str, str]]:
    extra = f"\n\nThe selected lines:\n{fence(language, selected)}" if selected else ""
    return [
        {"role": "system", "content": _SYSTEM},
        {
            "role": "user",
            "content": (
                f"Rewrite this {language} {definition.kind}. {refactor.instruction} "
                "Reply with only the complete rewritten code in one fenced code block."
                f"{extra}\n\n{fence(language, definition.text)}"
            ),
        },
    ]


_CONTEXT_LINES = 60  # lines above a definition shown to the FIM prompt


def indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


@dataclass(frozen=True)
class DocstringSlot:
    """Where a generated docstring goes: text before it, after it, and its form."""

    before: str  # everything up to and including the opening quotes / comment marker
    after: str  # the closing quotes (if any) and the rest of the definition
    indent: str
    quotes: bool  # True: a Python docstring; False: line comments above the definition
    marker: str
    replace: tuple[int, int]  # the lines [start, end) the new definition text replaces


def docstring_slot(doc: ParsedDocument, definition: Definition) -> DocstringSlot:
    """Split a definition around the place its documentation goes."""
    start = definition.span.start_line
    end = start + definition.text.count("\n")
    if doc.language == "python" and definition.header_end_line > start:
        header_end = definition.header_end_line
        indent = indent_of(doc.lines[definition.body_line]) or indent_of(doc.lines[start]) + "    "
        rest_start = header_end
        if definition.docstring is not None:
            rest_start = definition.docstring.end_line + 1
        return DocstringSlot(
            before=doc.line_text(start, header_end) + indent + '"""',
            after='"""\n' + doc.line_text(rest_start, end),
            indent=indent,
            quotes=True,
            marker='"""',
            replace=(start, end),
        )
    marker = languages.language(doc.language).doc_comment
    indent = indent_of(doc.lines[start])
    # Comments right above the definition are its documentation: they get replaced.
    top = start
    while top > 0 and doc.lines[top - 1].strip().startswith(marker[:2]):
        top -= 1
    return DocstringSlot(
        before=indent + marker + " ",
        after="\n" + doc.line_text(start, end),
        indent=indent,
        quotes=False,
        marker=marker,
        replace=(top, end),
    )


def fim_docstring_prompt(
    doc: ParsedDocument, definition: Definition, tokenizer: Tokenizer, fim: FimTokens
) -> tuple[AssistPrompt, DocstringSlot]:
    """A FIM prompt whose middle is the definition's docstring (base coder models)."""
    slot = docstring_slot(doc, definition)
    top = slot.replace[0]
    above = doc.line_text(max(0, top - _CONTEXT_LINES), top)
    prefix = above + slot.before
    suffix = slot.after
    t = fim.template
    ids: list[int] = [fim.bos] if fim.bos is not None else []
    p = [fim.prefix, *tokenizer.encode(t.prefix_lead + prefix)]
    s = [fim.suffix, *tokenizer.encode(suffix)]
    ids += s + p if t.suffix_first else p + s
    if fim.middle is not None:
        ids.append(fim.middle)
    stop_text = '"""' if slot.quotes else ""
    return AssistPrompt(ids, fim.stop_ids, "fim", stop_text), slot


# -- output parsing --------------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*```[^\n`]*\n(.*?)^[ \t]*```", re.S | re.M)
_THINK = re.compile(r"<think>.*?(</think>|$)", re.S)


def strip_reasoning(text: str) -> str:
    return _THINK.sub("", text).strip()


def extract_code(text: str) -> str | None:
    """The first fenced code block of a reply (or an unterminated last one); None if none."""
    text = strip_reasoning(text)
    m = _FENCE.search(text)
    if m:
        return m.group(1)
    open_fence = re.search(r"^[ \t]*```[^\n`]*\n", text, re.M)
    if open_fence:
        return None  # the block never closed: the answer was cut
    return None


def clean_docstring(text: str, slot: DocstringSlot) -> str:
    """The generated documentation as plain text (quotes, markers and indent removed)."""
    if slot.quotes:
        end = text.find('"""')
        if end >= 0:
            text = text[:end]
        return inspect.cleandoc(text).strip()
    lines = text.split("\n")
    kept = [lines[0]]
    for line in lines[1:]:
        stripped = line.strip()
        if not stripped.startswith(slot.marker):
            break
        kept.append(stripped[len(slot.marker) :].lstrip())
    return "\n".join(k.strip() for k in kept).strip()


def clean_explanation(text: str, max_lines: int = 8) -> str:
    text = strip_reasoning(text)
    lines = [line.rstrip() for line in text.strip().split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines[:max_lines]).strip()
