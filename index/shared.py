"""A shared index underneath the local one.

A team builds the index of a large repository once (a CI job writing to
``s3://bucket/prefix``) and every editor reads it. Each editor still has its
own working tree: files it changed, added or deleted differ from what the
shared table holds. `SharedOverlayStore` is the local chunk table (the
overlay, written by this machine's index worker as usual) with the shared
table read-only beneath it:

- the shared table's file states count as indexed, so the scan reads a file
  that has the shared version's content hash and writes nothing for it;
- a file that differs is indexed in the local table and its path *shadows*
  the shared rows; a file deleted here shadows them too; a file changed back
  to the shared content leaves the local table and shows the shared rows again;
- searches query both tables and drop shared hits whose path is shadowed.

Everything else (writes, indexes, embeddings, optimize) is the local table's,
exactly as without a shared index. The shared table is read at the version it
had when the overlay opened (a newer one, written by CI meanwhile, is picked up
at the next start), so that what is hidden and what is indexed here stay
decided against the same version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from exlsp.index.chunk import Chunk
from exlsp.index.config import IndexConfig
from exlsp.index.store import (
    ChunkStore,
    FileState,
    ObjectStorage,
    StoredChunk,
    is_uri,
    store_location,
)

log = logging.getLogger(__name__)

# Shared hits fetched beyond `limit` to make up for shadowed ones, at most.
MAX_OVERFETCH = 200


def object_storage(config: IndexConfig) -> ObjectStorage:
    return ObjectStorage.from_env(
        endpoint=config.storageEndpoint,
        region=config.storageRegion,
        access_key_id=config.storageAccessKeyId,
        secret_access_key=config.storageSecretAccessKey,
    )


class SharedOverlayStore(ChunkStore):
    """The local chunk table with a read-only shared table beneath it."""

    def __init__(
        self,
        directory: Path | str,
        fingerprint: Mapping[str, Any],
        vector_dim: int | None,
        shared: ChunkStore,
        *,
        read_only: bool = False,
        storage: ObjectStorage | None = None,
    ) -> None:
        super().__init__(directory, fingerprint, vector_dim, read_only=read_only, storage=storage)
        self.shared: ChunkStore | None = shared
        self._shared_states: dict[str, FileState] = {}
        self._shadowed: frozenset[str] = frozenset()  # replaced whole: searches read it

    @property
    def shadowed(self) -> frozenset[str]:
        """Paths whose shared rows are hidden (changed or deleted here)."""
        return self._shadowed

    def open(self) -> None:
        super().open()
        shared = self.shared
        if shared is None:
            return
        try:
            shared.open()
            # Read the shared table as of now: what this overlay hides and holds is
            # decided against this version, and CI may write a newer one meanwhile.
            shared.table.checkout(shared.table.version)
            self._shared_states = shared.file_states()
        except Exception as exc:
            # Without it everything is indexed here: slower to build, still correct.
            log.warning(
                "shared index %s cannot be used (%s): indexing the whole workspace locally",
                shared.directory,
                exc,
            )
            self.shared = None
            self._shared_states = {}
            return
        self._shadowed = frozenset(super().paths() & self._shared_states.keys())
        log.info(
            "shared index %s: %d files; %d differ here",
            shared.directory,
            len(self._shared_states),
            len(self._shadowed),
        )

    # --- state ---------------------------------------------------------------------

    def file_states(self) -> dict[str, FileState]:
        states = {p: s for p, s in self._shared_states.items() if p not in self._shadowed}
        states.update(super().file_states())
        return states

    def paths(self) -> set[str]:
        return (set(self._shared_states) - self._shadowed) | super().paths()

    def _shadow(self, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        shadowed = (set(self._shadowed) | set(add)) - set(remove)
        self._shadowed = frozenset(p for p in shadowed if p in self._shared_states)

    # --- writing: the local table, and the shadows ---------------------------------

    def replace_files(
        self, files: Mapping[str, tuple[FileState, Sequence[Chunk]]], *, new: bool = False
    ) -> None:
        same = [
            path
            for path, (state, _chunks) in files.items()
            if (shared := self._shared_states.get(path)) is not None
            and shared.content_hash == state.content_hash
        ]
        differ = {p: v for p, v in files.items() if p not in same}
        if same:
            # Back to the shared content: the shared rows serve it again.
            super().delete_paths(same)
            self._shadow(remove=same)
        if differ:
            super().replace_files(differ, new=new and not (differ.keys() & self._shared_states))
            self._shadow(add=differ)

    def delete_paths(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        super().delete_paths(paths)
        self._shadow(add=paths)

    # --- searching: both tables ------------------------------------------------------

    def _shared_hits(self, search: Any, limit: int) -> list[StoredChunk]:
        shadowed = self._shadowed
        extra = min(len(shadowed), MAX_OVERFETCH)
        hits: list[StoredChunk] = search(limit + extra)
        return [h for h in hits if h.path not in shadowed][:limit]

    def search_lexical(self, terms: Sequence[str], limit: int) -> list[StoredChunk]:
        local = super().search_lexical(terms, limit)
        shared = self.shared
        if shared is None:
            return local
        far = self._shared_hits(lambda n: shared.search_lexical(terms, n), limit)
        # BM25 scores of two tables: each is relative to its own corpus, close enough
        # to interleave (the overlay holds the files being worked on).
        return sorted(local + far, key=lambda h: -h.score)[:limit]

    def search_vector(self, vector: np.ndarray, limit: int) -> list[StoredChunk]:
        local = super().search_vector(vector, limit)
        shared = self.shared
        if shared is None:
            return local
        far = self._shared_hits(lambda n: shared.search_vector(vector, n), limit)
        return sorted(local + far, key=lambda h: h.score)[:limit]

    def visible_rows(self, columns: Sequence[str]) -> pa.Table:
        """Every row a search can return: the overlay's and the unshadowed shared ones."""
        local = self.all_rows(columns)
        shared = self.shared
        if shared is None:
            return local
        rows = shared.all_rows(columns)
        keep = [p not in self._shadowed for p in rows["path"].to_pylist()]
        return pa.concat_tables([local, rows.filter(pa.array(keep, pa.bool_()))])


def make_store(
    location: Path | str,
    fingerprint: Mapping[str, Any],
    vector_dim: int | None,
    config: IndexConfig,
    *,
    read_only: bool = False,
) -> ChunkStore:
    """The chunk store for `config`: plain, or over the shared index it names."""
    storage = object_storage(config) if is_uri(location) or is_uri(config.sharedIndex) else None
    if not config.sharedIndex:
        return ChunkStore(location, fingerprint, vector_dim, read_only=read_only, storage=storage)
    shared = ChunkStore(
        store_location(config.sharedIndex), fingerprint, vector_dim, read_only=True, storage=storage
    )
    return SharedOverlayStore(
        location, fingerprint, vector_dim, shared, read_only=read_only, storage=storage
    )
