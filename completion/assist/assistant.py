"""The `Assistant`: explanation and refactor prompts as background jobs on the
backend worker, so a completion always preempts them, with a deadline, and
finished answers cached by a hash of what was explained.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from exlsp.completion.assist.edits import (
    REFACTORS,
    RefactorRefused,
    TextEdit,
    check_parses,
    docstring_edit,
    rewrite_edit,
)
from exlsp.completion.assist.prompts import (
    AssistPrompt,
    DocstringSlot,
    chat_stop_ids,
    clean_docstring,
    clean_explanation,
    explain_messages,
    extract_code,
    fence,
    fim_docstring_prompt,
    refactor_messages,
    render_chat,
)
from exlsp.completion.assist.syntax import Definition, ParsedDocument, Span, hover_target, parse
from exlsp.completion.backends.base import BackendUnavailable, GenerationJob
from exlsp.completion.fim import FimTokens
from exlsp.completion.tokenizer import Tokenizer
from exlsp.completion.worker import GenerationHandle, ModelWorker

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
        head = f"**{self.title}**\n\n{fence(self.language, self.signature)}"
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
