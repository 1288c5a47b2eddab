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

The table holds the workspace's code: a local database directory is the
user's alone (0700, whatever the umask; the files exlsp writes itself, 0600).
Its indexes are checked at open: an index whose files are gone (a deleted
``_indices/`` folder) is dropped and built again from the rows, which stay.

The database may also live on object storage (``s3://bucket/prefix``, S3 or an
S3-compatible service): LanceDB reads and writes it directly and ``meta.json``
goes through pyarrow's S3 file system. Object storage has no lock file: one
writer at a time (the CI job that builds a shared index), any number of readers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from exlsp.index.chunk import Chunk
from exlsp.index.lexical import search_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TABLE = "chunks"
META = "meta.json"
LOCK = "writer.lock"

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
# Files per commit: bounds the SQL filter and the memory of one write.
FILES_PER_COMMIT = 400
# Older table versions are removed by optimize(); readers in other processes
# that still hold one that old reopen.
CLEANUP_OLDER_THAN = timedelta(minutes=1)
# How often a reader of an index on object storage looks for a newer version.
REMOTE_RECHECK_S = 60
RESULT_COLUMNS = ["id", "path", "start_line", "end_line", "symbol", "kind", "text"]
# In a query plan's metrics: the IVF partitions of all deltas, and the deltas.
_PARTITIONS_RANKED = re.compile(r"partitions_ranked=(\d+)")
_DELTAS_SEARCHED = re.compile(r"deltas_searched=(\d+)")


class StoreUnavailable(RuntimeError):
    """The table cannot be used (read-only open of a missing or different index)."""


def is_uri(location: str | Path) -> bool:
    """An object-storage URI (``s3://bucket/prefix``) rather than a local directory."""
    return isinstance(location, str) and "://" in location and not location.startswith("file:")


def store_location(setting: str) -> Path | str:
    """A database setting as a local directory or an ``s3://`` URI."""
    if is_uri(setting):
        if not setting.startswith("s3://"):
            raise ValueError(f"unsupported index location {setting!r}: use a directory or s3://")
        return setting.rstrip("/")
    return Path(setting).expanduser()


@dataclass(frozen=True)
class ObjectStorage:
    """Where and as whom to reach object storage; empty fields: the AWS environment."""

    endpoint: str = ""  # an S3-compatible service's URL; "": AWS itself
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, **given: str) -> ObjectStorage:
        """The given values, each empty one from the usual AWS environment variables."""
        env = os.environ
        return cls(
            endpoint=given.get("endpoint") or env.get("AWS_ENDPOINT_URL", ""),
            region=given.get("region")
            or env.get("AWS_REGION", "")
            or env.get("AWS_DEFAULT_REGION", ""),
            access_key_id=given.get("access_key_id") or env.get("AWS_ACCESS_KEY_ID", ""),
            secret_access_key=given.get("secret_access_key")
            or env.get("AWS_SECRET_ACCESS_KEY", ""),
            session_token=given.get("session_token") or env.get("AWS_SESSION_TOKEN", ""),
        )

    def lance_options(self) -> dict[str, str]:
        pairs = {
            "aws_endpoint": self.endpoint,
            "aws_region": self.region,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
            "aws_session_token": self.session_token,
        }
        options = {k: v for k, v in pairs.items() if v}
        if self.endpoint.startswith("http://"):
            options["allow_http"] = "true"
        return options

    def filesystem(self) -> Any:
        from pyarrow import fs

        kwargs: dict[str, Any] = {}
        if self.endpoint:
            kwargs["endpoint_override"] = self.endpoint
            kwargs["scheme"] = "http" if self.endpoint.startswith("http://") else "https"
        if self.region:
            kwargs["region"] = self.region
        if self.access_key_id and self.secret_access_key:
            kwargs["access_key"] = self.access_key_id
            kwargs["secret_key"] = self.secret_access_key
            if self.session_token:
                kwargs["session_token"] = self.session_token
        return fs.S3FileSystem(**kwargs)


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


