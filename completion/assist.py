"""Hover explanations and refactor edits from the resident model.

Pure parts: what to explain (tree-sitter, `assist_syntax`), prompt builders
(the model's chat template when it has one, else a fill-in-the-middle
docstring prompt for base coder models), output parsing, and minimal,
parse-checked edits. The `Assistant` runs a prompt as a *background* job on
the backend worker, so a completion always preempts it, with a deadline, and
caches finished answers by a hash of what was explained.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import json
import logging
import re
import textwrap
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exlsp.completion.assist_syntax import Definition, ParsedDocument, Span, parse
from exlsp.completion.backends.base import BackendUnavailable, GenerationJob
from exlsp.completion.config import ModelConfig
from exlsp.completion.fim import FimTokens
from exlsp.completion.tokenizer import Tokenizer
from exlsp.completion.worker import GenerationHandle, ModelWorker

if TYPE_CHECKING:
    from exlsp.completion.service import CompletionService

log = logging.getLogger(__name__)

ELLIPSIS = "…"


@dataclass
class HoverConfig:
    enabled: bool = True
    # Wall-clock limit of one explanation; what is ready by then is shown, marked "…".
    deadlineMs: int = 2000
    maxTokens: int = 160


@dataclass
class CodeActionsConfig:
    enabled: bool = True
    # Wall-clock limit of one refactor edit (computed when the action is chosen).
    deadlineMs: int = 8000
    maxTokens: int = 400


class RefactorRefused(Exception):
    """A refactor cannot be offered as an edit; the message says why, for the user."""


# -- refactor kinds ------------------------------------------------------------------


@dataclass(frozen=True)
class Refactor:
    id: str
    title: str  # "{name}" is replaced with the definition's name
    extract: bool  # refactor.extract rather than refactor.rewrite
    instruction: str


REFACTORS: dict[str, Refactor] = {
    r.id: r
    for r in (
        Refactor(
            "docstring",
            "Add a docstring to {name}",
            False,
            "Add a clear, concise documentation comment (a docstring in Python) that says "
            "what it does, its parameters, its return value and its errors. Change nothing else.",
        ),
        Refactor(
            "simplify",
            "Simplify {name}",
            False,
            "Make it simpler and easier to read without changing its behaviour.",
        ),
        Refactor(
            "extract",
            "Extract the selection from {name} into a function",
            True,
            "Move the selected lines into a new, well-named function defined right before "
            "it, and call that function where the lines were. Reply with both definitions.",
        ),
        Refactor(
            "annotate",
            "Add type annotations to {name}",
            False,
            "Add type annotations to every parameter and the return value. Change nothing else.",
        ),
        Refactor(
            "rename",
            "Rename unclear local names in {name}",
            False,
            "Rename unclear local variable names to descriptive ones. Do not rename "
            "parameters or anything visible outside it. Change nothing else.",
        ),
    )
}
_TYPED_OPTIONAL = frozenset({"python", "typescript", "typescriptreact"})


@dataclass(frozen=True)
class RefactorOffer:
    refactor: str  # a key of REFACTORS
    title: str
    extract: bool


def available_refactors(doc: ParsedDocument, selection: Span) -> list[RefactorOffer]:
    """What can be offered for a selection; no model call."""
    definition = doc.definition_at(selection)
    if definition is None:
        return []
    ids = ["docstring", "simplify"]
    if not selection.empty and selection.start_line >= definition.header_end_line:
        ids.append("extract")
    if doc.language in _TYPED_OPTIONAL and definition.kind == "function":
        ids.append("annotate")
    if definition.kind == "function":
        ids.append("rename")
    offers = []
    for rid in ids:
        r = REFACTORS[rid]
        title = r.title.format(name=definition.name or "this definition")
        if rid == "docstring" and definition.docstring is not None:
            title = f"Improve the docstring of {definition.name}"
        offers.append(RefactorOffer(rid, title, r.extract))
    return offers


# -- prompts ---------------------------------------------------------------------------


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


def _fence(language: str, code: str) -> str:
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
                f"{about} No preamble.\n\n{_fence(language, definition.text)}"
            ),
        },
    ]


def refactor_messages(
    refactor: Refactor, definition: Definition, language: str, selected: str
) -> list[dict[str, str]]:
    extra = f"\n\nThe selected lines:\n{_fence(language, selected)}" if selected else ""
    return [
        {"role": "system", "content": _SYSTEM},
        {
            "role": "user",
            "content": (
                f"Rewrite this {language} {definition.kind}. {refactor.instruction} "
                "Reply with only the complete rewritten code in one fenced code block."
                f"{extra}\n\n{_fence(language, definition.text)}"
            ),
        },
    ]


# Comment markers for the FIM docstring prompt of languages without docstrings.
_LINE_COMMENTS = {"rust": "///", "python": "#"}
_CONTEXT_LINES = 60  # lines above a definition shown to the FIM prompt


def _indent(line: str) -> str:
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
        indent = _indent(doc.lines[definition.body_line]) or _indent(doc.lines[start]) + "    "
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
    marker = _LINE_COMMENTS.get(doc.language, "//")
    indent = _indent(doc.lines[start])
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


# -- edits -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEdit:
    """Replace `span` (characters) with `text`."""

    span: Span
    text: str


def _position(text: str, index: int, line0: int) -> tuple[int, int]:
    before = text[:index]
    nl = before.count("\n")
    col = len(before) - (before.rfind("\n") + 1)
    return line0 + nl, col


def minimal_edit(old: str, new: str, first_line: int) -> TextEdit | None:
    """The one edit that turns `old` (starting at `first_line`, column 0) into `new`.

    Only the changed range is replaced: common leading and trailing text stays.
    None when nothing changes.
    """
    if old == new:
        return None
    n = min(len(old), len(new))
    head = 0
    while head < n and old[head] == new[head]:
        head += 1
    # Back up to a line start so the edit never splits a line's indentation oddly.
    head = old.rfind("\n", 0, head) + 1
    tail = 0
    while tail < n - head and old[len(old) - 1 - tail] == new[len(new) - 1 - tail]:
        tail += 1
    # ... and end it at a line start: whole lines are replaced, easier to review.
    while tail and old[len(old) - tail - 1] != "\n":
        tail -= 1
    start = _position(old, head, first_line)
    end = _position(old, len(old) - tail, first_line)
    return TextEdit(Span(*start, *end), new[head : len(new) - tail])


def apply_edit(lines: Sequence[str], edit: TextEdit) -> list[str]:
    """Line bodies after `edit` (for checking)."""
    bodies = [line.rstrip("\r\n") for line in lines]
    s, e = edit.span, edit.span
    head = bodies[s.start_line][: s.start_char] if s.start_line < len(bodies) else ""
    tail = bodies[e.end_line][e.end_char :] if e.end_line < len(bodies) else ""
    middle = (head + edit.text + tail).split("\n")
    return bodies[: s.start_line] + middle + bodies[e.end_line + 1 :]


def check_parses(lines: Sequence[str], language: str, edit: TextEdit) -> None:
    """Refuse an edit that leaves a syntax error in the text it changed."""
    after = apply_edit(lines, edit)
    doc = parse([line + "\n" for line in after], language)
    if doc is None:
        return
    added = edit.text.count("\n")
    changed = Span(edit.span.start_line, 0, edit.span.start_line + added + 1, 0)
    for error in doc.error_spans():
        if error.start_line <= changed.end_line and error.end_line >= changed.start_line:
            raise RefactorRefused(
                f"the suggested code does not parse as {language} "
                f"(syntax error at line {error.start_line + 1}); nothing was changed"
            )


def reindent(code: str, indent: str) -> str:
    """`code` dedented, then indented to the definition's own indentation."""
    body = textwrap.dedent(code.strip("\n"))
    out = [indent + line if line.strip() else "" for line in body.split("\n")]
    return "\n".join(out) + "\n"


