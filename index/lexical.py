"""Identifier-aware text for the full-text index.

LanceDB's native tokenizer splits on punctuation (so snake_case falls apart)
but not inside camelCase words. Every chunk therefore gets a searchable copy in
which each identifier becomes its lowercase parts plus the whole identifier
joined without separators: ``parseHttpRequest`` and ``parse_http_request`` both
become ``parse http request parsehttprequest``, so either spelling finds the
other, and a whole rare identifier still scores as one rare term.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"\w+")
_PARTS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+|[^\W\d_A-Za-z]+")

# Keywords and names so common in code that they only slow a query down.
_STOP_TEXT = """
    a an and as assert async auto await bool break byte case catch char class const continue
    def default defer del do double elif else end enum except export extends false final
    finally float fn for from func function go if impl implements import in include
    int interface is it lambda let long loop match mod mut new nil none nonlocal not null of
    or package pass pub public private protected raise return self static str string struct
    super switch the this throw throws to true try type typedef unsigned use var void while
    with yield
"""
STOP_TERMS = frozenset(_STOP_TEXT.split())

_cache: dict[str, str] = {}
_CACHE_LIMIT = 500_000


def identifier_terms(word: str) -> str:
    """Space-separated index terms of one identifier (cached)."""
    cached = _cache.get(word)
    if cached is not None:
        return cached
    parts = [p.lower() for p in _PARTS.findall(word)]
    if len(parts) > 1:
        terms = " ".join([*parts, "".join(parts)])
    elif parts:
        terms = parts[0]
    else:
        terms = ""
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[word] = terms
    return terms


def search_text(text: str) -> str:
    """The identifier-split, lowercase copy of `text` that the full-text index sees."""
    return " ".join(identifier_terms(w) for w in _WORD.findall(text))


def query_terms(lines: Iterable[str], max_terms: int = 48) -> list[str]:
    """Distinct terms of `lines` for a query, at most `max_terms`.

    Give the lines nearest the cursor first: distinctive terms come first in
    order of appearance, then, if there is room, keywords, one-letter names
    and numbers (BM25 weighs them little, but a short query needs them).
    """
    seen: set[str] = set()
    good: list[str] = []
    weak: list[str] = []
    for line in lines:
        for word in _WORD.findall(line):
            for term in identifier_terms(word).split():
                if term in seen:
                    continue
                seen.add(term)
                if len(term) < 2 or term in STOP_TERMS or term.isdigit():
                    weak.append(term)
                else:
                    good.append(term)
        if len(good) >= max_terms:
            break
    return (good + weak)[:max_terms]