def private_dir(path: Path) -> None:
    """Create `path` (and missing parents) readable by the user alone: 0700 whatever
    the umask, also when it exists already (an index made by an older version)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.name == "posix":
        try:
            os.chmod(path, 0o700)
        except OSError as exc:  # not ours to change: say so, go on
            log.warning("cannot make %s private (%s)", path, exc)


def _private_file(path: Path, flags: int) -> int:
    """A file descriptor of `path`, created or not, with mode 0600."""
    fd = os.open(path, flags | os.O_CREAT, 0o600)
    if os.name == "posix":
        os.fchmod(fd, 0o600)
    return fd


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(_private_file(tmp, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


class WriterLock:
    """An exclusive lock on the database directory: one writing process per index."""

    def __init__(self, directory: Path | str) -> None:
        # Object storage has no advisory locks: its one writer is a CI job.
        self._path = None if isinstance(directory, str) else directory / LOCK
        self._fh: Any = None

    def acquire(self) -> bool:
        if self._path is None:
            return True
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: assume one writer
            return True
        private_dir(self._path.parent)
        # Held open for the lock's lifetime.
        fh = open(_private_file(self._path, os.O_RDWR | os.O_APPEND), "a+")  # noqa: SIM115
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is not None:
            try:
                import fcntl

                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            except (ImportError, OSError):
                pass
            self._fh.close()
            self._fh = None


class ChunkStore:
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
        self.directory = directory
        self.remote = is_uri(directory)
        self.storage = storage or (ObjectStorage.from_env() if self.remote else None)
        self.fingerprint = {"schema": SCHEMA_VERSION, **fingerprint, "dim": vector_dim}
        self.vector_dim = vector_dim
        self.read_only = read_only
        self.rebuilt = False  # set when open() had to drop an unusable table
        self._db: Any = None
        self._table: Any = None
        self._has_fts = False
        self._has_vector_index = False
        self._has_scalar = False
        self._vector_partitions = 0  # of the IVF index (0: none, searches are flat)
        self.probe_fraction = VECTOR_PROBE_FRACTION
        self._gather_ok = True  # see search_both
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
        meta = self._read_meta()
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

    def _read_meta(self) -> dict[str, Any] | None:
        try:
            if isinstance(self.directory, Path):
                text = (self.directory / META).read_text()
            else:
                text = self._remote_read(META)
            data = json.loads(text)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _remote_path(self, name: str) -> str:
        return f"{str(self.directory).removeprefix('s3://')}/{name}"

    def _remote_read(self, name: str) -> str:
        assert self.storage is not None
        with self.storage.filesystem().open_input_stream(self._remote_path(name)) as f:
            return bytes(f.read()).decode("utf-8")

    def meta_value(self, key: str) -> Any:
        """A value kept in ``meta.json`` beside the fingerprint (None if absent)."""
        return self._meta.get(key)

    def set_meta_value(self, key: str, value: Any) -> None:
        """Keep `value` in ``meta.json`` (the writer only)."""
        self._meta = {**self._meta, key: value}
        self._write_meta(self._meta)

    def _write_meta(self, data: Mapping[str, Any]) -> None:
        if isinstance(self.directory, Path):
            _write_json_atomic(self.directory / META, data)
            return
        assert self.storage is not None
        text = json.dumps(data, indent=2, sort_keys=True).encode("utf-8")
        with self.storage.filesystem().open_output_stream(self._remote_path(META)) as f:
            f.write(text)

    @staticmethod
    def _validate(table: Any) -> None:
        table.count_rows()
        table.search().select(["id", "path", "file_hash"]).limit(1).to_arrow()
        table.list_indices()

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
        self._has_fts = self._has_vector_index = self._has_scalar = False
        self._refresh_index_state(warm=False)
        self.ensure_indexes()

    def _index_problem(self, index: Any) -> str | None:
        """Why an index of the table cannot be used (its files are missing, a query
        through it fails), or None."""
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
                self.search_lexical(["def"], 1)
            elif columns == ["vector"] and self.vector_dim is not None:
                probe = np.zeros(self.vector_dim, dtype=np.float32)
                probe[0] = 1.0
                self._vector_query(probe, 1, 1).to_arrow()
            elif len(columns) == 1:
                self.table.search().where(f"{columns[0]} = ''").limit(1).to_arrow()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

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
        self._write_meta(self._meta)
        self._has_fts = self._has_vector_index = self._has_scalar = False

    def _refresh_index_state(self, *, warm: bool = True) -> None:
        indices = self._table.list_indices()
        columns = {tuple(i.columns): i for i in indices}
        self._has_fts = ("search_text",) in columns
        self._has_scalar = ("id",) in columns
        vec = columns.get(("vector",))
        self._has_vector_index = vec is not None
        if warm:
            self.warm()

    @property
    def table(self) -> Any:
        if self._table is None:
            raise StoreUnavailable("the index table is not open")
        return self._table

    def close(self) -> None:
        self._table = None
        self._db = None

    # --- reading state -------------------------------------------------------

    def count_rows(self, where: str | None = None) -> int:
        return int(self.table.count_rows(where) if where else self.table.count_rows())

    def file_states(self) -> dict[str, FileState]:
        """Every indexed file with the content hash, mtime and size its rows were built from."""
        data = (
            self.table.search()
            .select(["path", "file_hash", "mtime_ns", "size"])
            .limit(None)
            .to_arrow()
        )
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
        data = self.table.search().select(["path"]).limit(None).to_arrow()
        return set(data["path"].to_pylist())

    # --- writing -------------------------------------------------------------

    def _rows(self, files: Mapping[str, tuple[FileState, Sequence[Chunk]]]) -> pa.Table:
        cols: dict[str, list[Any]] = {name: [] for name in schema_for(self.vector_dim).names}
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
                if self.vector_dim is not None:
                    cols["vector"].append(None)
        return pa.Table.from_pydict(cols, schema=schema_for(self.vector_dim))

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
            rows = self._rows(group)
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

    # --- indexes -------------------------------------------------------------

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
                    probe = np.zeros(self.vector_dim, dtype=np.float32)
                    probe[0] = 1.0
                    self._vector_query(probe, 1, self._vector_partitions or None).to_arrow()
            if self._has_fts:
                self.search_lexical(["def"], 1)
        except Exception as exc:  # a cold cache is slower, nothing worse
            log.debug("warming the index caches failed: %s", exc)

    def _count_partitions(self) -> int:
        """Partitions of the IVF index now (optimize() splits and joins them), 0 if unknown."""
        assert self.vector_dim is not None
        probe = np.zeros(self.vector_dim, dtype=np.float32)
        probe[0] = 1.0
        plan = self._vector_query(probe, 1, 1).analyze_plan()
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

    # --- searching -----------------------------------------------------------

    @staticmethod
    def _hits(data: pa.Table, score_column: str) -> list[StoredChunk]:
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

    def search_lexical(self, terms: Sequence[str], limit: int) -> list[StoredChunk]:
        """BM25 over the identifier-split text; `terms` are already split and lowercase."""
        if not terms or limit <= 0:
            return []
        from lancedb.query import MatchQuery

        query = MatchQuery(" ".join(terms), "search_text")  # type: ignore[call-arg]
        data = (
            self.table.search(query, query_type="fts")
            .select([*RESULT_COLUMNS, "_score"])
            .limit(limit)
            .to_arrow()
        )
        return self._hits(data, "_score")

    def _vector_query(self, vector: np.ndarray, limit: int, nprobes: int | None) -> Any:
        query = (
            self.table.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
            .distance_type("cosine")
            .select([*RESULT_COLUMNS, "_distance"])
            .limit(limit)
        )
        return query.nprobes(nprobes) if nprobes else query

    def search_vector(self, vector: np.ndarray, limit: int) -> list[StoredChunk]:
        """Nearest chunks by cosine distance (empty for a lexical-only index)."""
        if self.vector_dim is None or limit <= 0:
            return []
        return self._hits(self._vector_query(vector, limit, self.nprobes()).to_arrow(), "_distance")

    def search_both(
        self, terms: Sequence[str], lexical_limit: int, vector: np.ndarray, vector_limit: int
    ) -> tuple[list[StoredChunk], list[StoredChunk]]:
        """`search_lexical` and `search_vector` together (a failed vector side: no rows).

        Both queries go to LanceDB's own event loop as one gather of its async
        queries. Measured on 59.5k rows on 2 cores: 18-20 ms per pair, where the
        two blocking calls took 25-26 ms one after the other and as much from two
        threads (the blocking API fetches the schema several times a query, and
        LanceDB's work did not overlap). Subclasses that search differently, and
        a LanceDB without these internals, take the blocking calls.
        """
        plain = (
            type(self).search_lexical is ChunkStore.search_lexical
            and type(self).search_vector is ChunkStore.search_vector
        )
        if plain and self._gather_ok and terms and lexical_limit > 0 and vector_limit > 0:
            try:
                return self._gathered(terms, lexical_limit, vector, vector_limit)
            except (AttributeError, ImportError, TypeError) as exc:
                self._gather_ok = False
                log.debug("async LanceDB queries unavailable (%s): blocking calls", exc)
        lexical = self.search_lexical(terms, lexical_limit)
        try:
            return lexical, self.search_vector(vector, vector_limit)
        except Exception as exc:  # vectors are a bonus: lexical still answers
            log.debug("vector search failed: %s", exc)
            return lexical, []

    def _gathered(
        self, terms: Sequence[str], lexical_limit: int, vector: np.ndarray, vector_limit: int
    ) -> tuple[list[StoredChunk], list[StoredChunk]]:
        import asyncio

        from lancedb.background_loop import LOOP
        from lancedb.query import MatchQuery

        handle = self.table._table  # the async table behind the blocking one
        lexical_query = (
            handle.query()
            .nearest_to_text(MatchQuery(" ".join(terms), "search_text"))  # type: ignore[call-arg]
            .select([*RESULT_COLUMNS, "_score"])
            .limit(lexical_limit)
        )
        vector_query = (
            handle.query()
            .nearest_to(np.asarray(vector, dtype=np.float32))
            .column("vector")
            .distance_type("cosine")
            .select([*RESULT_COLUMNS, "_distance"])
            .limit(vector_limit)
        )
        probes = self.nprobes()
        if probes:
            vector_query = vector_query.nprobes(probes)

        async def both() -> list[Any]:
            return list(
                await asyncio.gather(
                    lexical_query.to_arrow(), vector_query.to_arrow(), return_exceptions=True
                )
            )

        lexical_data, vector_data = LOOP.run(both())
        if isinstance(lexical_data, BaseException):
            raise lexical_data
        if isinstance(vector_data, BaseException):
            log.debug("vector search failed: %s", vector_data)
            return self._hits(lexical_data, "_score"), []
        return self._hits(lexical_data, "_score"), self._hits(vector_data, "_distance")