def format_docstring(doc: str, slot: DocstringSlot) -> str:
    """Documentation text in the definition's own form (docstring or line comments)."""
    lines = doc.strip().split("\n")
    if slot.quotes:
        if len(lines) == 1:
            return f'{slot.indent}"""{lines[0]}"""\n'
        body = "".join(f"{slot.indent}{line}\n" if line.strip() else "\n" for line in lines[1:])
        return f'{slot.indent}"""{lines[0]}\n{body}{slot.indent}"""\n'
    return "".join(f"{slot.indent}{slot.marker} {line}".rstrip() + "\n" for line in lines)


def docstring_edit(doc: ParsedDocument, slot: DocstringSlot, text: str) -> TextEdit | None:
    start, end = slot.replace
    old = doc.line_text(start, end)
    documented = format_docstring(text, slot)
    if slot.quotes:
        before = slot.before[: -len(slot.indent + '"""')]
        new = before + documented + slot.after[len('"""\n') :]
    else:
        new = documented + slot.after[1:]
    return minimal_edit(old, new, start)


def rewrite_edit(doc: ParsedDocument, definition: Definition, code: str) -> TextEdit | None:
    start = definition.span.start_line
    indent = _indent(doc.lines[start])
    return minimal_edit(definition.text, reindent(code, indent), start)


