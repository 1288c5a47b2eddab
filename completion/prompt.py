"""The cache-stable prompt layout.

    [sticky snippets][file header][FIM-prefix: lines above the cursor line]
    [FIM-suffix: rest of the cursor line + lines below][FIM-middle: cursor line, left of cursor]

Typing inside a line changes only the tokens after the middle marker, so the
backend's KV cache keeps everything before them. The prefix window's first
line moves with hysteresis, so it stays put while the user types. Each segment
is tokenized on its own and cached by content: a keystroke tokenizes the
cursor line's left part and little else.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from exlsp.completion.config import CompletionConfig
from exlsp.completion.fim import FimTokens
from exlsp.completion.languages import language
from exlsp.completion.tokenizer import Tokenizer
from exlsp.completion.types import CursorContext, DocumentView, Snippet


class TokenCache:
    """Token ids by text, least recently used out first."""

    def __init__(self, encode: Callable[[str], list[int]], size: int) -> None:
        self._encode = encode
        self._size = size
        self._items: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, text: str) -> tuple[int, ...]:
        ids = self._items.get(text)
        if ids is not None:
            self._items.move_to_end(text)
            self.hits += 1
            return ids
        self.misses += 1
        ids = tuple(self._encode(text))
        self._items[text] = ids
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return ids


@dataclass
class BuiltPrompt:
    ids: list[int]
    prefix: str  # the prefix window: whole lines above the cursor line
    suffix: str  # rest of the cursor line + lines below, within budget
    middle: str  # the cursor line left of the cursor (possibly cut on the left)
    prefix_start_line: int
    segment_tokens: dict[str, int] = field(default_factory=dict)


# How far the left part of a very long cursor line is cut, in characters: the cut
# point moves in steps of this many, so it stays put while the user types.
_MIDDLE_STEP = 256
# Distinct lines whose token counts are kept (all are dropped when full).
_LINE_COUNTS_MAX = 65536
# Characters per token assumed only to bound how much text is looked at before
# the real tokenizer counts it.
_CHARS_PER_TOKEN_MAX = 8


class PromptBuilder:
    """Builds token-id prompts for one model; keeps per-document window state."""

    # Fill ratios of the prefix budget for the hysteresis of the window start.
    REFILL_TARGET = 0.75  # where a moved window start lands
    LOW_WATER = 0.5  # below this (with more text above) the start moves up

    def __init__(self, tokenizer: Tokenizer, fim: FimTokens, config: CompletionConfig) -> None:
        self.tokenizer = tokenizer
        self.fim = fim
        self.config = config
        self.segments = TokenCache(tokenizer.encode, 512)
        # Token counts of whole lines, read at every keystroke for each line of the
        # windows: a plain dict (a line's hash is cached in the str) instead of an LRU.
        self._line_counts: dict[str, int] = {}
        self._window_start: OrderedDict[str, int] = OrderedDict()

    def forget(self, uri: str) -> None:
        self._window_start.pop(uri, None)

    def _count(self, line: str) -> int:
        n = self._line_counts.get(line)
        if n is None:
            if len(line) > self.config.prefixTokens * _CHARS_PER_TOKEN_MAX:
                return 1 << 30  # a huge (minified) line never fits a window
            if len(self._line_counts) >= _LINE_COUNTS_MAX:
                self._line_counts.clear()
            n = self._line_counts[line] = len(self.tokenizer.encode(line))
        return n

    # -- windows ------------------------------------------------------------

    def _prefix_start(self, doc: DocumentView) -> int:
        budget = self.config.prefixTokens
        c = doc.line
        prev = self._window_start.get(doc.uri)
        if prev is not None and prev <= c:
            used = 0
            for i in range(prev, c):
                used += self._count(doc.lines[i])
                if used > budget:
                    break
            if used <= budget and (prev == 0 or used >= budget * self.LOW_WATER):
                return prev
        # Move the start: fill to the target, leaving room to type below.
        target = budget * self.REFILL_TARGET
        used = 0
        start = c
        while start > 0:
            n = self._count(doc.lines[start - 1])
            if used + n > target:
                break
            used += n
            start -= 1
        return start

    def _suffix_text(self, doc: DocumentView, right: str) -> str:
        budget = self.config.suffixTokens
        cap = budget * _CHARS_PER_TOKEN_MAX
        parts = [right[:cap]]
        used = self._count(right[:cap]) if right else 0
        for i in range(doc.line + 1, len(doc.lines)):
            n = self._count(doc.lines[i])
            if used + n > budget:
                break
            used += n
            parts.append(doc.lines[i])
        return "".join(parts)

    def _middle_text(self, left: str) -> str:
        cap = self.config.middleTokens * 4
        if len(left) <= cap:
            return left
        cut = ((len(left) - cap) // _MIDDLE_STEP + 1) * _MIDDLE_STEP
        return left[cut:]

    # -- rendering ------------------------------------------------------------

    def _snippet_ids(self, doc: DocumentView, snippets: Sequence[Snippet]) -> list[int]:
        """Snippets, then the current file's header, within the snippet budget."""
        if not snippets:
            return []
        fim = self.fim
        budget = self.config.snippetTokens
        out: list[int] = []
        path = doc.path or doc.uri
        if fim.file_sep is not None:
            header = [fim.file_sep, *self.segments(path + "\n")]
            for s in snippets:
                ids = [fim.file_sep, *self.segments(f"{s.path}\n{s.text.rstrip()}\n")]
                if len(out) + len(ids) + len(header) > budget:
                    continue
                out += ids
            return out + header if out else []
        comment = language(doc.language).comment
        header_text = f"{comment} Path: {path}\n"
        header_ids = list(self.segments(header_text))
        for s in snippets:
            body = "".join(f"{comment} {ln}\n" for ln in s.text.rstrip().splitlines())
            ids = list(self.segments(f"{comment} Path: {s.path}\n{body}"))
            if len(out) + len(ids) + len(header_ids) > budget:
                continue
            out += ids
        return out + header_ids if out else []

    def build(
        self,
        doc: DocumentView,
        snippets: Sequence[Snippet] = (),
        cursor: CursorContext | None = None,
    ) -> BuiltPrompt:
        """The prompt for `doc`'s cursor; `cursor`: the request's, cut by the engine."""
        if cursor is None:
            cursor = CursorContext.at(doc)
        left = cursor.left
        right = cursor.right + cursor.ending  # the suffix continues on the lines below
        start = self._prefix_start(doc)
        self._window_start[doc.uri] = start
        self._window_start.move_to_end(doc.uri)
        if len(self._window_start) > 256:
            self._window_start.popitem(last=False)

        prefix = "".join(doc.lines[start : doc.line])
        suffix = self._suffix_text(doc, right)
        middle = self._middle_text(left)

        fim = self.fim
        tpl = fim.template
        seg = self.segments
        snippet_ids = self._snippet_ids(doc, snippets)
        prefix_ids = seg(tpl.prefix_lead + prefix) if (prefix or tpl.prefix_lead) else ()
        suffix_ids = seg(suffix)
        middle_ids = self.tokenizer.encode(middle)  # changes every keystroke: not cached

        ids: list[int] = [fim.bos] if fim.bos is not None else []
        if tpl.suffix_first:
            ids += snippet_ids
            ids += [fim.suffix, *suffix_ids, fim.prefix, *prefix_ids]
            if fim.middle is not None:
                ids.append(fim.middle)
            ids += middle_ids
        elif fim.file_sep is not None:
            # Repository-level families: snippets are other files before the FIM frame.
            ids += snippet_ids
            ids += [fim.prefix, *prefix_ids, fim.suffix, *suffix_ids]
            ids += [fim.middle] if fim.middle is not None else []
            ids += middle_ids
        else:
            # Others: snippets as comments at the start of the FIM prefix.
            ids += [fim.prefix, *snippet_ids, *prefix_ids, fim.suffix, *suffix_ids]
            ids += [fim.middle] if fim.middle is not None else []
            ids += middle_ids
        return BuiltPrompt(
            ids=ids,
            prefix=prefix,
            suffix=suffix,
            middle=middle,
            prefix_start_line=start,
            segment_tokens={
                "snippets": len(snippet_ids),
                "prefix": len(prefix_ids),
                "suffix": len(suffix_ids),
                "middle": len(middle_ids),
            },
        )
