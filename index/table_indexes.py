"""The chunk table's indexes: full-text (BM25) on the identifier-split text, scalar
indexes on id and path once the table is large, and the IVF vector index.

Each is built once the table is large enough for it, folded into by optimize(),
loaded into memory ahead of the first search (`warm`), and checked at open: an
index whose files are gone (a deleted ``_indices/`` folder) or that a query
cannot use is dropped and built again from the rows, which stay.
"""

from __future__ import annotations

import logging
import math
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from exlsp.index.table import TABLE, OpenTable, probe_vector

log = logging.getLogger(__name__)

# Build the vector index (IVF_FLAT) once this many rows have vectors; below it a
# flat search is exact and fast enough.
VECTOR_INDEX_MIN_ROWS = 20_000
# Rows per IVF partition. A target size, not a partition count: optimize()
# rebalances partitions towards the index's target size, and an index built with
# sqrt(rows) partitions came back from it with 8 large ones, so that every query
# compared every row.
VECTOR_PARTITION_ROWS = 1024
# A query searches this fraction of the partitions, and at least VECTOR_MIN_PROBES.
# Measured on all-MiniLM-L6-v2 vectors of 4,000 Lib/ chunks in 57 partitions
# (the partitions-to-rows ratio of 60k rows at this partition size): the ten
# nearest found by the index agree with the exact ten at 0.948 (0.864 at 0.1,
# 0.977 at 0.3, 0.997 at 0.5), while comparing a fifth of the rows.
VECTOR_PROBE_FRACTION = 0.2
VECTOR_MIN_PROBES = 4
# optimize() adds changed rows to the vector index as a new delta index, and a
# query searches every delta: past this many, the index is built again.
VECTOR_MAX_DELTAS = 8
# Scalar indexes on id and path speed up merges and deletes of large tables.
SCALAR_INDEX_MIN_ROWS = 5_000
# Older table versions are removed by optimize(); readers in other processes
# that still hold one that old reopen.
CLEANUP_OLDER_THAN = timedelta(minutes=1)
# In a query plan's metrics: the IVF partitions of all deltas, and the deltas.
_PARTITIONS_RANKED = re.compile(r"partitions_ranked=(\d+)")
_DELTAS_SEARCHED = re.compile(r"deltas_searched=(\d+)")


