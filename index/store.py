"""The chunk table: embedded LanceDB under the database directory.

The table is a rebuildable cache. Its layout is described by a fingerprint
(schema version, chunker settings, embedding model and size) kept in
``meta.json`` next to it; a table whose fingerprint differs, or that fails to
open (a process killed mid-write on a file system that lost data, a version
of LanceDB that cannot read it), is dropped and rebuilt, never fatal.

Every file's rows are replaced in one commit (``merge_insert`` on ``id`` that
deletes the file's rows the source no longer has), so a reader sees a file
either before or after a change. Rows carry the file's content hash, mtime and
size, which is how a restart knows what is up to date.

Only the index worker thread writes; searches may come from any thread.

The parts: `storage` (where the database lives: a private local directory, its
writer lock, or object storage; ``meta.json``), `table` (the schema, rows in and
out), `table_indexes` (building, optimizing, warming and repairing the indexes),
`table_search` (the searches). `ChunkStore` here opens, rebuilds and writes the
table; this module also names what its users need of the parts.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from exlsp.index.chunk import Chunk
from exlsp.index.storage import (
    META,
    ObjectStorage,
    WriterLock,
    is_uri,
    private_dir,
    read_meta,
    store_location,
    write_meta,
)
from exlsp.index.table import (
    SCHEMA_VERSION,
    TABLE,
    FileState,
    StoredChunk,
    StoreUnavailable,
    chunk_rows,
    path_filter,
    schema_for,
    sql_string,
)
from exlsp.index.table_search import SearchableTable

__all__ = [
    "ChunkStore",
    "FileState",
    "ObjectStorage",
    "StoreUnavailable",
    "StoredChunk",
    "WriterLock",
    "is_uri",
    "store_location",
]

log = logging.getLogger(__name__)

# Files per commit: bounds the SQL filter and the memory of one write.
FILES_PER_COMMIT = 400
# How often a reader of an index on object storage looks for a newer version.
REMOTE_RECHECK_S = 60


class ChunkStore(SearchableTable):
    """The chunk table of one workspace. Open with `open()`; searches are thread-safe."""

    def __init__(
        self,
        directory: Path | str,
        fingerprint: Mapping[str, Any],
        vector_dim: int | None,
        *,
        read_only: bool = False,
        storage: ObjectStorage | None = None,
    ) -> None:
        super().__init__(directory, vector_dim)
        self.storage = storage or (ObjectStorage.from_env() if self.remote else None)
        self.fingerprint = {"schema": SCHEMA_VERSION, **fingerprint, "dim": vector_dim}
        self.read_only = read_only
        self.rebuilt = False  # set when open() had to drop an unusable table
        self._db: Any = None
        self._meta: dict[str, Any] = {}  # meta.json as read or last written

    # --- opening -------------------------------------------------------------

    def open(self) -> None:
        # LanceDB's Rust logger writes warnings ("No existing dataset ... will be
        # created") to stderr, which a language server shares with its client.
        os.environ.setdefault("LANCEDB_LOG", "error")
        import lancedb

        options: dict[str, str] = {}
        if isinstance(self.directory, Path):
            if self.read_only:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            else:
                private_dir(self.directory)
        elif self.storage is not None:
            options = self.storage.lance_options()
        # A reader looks for new versions now and then; on object storage each look
        # is a request, and a shared index changes when CI rebuilds it.
        consistency = None
        if self.read_only:
            consistency = timedelta(seconds=REMOTE_RECHECK_S if self.remote else 2)
        self._db = lancedb.connect(
            str(self.directory),
            read_consistency_interval=consistency,
            storage_options=options or None,
        )
        meta = read_meta(self.directory, self.storage)
        self._meta = dict(meta or {})
        matches = meta is not None and meta.get("fingerprint") == self.fingerprint
        if self.read_only:
            if not matches:
                raise StoreUnavailable(
                    f"no index with these settings in {self.directory}"
                    + (" (built with different settings)" if meta else "")
                )
            self._table = self._db.open_table(TABLE)
            self._refresh_index_state()
            return
        if matches:
            try:
                table = self._db.open_table(TABLE)
                self._validate(table)
                self._table = table
            except Exception as exc:  # any failure to open means: rebuild
                log.warning("index table in %s is unusable (%s): rebuilding", self.directory, exc)
            else:
                self._repair_indexes()
                self._refresh_index_state()
                return
        elif meta is not None:
            log.info("index in %s was built with other settings: rebuilding", self.directory)
        self._rebuild()

    def meta_value(self, key: str) -> Any:
        """A value kept in ``meta.json`` beside the fingerprint (None if absent)."""
        return self._meta.get(key)

    def set_meta_value(self, key: str, value: Any) -> None:
        """Keep `value` in ``meta.json`` (the writer only)."""
        self._meta = {**self._meta, key: value}
        write_meta(self.directory, self.storage, self._meta)

    @staticmethod
    def _validate(table: Any) -> None:
        table.count_rows()
        table.search().select(["id", "path", "file_hash"]).limit(1).to_arrow()
        table.list_indices()

    def _rebuild(self) -> None:
        self.rebuilt = True
        self._table = None
        try:
            self._db.drop_table(TABLE, ignore_missing=True)
        except Exception as exc:
            log.debug("drop_table failed (%s): removing the directory", exc)
        if isinstance(self.directory, Path):
            shutil.rmtree(self.directory / f"{TABLE}.lance", ignore_errors=True)
            (self.directory / META).unlink(missing_ok=True)
        self._table = self._db.create_table(
            TABLE, schema=schema_for(self.vector_dim), mode="overwrite"
        )
        self._meta = {"fingerprint": self.fingerprint, "note": "a rebuildable cache of exlsp"}
        write_meta(self.directory, self.storage, self._meta)
        self._forget_indexes()

    def close(self) -> None:
        self._table = None
        self._db = None

    # --- reading state -------------------------------------------------------

    def all_rows(self, columns: Sequence[str]) -> pa.Table:
        """`columns` of every row of this table."""
        return self.table.search().select(list(columns)).limit(None).to_arrow()

    def file_states(self) -> dict[str, FileState]:
        """Every indexed file with the content hash, mtime and size its rows were built from."""
        data = self.all_rows(["path", "file_hash", "mtime_ns", "size"])
        states: dict[str, FileState] = {}
        for path, h, mtime, size in zip(
            data["path"].to_pylist(),
            data["file_hash"].to_pylist(),
            data["mtime_ns"].to_pylist(),
            data["size"].to_pylist(),
            strict=True,
        ):
            states[path] = FileState(h or "", int(mtime or 0), int(size or 0))
        return states

    def paths(self) -> set[str]:
        return set(self.all_rows(["path"])["path"].to_pylist())

    # --- writing -------------------------------------------------------------

    def _carry_vectors(self, rows: pa.Table) -> pa.Table:
        """Keep the vectors of chunks that did not change (same id = same text)."""
        if self.vector_dim is None or rows.num_rows == 0:
            return rows
        ids = rows["id"].to_pylist()
        known: dict[str, Any] = {}
        for start in range(0, len(ids), 2000):
            part = ids[start : start + 2000]
            old = (
                self.table.search()
                .where("vector IS NOT NULL AND id IN (" + ", ".join(map(sql_string, part)) + ")")
                .select(["id", "vector"])
                .limit(None)
                .to_arrow()
            )
            known.update(zip(old["id"].to_pylist(), old["vector"].to_pylist(), strict=True))
        if not known:
            return rows
        vectors = [known.get(i) for i in ids]
        column = pa.array(vectors, type=pa.list_(pa.float32(), self.vector_dim))
        return rows.set_column(rows.schema.get_field_index("vector"), "vector", column)

    def replace_files(
        self, files: Mapping[str, tuple[FileState, Sequence[Chunk]]], *, new: bool = False
    ) -> None:
        """Make the rows of each of `files` exactly its chunks; one commit per group.

        `new`: none of these paths has rows yet (the cold scan), so a plain append will do.
        """
        items = list(files.items())
        for start in range(0, len(items), FILES_PER_COMMIT):
            group = dict(items[start : start + FILES_PER_COMMIT])
            rows = chunk_rows(group, self.vector_dim)
            if new:
                if rows.num_rows:
                    self.table.add(rows)
                continue
            if rows.num_rows == 0:
                self.table.delete(path_filter(group))
                continue
            rows = self._carry_vectors(rows)
            (
                self.table.merge_insert("id")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(path_filter(group))
                .execute(rows, on_bad_vectors="null")
            )

    def delete_paths(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        for start in range(0, len(paths), FILES_PER_COMMIT):
            self.table.delete(path_filter(paths[start : start + FILES_PER_COMMIT]))

    def rows_without_vectors(self, limit: int) -> list[tuple[str, str, str, str]]:
        """(id, path, symbol, text) of up to `limit` rows that still need a vector."""
        if self.vector_dim is None:
            return []
        data = (
            self.table.search()
            .where("vector IS NULL")
            .select(["id", "path", "symbol", "text"])
            .limit(limit)
            .to_arrow()
        )
        return list(
            zip(
                data["id"].to_pylist(),
                data["path"].to_pylist(),
                data["symbol"].to_pylist(),
                data["text"].to_pylist(),
                strict=True,
            )
        )

    def set_vectors(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Fill in vectors of existing rows (rows deleted meanwhile stay deleted)."""
        if self.vector_dim is None or not ids:
            return
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
        column = pa.FixedSizeListArray.from_arrays(flat, self.vector_dim)
        data = pa.table({"id": pa.array(list(ids), pa.string()), "vector": column})
        self.table.merge_insert("id").when_matched_update_all().execute(data)
