"""Token ids for a remote server: piece ids (text carried in an id), the estimating
tokenizer used without the served model's tokenizer, and the served one."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from exlsp.completion.fim import FimTemplate
from exlsp.completion.tokenizer import HfTokenizer

CHARS_PER_TOKEN = 3
_ZWSP = "\u200b"


def piece_id(text: str) -> int:
    """A negative id that encodes `text` itself (never a real token id)."""
    return -int.from_bytes(b"\x01" + text.encode("utf-8"), "big")


def piece_text(i: int) -> str:
    n = -i
    return n.to_bytes((n.bit_length() + 7) // 8, "big")[1:].decode("utf-8")


class CharEstimateTokenizer:
    """Stands in for the served model's tokenizer when none is configured.

    A token is estimated as `CHARS_PER_TOKEN` characters: `encode` cuts text into
    pieces of that many characters, each a piece id, so counts are estimates
    while `decode` stays exact. The template's control tokens get small ids.
    """

    exact = False

    def __init__(self, template: FimTemplate) -> None:
        names = [template.prefix, template.suffix, *template.stops]
        names += [t for t in (template.middle, template.repo_name, template.file_sep) if t]
        self._ids = {name: i for i, name in enumerate(dict.fromkeys(names))}
        self._names = {i: name for name, i in self._ids.items()}
        self.special_tokens = frozenset(self._ids)
        self.bos_id: int | None = None  # a text prompt gets its BOS from the server
        self.bos_token: str | None = None
        self.eos_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        n = CHARS_PER_TOKEN
        return [piece_id(text[i : i + n]) for i in range(0, len(text), n)]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(piece_text(i) if i < 0 else self._names.get(i, "") for i in ids)

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)


class RemoteTokenizer:
    """The served model's tokenizer (`tokenizer.json`), also decoding piece ids."""

    exact = True

    def __init__(self, inner: HfTokenizer) -> None:
        self._inner = inner
        self.special_tokens = inner.special_tokens
        self.bos_id = inner.bos_id
        self.bos_token = inner.bos_token
        self.eos_ids = inner.eos_ids

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < 0:
                if run:
                    out.append(self._inner.decode(run))
                    run = []
                out.append(piece_text(i))
            else:
                run.append(i)
        if run:
            out.append(self._inner.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        return self._inner.token_to_id(token)


def family_from_model_name(name: str) -> str | None:
    """The FIM family a served model's name suggests (as editor plugins guess it)."""
    n = name.lower().replace("_", "-")
    if "coder" in n and "qwen" in n:
        return "qwen2.5-coder"
    for key, family in (
        ("starcoder2", "starcoder2"),
        ("deepseek-coder", "deepseek-coder"),
        ("codellama", "codellama"),
        ("code-llama", "codellama"),
        ("codestral", "codestral"),
        ("codegemma", "codegemma"),
    ):
        if key in n:
            return family
    return None


class PromptText:
    """Token-id prompts as text, for a server that takes text: the control tokens as
    their strings, and in the user's text every control-token string broken with a
    zero-width space (the server would read it as the control token)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._control = {
            i: tok
            for tok in tokenizer.special_tokens
            if (i := tokenizer.token_to_id(tok)) is not None
        }
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_re = (
            re.compile("|".join(re.escape(s) for s in specials)) if specials else None
        )
        self._stop_text: dict[frozenset[int], list[str]] = {}

    def _neutralize(self, text: str) -> str:
        if self._special_re is None:
            return text
        return self._special_re.sub(lambda m: m.group(0)[0] + _ZWSP + m.group(0)[1:], text)

    def render(self, ids: Sequence[int]) -> str:
        """The prompt as text: control tokens as their strings, user text neutralized."""
        tok = self._tok
        if ids and tok.bos_id is not None and ids[0] == tok.bos_id:
            ids = ids[1:]  # the server adds BOS to a text prompt where the model wants one
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            name = self._control.get(i)
            if name is None:
                run.append(i)
                continue
            if run:
                out.append(self._neutralize(tok.decode(run)))
                run = []
            out.append(name)
        if run:
            out.append(self._neutralize(tok.decode(run)))
        return "".join(out)

    def stops(self, stop_ids: frozenset[int]) -> list[str]:
        """The stop ids that are control tokens, as their strings."""
        texts = self._stop_text.get(stop_ids)
        if texts is None:
            texts = sorted({t for i in stop_ids if (t := self._control.get(i))})
            self._stop_text[stop_ids] = texts
        return texts