# -- the assistant -----------------------------------------------------------------------


@dataclass(frozen=True)
class Generated:
    text: str
    cut: bool  # stopped by the deadline or a preempting completion
    stop_reason: str
    elapsed_ms: float
    cached: bool = False
    error: str | None = None  # the backend could not serve (a remote server is down)


@dataclass(frozen=True)
class Explanation:
    title: str  # "greet (function)"
    signature: str  # the definition's first line
    text: str  # Markdown from a chat model, plain text from a docstring
    span: Span  # what the hover is about
    language: str
    cut: bool
    cached: bool = False

    def markdown(self) -> str:
        head = f"**{self.title}**\n\n{_fence(self.language, self.signature)}"
        return f"{head}\n\n{self.text}{' ' + ELLIPSIS if self.cut else ''}"

    def plaintext(self) -> str:
        return f"{self.title}\n{self.signature}\n\n{self.text}{' ' + ELLIPSIS if self.cut else ''}"


@dataclass(frozen=True)
class RefactorResult:
    edit: TextEdit
    generated: Generated


ProgressCallback = Callable[[str], None]


def content_key(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class Assistant:
    """Runs explanation and refactor prompts as background jobs on the backend worker."""

    worker: ModelWorker
    tokenizer: Tokenizer
    fim: FimTokens | None
    chat_template: str | None = None
    cache_size: int = 256
    _cache: OrderedDict[str, tuple[str, str]] = field(default_factory=OrderedDict)
    _seq: int = 0
    jobs: int = 0  # jobs submitted (resumptions included)
    resumed: int = 0  # times a preempted job was resumed

    @property
    def mode(self) -> str:
        return "chat" if self.chat_template else "fim"

    async def generate(
        self,
        key: str,
        prompt: AssistPrompt,
        max_tokens: int,
        deadline_ms: int,
        on_text: ProgressCallback | None = None,
    ) -> Generated:
        """Generate for `prompt`; a finished answer is cached under `key`.

        Never outlasts the deadline: what is ready then is returned with
        `cut` set. A completion that preempts the job does not lose it: it
        resumes behind the completion (prompt + what it had generated) while
        time is left, unless a newer assist job superseded it. Cancelling the
        awaiting task cancels the job.
        """
        if key in self._cache:
            self._cache.move_to_end(key)
            text, reason = self._cache[key]
            return Generated(text, False, reason, 0.0, cached=True)
        t0 = time.perf_counter()
        deadline = time.monotonic() + deadline_ms / 1000
        self._seq += 1
        seq = self._seq
        ids: list[int] = []
        text = ""
        reason = ""
        handle: GenerationHandle | None = None
        unavailable: str | None = None
        try:
            # A margin past the job's own deadline: a job waiting behind a busy
            # worker must not hold the request longer.
            async with asyncio.timeout(deadline_ms / 1000 + 0.25):
                while True:
                    job = GenerationJob(
                        prompt=[*prompt.ids, *ids],
                        stop_ids=prompt.stop_ids,
                        max_tokens=max_tokens - len(ids),
                        deadline=deadline,
                    )
                    handle = self.worker.submit(job, background=True)
                    self.jobs += 1
                    async for token in handle.tokens():
                        ids.append(token)
                        text = self.tokenizer.decode(ids).rstrip("\ufffd")
                        if prompt.stop_text and prompt.stop_text in text:
                            handle.cancel()
                            break
                        if on_text is not None:
                            on_text(text)
                    reason = job.stats.stop_reason
                    if (
                        reason != "cancelled"
                        or (prompt.stop_text and prompt.stop_text in text)
                        or seq != self._seq  # superseded by a newer hover or refactor
                        or len(ids) >= max_tokens
                        or time.monotonic() >= deadline
                    ):
                        break
                    self.resumed += 1
        except TimeoutError:
            reason = "deadline"
        except BackendUnavailable as e:
            # A remote server that is down: the completion path already told the user.
            reason = "unavailable"
            unavailable = str(e)
        finally:
            if handle is not None:
                handle.cancel()  # a no-op when it has ended; stops it on any early exit
        stopped_by_text = bool(prompt.stop_text) and prompt.stop_text in text
        if stopped_by_text:
            reason = "stop"
        cut = reason in ("deadline", "cancelled", "unavailable", "")
        elapsed = (time.perf_counter() - t0) * 1000
        if not cut and text:
            self._cache[key] = (text, reason)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return Generated(text, cut, reason, elapsed, error=unavailable)

    # -- hover ------------------------------------------------------------------------------

    def hover_target(
        self, doc: ParsedDocument, line: int, char: int
    ) -> tuple[Definition, Span, str] | None:
        return hover_target(doc, line, char)

    async def explain(
        self, lines: Sequence[str], language: str, line: int, char: int, config: HoverConfig
    ) -> Explanation | None:
        doc = parse(lines, language)
        if doc is None:
            return None
        target = hover_target(doc, line, char)
        if target is None:
            return None
        definition, span, symbol = target
        key = content_key("explain", self.mode, language, symbol, definition.text)
        slot: DocstringSlot | None = None
        if self.chat_template:
            ids = render_chat(
                self.chat_template, explain_messages(definition, language, symbol), self.tokenizer
            )
            prompt = AssistPrompt(ids, chat_stop_ids(self.tokenizer), "chat")
        elif self.fim is not None:
            prompt, slot = fim_docstring_prompt(doc, definition, self.tokenizer, self.fim)
        else:
            return None
        generated = await self.generate(key, prompt, config.maxTokens, config.deadlineMs)
        text = (
            clean_docstring(generated.text, slot)
            if slot is not None
            else clean_explanation(generated.text)
        )
        if not text:
            return None
        signature = definition.text.split("\n", 1)[0].strip()
        title = f"{definition.name} ({definition.kind})" if definition.name else definition.kind
        cut = generated.cut or generated.stop_reason == "max_tokens"
        return Explanation(title, signature, text, span, language, cut, cached=generated.cached)

    # -- refactors ------------------------------------------------------------------------------

    async def refactor(
        self,
        refactor_id: str,
        lines: Sequence[str],
        language: str,
        selection: Span,
        config: CodeActionsConfig,
        on_text: ProgressCallback | None = None,
    ) -> RefactorResult:
        """The edit for one refactor, or RefactorRefused with the reason."""
        refactor = REFACTORS.get(refactor_id)
        if refactor is None:
            raise RefactorRefused(f"unknown refactor {refactor_id!r}")
        doc = parse(lines, language)
        if doc is None:
            raise RefactorRefused(f"refactors are not available for {language or 'this file'}")
        definition = doc.definition_at(selection)
        if definition is None:
            raise RefactorRefused("there is no function or class at the selection")
        selected = ""
        if refactor.extract:
            if selection.empty:
                raise RefactorRefused("select the lines to extract first")
            selected = doc.line_text(selection.start_line, selection.end_line + 1)
        key = content_key("refactor", self.mode, refactor_id, language, selected, definition.text)

        if self.chat_template:
            ids = render_chat(
                self.chat_template,
                refactor_messages(refactor, definition, language, selected),
                self.tokenizer,
            )
            prompt = AssistPrompt(ids, chat_stop_ids(self.tokenizer), "chat")
            generated = await self.generate(
                key, prompt, config.maxTokens, config.deadlineMs, on_text
            )
            self._refuse_cut(generated, config)
            code = extract_code(generated.text)
            if code is None or not code.strip():
                raise RefactorRefused("the model's answer contained no code block")
            edit = rewrite_edit(doc, definition, code)
        elif refactor_id == "docstring" and self.fim is not None:
            prompt, slot = fim_docstring_prompt(doc, definition, self.tokenizer, self.fim)
            generated = await self.generate(
                key, prompt, config.maxTokens, config.deadlineMs, on_text
            )
            self._refuse_cut(generated, config)
            text = clean_docstring(generated.text, slot)
            if not text:
                raise RefactorRefused("the model suggested no documentation")
            edit = docstring_edit(doc, slot, text)
        else:
            raise RefactorRefused(
                f"'{refactor.title.format(name=definition.name)}' needs an instruction-tuned "
                "model (one with a chat template); the loaded model only fills in code"
            )
        if edit is None:
            raise RefactorRefused("the model suggested no change")
        check_parses(lines, language, edit)
        return RefactorResult(edit, generated)

    @staticmethod
    def _refuse_cut(generated: Generated, config: CodeActionsConfig) -> None:
        if generated.stop_reason == "max_tokens":
            raise RefactorRefused(
                f"the model's answer was longer than {config.maxTokens} tokens and was cut; "
                "nothing was changed"
            )
        if generated.error:
            raise RefactorRefused(f"{generated.error}; nothing was changed")
        if generated.cut:
            why = (
                f"did not finish within {config.deadlineMs} ms"
                if generated.stop_reason == "deadline"
                else "was interrupted by a completion"
            )
            raise RefactorRefused(f"the model {why}; nothing was changed, try again")


def hover_target(doc: ParsedDocument, line: int, char: int) -> tuple[Definition, Span, str] | None:
    """What a hover at (line, char) explains: (definition, range to highlight, symbol).

    On an identifier defined in this file: that definition. Otherwise the
    innermost definition around the position.
    """
    ident = doc.identifier_at(line, char)
    here = Span(line, char, line, char)
    if ident is not None:
        name, span = ident
        definition = doc.definition_named(name)
        if definition is not None:
            return definition, span, name
        around = doc.definition_at(span)
        return (around, span, name) if around is not None else None
    around = doc.definition_at(here)
    return (around, around.span, "") if around is not None else None


def model_dir(model: ModelConfig, backend: Any) -> Path | None:
    """The loaded model's directory (its chat template); for a remote server, the
    tokenizer directory configured for it, if any (its `info.path` may be a name)."""
    if model.backend == "openai":
        return Path(model.path).expanduser() if model.path else None
    return Path(backend.info.path)


class AssistService:
    """The model behind hover and code actions, and its one `Assistant`.

    Without a model of its own (`assist.backend` empty) the completion model
    serves: its assistant runs background jobs on the completion worker, which
    completions preempt, and follows it when a fallback takes over. With one, a
    second backend loads on its own worker after the completion model; until it
    is ready there is no assistant, and if it cannot load the completion model
    serves instead.
    """

    def __init__(self, completion: CompletionService, model: ModelConfig | None = None) -> None:
        self.completion = completion
        self.model = model
        self.worker: ModelWorker | None = None
        self.state = "shared" if model is None else "idle"  # shared, idle, loading, ready, error
        self.error: str | None = None
        self._own: Assistant | None = None
        self._shared: Assistant | None = None

    @property
    def separate(self) -> bool:
        return self.model is not None

    async def start(self) -> None:
        """Load the separate assist model, if any; on failure record the reason."""
        if self.model is None:
            return
        from exlsp.completion.fim import resolve_template
        from exlsp.completion.host import make_worker
        from exlsp.completion.service import create_backend

        model = self.model
        self.state = "loading"
        worker = self.worker = make_worker(model, "assist")
        try:
            backend = await worker.load(lambda: create_backend(model))
            fim: FimTokens | None
            try:
                fim = resolve_template(
                    model.fimTemplate, backend.tokenizer, Path(backend.info.path)
                )
            except Exception:
                fim = None  # an instruct model without FIM tokens: chat prompts only
            template = read_chat_template(model_dir(model, backend))
            if template is None and fim is None:
                raise RuntimeError(
                    f"{backend.info.path or model.baseUrl} has no chat template and no "
                    "fill-in-the-middle tokens: it can neither explain nor refactor"
                )
        except Exception as e:
            self.state = "error"
            self.error = str(e)
            log.error("the assist model failed to load: %s", e)
            if self.worker is worker:
                self.worker = None
            await asyncio.to_thread(worker.close)
            return
        if self.worker is not worker:  # closed meanwhile
            await asyncio.to_thread(worker.close)
            return
        self._own = Assistant(worker, backend.tokenizer, fim, template)
        self.state = "ready"
        self.error = None
        log.info(
            "assist model ready: %s (%s, %s prompts, %s)",
            backend.info.path,
            backend.name,
            self._own.mode,
            backend.info.device,
        )

    @property
    def backend(self) -> Any:
        """The backend that serves hover and code actions now (None: none yet)."""
        if self._own is not None:
            return self._own.worker.backend
        if self.state in ("loading", "idle"):
            return None
        return self.completion.backend

    @property
    def assistant(self) -> Assistant | None:
        """The assistant to use now; None while no model is ready."""
        if self._own is not None:
            return self._own
        if self.state in ("loading", "idle"):
            return None  # the separate model is coming: do not wait on the other one
        service = self.completion
        if service.engine is None or service.worker is None:
            return None
        shared = self._shared
        if shared is None or shared.worker is not service.worker:
            # The first use, or a fallback took over: the new model's own prompts.
            backend = service.backend
            served = service.serving_model
            folder = model_dir(served, backend) if backend and served else None
            engine = service.engine
            shared = self._shared = Assistant(
                service.worker, engine.tokenizer, engine.fim, read_chat_template(folder)
            )
        return shared

    def stats(self) -> dict[str, Any]:
        """What serves hover and code actions, and what it did, for `exlsp/stats`."""
        backend = self.backend
        assistant = self._own or self._shared
        memory = None
        if self._own is not None and backend is not None:
            # A separate model's weights (exllamav2: its VRAM, KV caches included).
            memory = getattr(backend, "vram_bytes", None) or getattr(backend, "weight_bytes", None)
        return {
            "separate": self.separate,
            "state": self.state,
            "error": self.error,
            "model": dataclasses.asdict(backend.info) if backend is not None else None,
            "memoryBytes": memory,
            "mode": assistant.mode if assistant is not None else None,
            "jobs": assistant.jobs if assistant is not None else 0,
        }

    def close(self) -> None:
        worker, self.worker = self.worker, None
        self._own = None
        if worker is not None:
            worker.close()

    async def aclose(self) -> None:
        worker, self.worker = self.worker, None
        self._own = None
        if worker is not None and self.state == "loading":
            worker.close(wait=False)  # `start` is cancelled; the load ends off the loop
        elif worker is not None:
            await asyncio.to_thread(worker.close)


def assistant_for(service: CompletionService) -> Assistant | None:
    """An Assistant on a loaded CompletionService's own model (None until it is ready).

    A new one per call (its answer cache included): a server keeps its one
    `AssistService`; this serves scripts that hold only a CompletionService."""
    return AssistService(service).assistant
