"""A tokenizer read from a model directory's `tokenizer.json`.

Every backend uses this one class, so prompts are built from the same token ids
whichever backend runs them. User text is encoded with special-token matching
switched off: text in a file that looks like ``<|fim_prefix|>`` stays plain text
and can never inject a control token into the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer as _RustTokenizer

from exlsp.completion.models import read_json_object, read_model_config


class Tokenizer(Protocol):
    bos_id: int | None
    eos_ids: frozenset[int]
    special_tokens: frozenset[str]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


class HfTokenizer:
    """`tokenizer.json` (+ `tokenizer_config.json`, `config.json`) of a model dir."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        self._tok = _RustTokenizer.from_file(str(path))
        self._tok.encode_special_tokens = True  # user text never becomes a control token
        tok_cfg = read_json_object(model_dir / "tokenizer_config.json")
        model_cfg = read_model_config(model_dir)

        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        self.special_tokens: frozenset[str] = frozenset(specials)

        bos = _token_content(tok_cfg.get("bos_token"))
        add_bos = bool(tok_cfg.get("add_bos_token", False))
        self.bos_id: int | None = self.token_to_id(bos) if bos and add_bos else None
        self.bos_token: str | None = bos

        eos: set[int] = set()
        eos_tok = _token_content(tok_cfg.get("eos_token"))
        if eos_tok and (i := self.token_to_id(eos_tok)) is not None:
            eos.add(i)
        cfg_eos = model_cfg.get("eos_token_id")
        for i in cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]:
            if isinstance(i, int):
                eos.add(i)
        self.eos_ids: frozenset[int] = frozenset(eos)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))

    def token_to_id(self, token: str) -> int | None:
        i = self._tok.token_to_id(token)
        return int(i) if i is not None else None