class IndexedTable(OpenTable):
    """The chunk table with its indexes; which of them exist is known after open."""

    def __init__(self, directory: Path | str, vector_dim: int | None) -> None:
        super().__init__(directory, vector_dim)
        self._has_fts = False
        self._has_vector_index = False
        self._has_scalar = False
        self._vector_partitions = 0  # of the IVF index (0: none, searches are flat)
        self.probe_fraction = VECTOR_PROBE_FRACTION

    def _forget_indexes(self) -> None:
        self._has_fts = self._has_vector_index = self._has_scalar = False

    def _refresh_index_state(self, *, warm: bool = True) -> None:
        columns = {tuple(i.columns) for i in self.table.list_indices()}
        self._has_fts = ("search_text",) in columns
        self._has_scalar = ("id",) in columns
        self._has_vector_index = ("vector",) in columns
        if warm:
            self.warm()

    def ensure_indexes(self) -> list[str]:
        """Create the indexes the table is now large enough for; names of those created."""
        from lancedb.index import FTS, BTree

        created: list[str] = []
        rows = self.count_rows()
        if rows and not self._has_fts:
            self.table.create_index(
                "search_text",
                config=FTS(
                    with_position=False,
                    base_tokenizer="simple",
                    lower_case=True,
                    stem=False,
                    remove_stop_words=False,
                    ascii_folding=True,
                    max_token_length=40,
                ),
                replace=True,
            )
            self._has_fts = True
            created.append("fts")
        if rows >= SCALAR_INDEX_MIN_ROWS and not self._has_scalar:
            self.table.create_index("id", config=BTree(), replace=True)
            self.table.create_index("path", config=BTree(), replace=True)
            self._has_scalar = True
            created.append("scalar")
        if (
            self.vector_dim is not None
            and not self._has_vector_index
            and self.count_rows("vector IS NOT NULL") >= VECTOR_INDEX_MIN_ROWS
        ):
            self._build_vector_index()
            created.append("ivf")
        if created:
            self.warm()
        return created

    def _build_vector_index(self) -> None:
        from lancedb.index import IvfFlat

        self.table.create_index(
            "vector",
            config=IvfFlat(distance_type="cosine", target_partition_size=VECTOR_PARTITION_ROWS),
            replace=True,
        )
        self._has_vector_index = True

    def _vector_deltas(self) -> int:
        for index in self.table.list_indices():
            if list(index.columns) == ["vector"]:
                stats = self.table.index_stats(index.name)
                return int(stats.num_indices or 1) if stats is not None else 1
        return 0

    def optimize(self) -> list[str]:
        """Compact files, fold new rows into the indexes, drop old versions; names of
        the indexes built again."""
        self.table.optimize(cleanup_older_than=CLEANUP_OLDER_THAN)
        rebuilt: list[str] = []
        if self._has_vector_index and self._vector_deltas() > VECTOR_MAX_DELTAS:
            self._build_vector_index()
            rebuilt.append("ivf")
        self.warm()
        return rebuilt

    def warm(self) -> None:
        """Load the indexes into memory now, on the index worker's thread, not in the
        first search after a change: a new version of the vector index is read
        whole (90 MB at 60k rows) by the first query that touches it. On object
        storage only what a query reads anyway is fetched."""
        try:
            if self._has_vector_index and self.vector_dim is not None:
                self._vector_partitions = self._count_partitions()
                if not self.remote:
                    probe = probe_vector(self.vector_dim)
                    self._vector_query(probe, 1, self._vector_partitions or None).to_arrow()
            if self._has_fts:
                self._lexical_query(["def"], 1).to_arrow()
        except Exception as exc:  # a cold cache is slower, nothing worse
            log.debug("warming the index caches failed: %s", exc)

    def _count_partitions(self) -> int:
        """Partitions of the IVF index now (optimize() splits and joins them), 0 if unknown."""
        assert self.vector_dim is not None
        plan = self._vector_query(probe_vector(self.vector_dim), 1, 1).analyze_plan()
        ranked = sum(int(n) for n in _PARTITIONS_RANKED.findall(plan))
        deltas = sum(int(n) for n in _DELTAS_SEARCHED.findall(plan))
        return ranked // max(1, deltas)

    def nprobes(self) -> int | None:
        """Partitions a vector query searches in each delta (None: no vector index, the
        search is flat)."""
        if not self._has_vector_index:
            return None
        partitions = self._vector_partitions
        if partitions <= 0:  # unknown: what the target size gives
            rows = self.count_rows("vector IS NOT NULL")
            partitions = max(1, rows // VECTOR_PARTITION_ROWS)
        wanted = math.ceil(partitions * self.probe_fraction)
        return min(partitions, max(VECTOR_MIN_PROBES, wanted))

    # --- repair at open ------------------------------------------------------

    def _repair_indexes(self) -> None:
        """Drop the indexes whose files are gone or unreadable and build them again
        (the rows and their vectors stay): a lost ``_indices/`` folder otherwise
        breaks every search while the table looks fine."""
        lost: list[str] = []
        reasons: list[str] = []
        for index in self.table.list_indices():
            problem = self._index_problem(index)
            if problem is not None:
                lost.append(str(index.name))
                reasons.append(problem)
        if not lost:
            return
        log.warning(
            "index %s: %s unusable (%s): building again",
            self.directory,
            ", ".join(lost),
            "; ".join(reasons)[:300],
        )
        for name in lost:
            self.table.drop_index(name)
        self._forget_indexes()
        self._refresh_index_state(warm=False)
        self.ensure_indexes()

    def _index_problem(self, index: Any) -> str | None:
        """Why an index of the table cannot be used (its files are missing, a query
        through it fails), or None. The queries are this table's own, whatever
        a subclass searches besides."""
        uuid = getattr(index, "index_uuid", None)
        where = self.directory
        if (
            isinstance(where, Path)
            and uuid
            and not (where / f"{TABLE}.lance" / "_indices" / uuid).is_dir()
        ):
            return "its files are missing"
        columns = list(index.columns)
        try:
            if columns == ["search_text"]:
                self._lexical_query(["def"], 1).to_arrow()
            elif columns == ["vector"] and self.vector_dim is not None:
                self._vector_query(probe_vector(self.vector_dim), 1, 1).to_arrow()
            elif len(columns) == 1:
                self.table.search().where(f"{columns[0]} = ''").limit(1).to_arrow()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None
