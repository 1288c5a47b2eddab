"""The chunk table's layout: its schema, the rows written for a file's chunks, the
rows a search returns, and the two queries (full-text and vector) LanceDB runs.

`OpenTable` is the open LanceDB table of one database; the layers above it add
the table's indexes (`table_indexes`), its searches (`table_search`) and the
opening, rebuilding and writing of the table (`store`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from exlsp.index.chunk import Chunk
from exlsp.index.lexical import search_text
from exlsp.index.storage import is_uri

SCHEMA_VERSION = 1
TABLE = "chunks"
RESULT_COLUMNS = ["id", "path", "start_line", "end_line", "symbol", "kind", "text"]


class StoreUnavailable(RuntimeError):
    """The table cannot be used (read-only open of a missing or different index)."""


@dataclass(frozen=True)
class FileState:
    content_hash: str
    mtime_ns: int
    size: int


@dataclass(frozen=True)
class StoredChunk:
    """A row returned by a search, with the engine's score for it."""

    id: str
    path: str
    start_line: int
    end_line: int
    symbol: str
    kind: str
    text: str
    score: float  # BM25 score (higher is better) or cosine distance (lower is better)


def sql_string(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def path_filter(paths: Iterable[str]) -> str:
    return "path IN (" + ", ".join(sql_string(p) for p in paths) + ")"


def schema_for(vector_dim: int | None) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("language", pa.string()),
        pa.field("symbol", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("start_line", pa.int32()),
        pa.field("end_line", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("search_text", pa.string()),
        pa.field("file_hash", pa.string()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("size", pa.int64()),
    ]
    if vector_dim is not None:
        fields.append(pa.field("vector", pa.list_(pa.float32(), vector_dim), nullable=True))
    return pa.schema(fields)


def chunk_rows(
    files: Mapping[str, tuple[FileState, Sequence[Chunk]]], vector_dim: int | None
) -> pa.Table:
    """The rows of `files`' chunks, without vectors (they are computed later)."""
    schema = schema_for(vector_dim)
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    for path, (state, chunks) in files.items():
        for c in chunks:
            cols["id"].append(c.id)
            cols["path"].append(path)
            cols["language"].append(c.language)
            cols["symbol"].append(c.symbol)
            cols["kind"].append(c.kind)
            cols["start_line"].append(c.start_line)
            cols["end_line"].append(c.end_line)
            cols["text"].append(c.text)
            cols["search_text"].append(search_text(f"{c.symbol}\n{c.text}"))
            cols["file_hash"].append(state.content_hash)
            cols["mtime_ns"].append(state.mtime_ns)
            cols["size"].append(state.size)
            if vector_dim is not None:
                cols["vector"].append(None)
    return pa.Table.from_pydict(cols, schema=schema)


def stored_chunks(data: pa.Table, score_column: str) -> list[StoredChunk]:
    """The rows of a search result, scored by `score_column`."""
    cols = {name: data[name].to_pylist() for name in [*RESULT_COLUMNS, score_column]}
    return [
        StoredChunk(
            id=cols["id"][i],
            path=cols["path"][i],
            start_line=int(cols["start_line"][i]),
            end_line=int(cols["end_line"][i]),
            symbol=cols["symbol"][i] or "",
            kind=cols["kind"][i] or "",
            text=cols["text"][i] or "",
            score=float(cols[score_column][i]),
        )
        for i in range(data.num_rows)
    ]


def probe_vector(dim: int) -> np.ndarray:
    """A unit vector for queries that only load or check the vector index."""
    probe = np.zeros(dim, dtype=np.float32)
    probe[0] = 1.0
    return probe


class OpenTable:
    """The chunk table of one database directory (or ``s3://`` URI), once opened."""

    def __init__(self, directory: Path | str, vector_dim: int | None) -> None:
        self.directory = directory
        self.remote = is_uri(directory)
        self.vector_dim = vector_dim
        self._table: Any = None

    @property
    def table(self) -> Any:
        if self._table is None:
            raise StoreUnavailable("the index table is not open")
        return self._table

    def count_rows(self, where: str | None = None) -> int:
        return int(self.table.count_rows(where) if where else self.table.count_rows())

    def _lexical_query(self, terms: Sequence[str], limit: int) -> Any:
        """BM25 over the identifier-split text; `terms` are already split and lowercase."""
        from lancedb.query import MatchQuery

        query = MatchQuery(" ".join(terms), "search_text")  # type: ignore[call-arg]
        return (
            self.table.search(query, query_type="fts")
            .select([*RESULT_COLUMNS, "_score"])
            .limit(limit)
        )

    def _vector_query(self, vector: np.ndarray, limit: int, nprobes: int | None) -> Any:
        query = (
            self.table.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
            .distance_type("cosine")
            .select([*RESULT_COLUMNS, "_distance"])
            .limit(limit)
        )
        return query.nprobes(nprobes) if nprobes else query
