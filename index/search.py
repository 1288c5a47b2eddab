"""Hybrid search: BM25 and vector ranks fused with reciprocal rank fusion."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from exlsp.index.store import ChunkStore, StoredChunk

log = logging.getLogger(__name__)

RRF_K = 60
# How deep each ranking enters the fusion. The dense model is the weaker ranker
# for code-to-code queries (with equal depth, a chunk that both lists rank
# mediocre outranks the exact lexical match), so only its top few count.
LEXICAL_DEPTH = 30
VECTOR_DEPTH = 10


@dataclass(frozen=True)
class SearchHit:
    path: str
    start_line: int
    end_line: int  # exclusive
    symbol: str
    kind: str
    text: str
    score: float  # fused RRF score, higher is better
    lexical_rank: int | None = None  # 1-based
    vector_rank: int | None = None
    lexical_score: float | None = None  # BM25
    vector_distance: float | None = None  # cosine distance
    id: str = ""


def rrf_fuse(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (k + rank(d)), rank from 1.

    Returns (key, score) best first; ties keep the order of first appearance.
    """
    scores: dict[str, float] = {}
    for ranking in rankings:
        seen: set[str] = set()
        for rank, key in enumerate(ranking, start=1):
            if key in seen:
                continue
            seen.add(key)
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    order = {key: i for i, key in enumerate(scores)}
    return sorted(scores.items(), key=lambda item: (-item[1], order[item[0]]))


def _vector_side(store: ChunkStore, vector: np.ndarray, fetch: int) -> list[StoredChunk]:
    try:
        return store.search_vector(vector, fetch)
    except Exception as exc:  # vectors are a bonus: lexical still answers
        log.debug("vector search failed: %s", exc)
        return []


def hybrid_search(
    store: ChunkStore,
    terms: Sequence[str],
    query_vector: np.ndarray | None,
    limit: int,
    *,
    candidates: int = 50,
    lexical_depth: int = LEXICAL_DEPTH,
    vector_depth: int = VECTOR_DEPTH,
    keep: Callable[[StoredChunk], bool] | None = None,
    mode: str = "hybrid",
) -> list[SearchHit]:
    """The best `limit` chunks for a query, fused from both rankings.

    `terms`: lexical query terms (see `lexical.query_terms`); `query_vector`: the
    query's embedding, computed by the caller (None: lexical only). Each side
    fetches `candidates` rows; `keep` filters them (the current file's prompt
    window); then the first `lexical_depth` / `vector_depth` enter reciprocal
    rank fusion (in "hybrid" mode; a single mode uses its ranking alone).
    """
    use_lexical = mode in {"hybrid", "lexical"} and bool(terms)
    use_vector = (
        mode in {"hybrid", "vector"} and query_vector is not None and store.vector_dim is not None
    )
    lexical: list[StoredChunk] = []
    vector: list[StoredChunk] = []
    if use_lexical and use_vector and query_vector is not None:
        # Only the top `vector_depth` count: fetch a few more than that (some may
        # be filtered out), not every candidate.
        fetch = min(candidates, 3 * vector_depth)
        lexical, vector = store.search_both(terms, candidates, query_vector, fetch)
    elif use_vector and query_vector is not None:
        vector = _vector_side(store, query_vector, candidates)
    elif use_lexical:
        lexical = store.search_lexical(terms, candidates)
    if keep is not None:
        lexical = [c for c in lexical if keep(c)]
        vector = [c for c in vector if keep(c)]
    if use_lexical and use_vector:
        lexical = lexical[: max(lexical_depth, limit)]
        vector = vector[:vector_depth]
    by_id: dict[str, StoredChunk] = {}
    lex_rank: dict[str, tuple[int, float]] = {}
    vec_rank: dict[str, tuple[int, float]] = {}
    for rank, c in enumerate(lexical, start=1):
        by_id.setdefault(c.id, c)
        lex_rank.setdefault(c.id, (rank, c.score))
    for rank, c in enumerate(vector, start=1):
        by_id.setdefault(c.id, c)
        vec_rank.setdefault(c.id, (rank, c.score))
    fused = rrf_fuse([[c.id for c in lexical], [c.id for c in vector]])
    hits: list[SearchHit] = []
    for key, score in fused[:limit]:
        c = by_id[key]
        lr = lex_rank.get(key)
        vr = vec_rank.get(key)
        hits.append(
            SearchHit(
                path=c.path,
                start_line=c.start_line,
                end_line=c.end_line,
                symbol=c.symbol,
                kind=c.kind,
                text=c.text,
                score=score,
                lexical_rank=lr[0] if lr else None,
                vector_rank=vr[0] if vr else None,
                lexical_score=lr[1] if lr else None,
                vector_distance=vr[1] if vr else None,
                id=key,
            )
        )
    return hits
