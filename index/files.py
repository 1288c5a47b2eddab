"""Which files of a workspace are indexed, and reading them safely.

A file is indexed when it is included by the configuration, not excluded, not
ignored by any ``.gitignore`` on its way from the root (nested files count,
deeper ones override), not a secret (`exlsp.index.secrets`: by its name in
any case, a folder's name on its way, the name it leads to through links,
and its content), a regular file that really lies inside the workspace (every
link on its way resolved), not larger than ``maxFileBytes`` (data files such as
JSON: ``maxDataFileBytes``), not binary and named in UTF-8. Files whose names
are secret are never opened; a file whose content holds a secret is read,
judged, and dropped.

What cannot be read (a folder or file without permission, a name that is not
UTF-8) is skipped with one log line and counted (`WorkspaceFiles.unreadable`);
the rest of the workspace is indexed as usual.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from pathspec import GitIgnoreSpec

from exlsp.index.config import IndexConfig
from exlsp.index.secrets import DIR_NAMES, secret_in_text, secret_name

log = logging.getLogger(__name__)

# Names that are skipped before any rule is evaluated: the watcher sees every
# event under the root, including these busy trees.
ALWAYS_SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", ".jj"})

# Data rather than code: skipped above `maxDataFileBytes` (benchmark results,
# fixtures, exported records crowd out the code in retrieval).
DATA_SUFFIXES = frozenset({".json", ".jsonl", ".ndjson", ".geojson", ".csv", ".tsv"})

SNIFF_BYTES = 8192
# Average characters per line above which a file is taken as minified or data.
MAX_AVERAGE_LINE = 400


class Verdict(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    DIRECTORY = "directory"
    OUTSIDE = "outside"  # not under the root, or a symlink that leaves it
    IGNORED = "ignored"  # include / exclude / .gitignore
    DENIED = "denied"  # secret file
    NOT_REGULAR = "not-regular"
    TOO_LARGE = "too-large"
    BINARY = "binary"
    MINIFIED = "minified"
    UNREADABLE = "unreadable"
    BAD_NAME = "bad-name"  # not UTF-8: cannot be stored


@dataclass(frozen=True)
class FileRead:
    """The outcome of reading one workspace file (`text` set only when OK)."""

    path: str
    verdict: Verdict
    text: str = ""
    content_hash: str = ""
    mtime_ns: int = 0
    size: int = 0


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def utf8_name(path: str) -> bool:
    """The name (from ``os.fsdecode``) is valid UTF-8, as the table's strings must be."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_path(path: str) -> str:
    """A path for a log line, its undecodable bytes written as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _spec(lines: list[str]) -> GitIgnoreSpec | None:
    lines = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return None
    try:
        return GitIgnoreSpec.from_lines(lines)
    except Exception as exc:  # a malformed pattern must not stop indexing
        log.warning("ignoring unparsable patterns %r: %s", lines, exc)
        return None


class WorkspaceFiles:
    """The rules that select a workspace's indexed files, and a walk over them.

    Not thread-safe: the index worker owns it, except `surely_ignored`, which
    any thread may ask.
    """

    def __init__(self, root: Path, config: IndexConfig) -> None:
        self.root = root.resolve()
        self._config = config
        self._include = _spec(list(config.include)) if config.include else None
        self._exclude = _spec(list(config.exclude))
        # directory (relative, "" for the root) -> its .gitignore spec, or None
        self._gitignores: dict[str, GitIgnoreSpec | None] = {}
        self._dir_ignored: dict[str, bool] = {}
        self._surely: dict[str, bool] = {}  # paths `surely_ignored` found ignored
        # Paths skipped because they could not be read or named -> why (logged once each).
        self.unreadable: dict[str, str] = {}

    # --- paths ---------------------------------------------------------------

    @staticmethod
    def _local(path: str | os.PathLike[str]) -> str:
        text = os.fspath(path)
        if text.startswith("file:"):
            parsed = urlparse(text)
            text = unquote(parsed.path)
            if os.name == "nt" and text.startswith("/") and len(text) > 2 and text[2] == ":":
                text = text[1:]
        return text

    def local_path(self, path: str | os.PathLike[str]) -> Path:
        """A path or file:// URI as a local path (a relative one under the root)."""
        p = Path(self._local(path))
        return p if p.is_absolute() else self.root / p

    def plain_path(self, path: str | os.PathLike[str]) -> str:
        """A path or file:// URI as a POSIX path without a root (for name rules)."""
        return Path(os.path.normpath(self._local(path))).as_posix().lstrip("/")

    def relpath(self, path: str | os.PathLike[str]) -> str | None:
        """Workspace-relative POSIX path of `path` (a path or a file:// URI); None outside.

        Lexical only: see `real_relpath` for where a path really leads."""
        p = Path(self._local(path))
        if not p.is_absolute():
            p = self.root / p
        try:
            rel = Path(os.path.normpath(p)).relative_to(self.root)
        except ValueError:
            return None
        posix = rel.as_posix()
        return "" if posix == "." else posix

    def real_relpath(self, rel: str) -> str | None:
        """Workspace-relative path of where `rel` really leads, every link on its way
        resolved (``etc_link/passwd`` with ``etc_link -> /etc``: None, outside)."""
        real = os.path.realpath(self.abspath(rel))
        root = str(self.root)
        if real == root:
            return ""
        if not real.startswith(root.rstrip(os.sep) + os.sep):
            return None
        return Path(real).relative_to(self.root).as_posix()

    def abspath(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    # --- rules ---------------------------------------------------------------

    def reload(self) -> None:
        """Forget cached .gitignore files and skipped paths (call before a full scan)."""
        self._gitignores.clear()
        self._dir_ignored.clear()
        self._surely.clear()
        self.unreadable.clear()

    def _gitignore(self, rel_dir: str) -> GitIgnoreSpec | None:
        if rel_dir in self._gitignores:
            return self._gitignores[rel_dir]
        lines: list[str] = []
        sources = [self.abspath(rel_dir) / ".gitignore"]
        if rel_dir == "":
            sources.append(self.root / ".git" / "info" / "exclude")
        for source in sources:
            try:
                if source.is_file() and not source.is_symlink():
                    lines.extend(source.read_text(encoding="utf-8", errors="replace").splitlines())
            except OSError as exc:
                log.debug("cannot read %s: %s", source, exc)
        spec = _spec(lines)
        self._gitignores[rel_dir] = spec
        return spec

    def _own_rules_ignore(self, rel: str, is_dir: bool, *, known_only: bool = False) -> bool | None:
        """Rules for `rel` itself, assuming no parent directory is ignored.

        `known_only`: without touching the file system (no .gitignore read, no
        probe); None when the answer needs it."""
        parts = rel.split("/")
        name = parts[-1]
        if is_dir and (name in ALWAYS_SKIPPED_DIRS or name.lower() in DIR_NAMES):
            return True
        if secret_name(name):
            return True
        probe = rel + "/" if is_dir else rel
        if self._exclude is not None and self._exclude.check_file(probe).include:
            return True
        if is_dir and not known_only and os.path.isfile(self.abspath(rel) / "pyvenv.cfg"):
            return True  # a virtual environment, whatever its name (isfile: no error)
        ignored: bool | None = None
        for depth in range(len(parts)):
            rel_dir = "/".join(parts[:depth])
            if known_only:
                if rel_dir not in self._gitignores:
                    return None
                spec = self._gitignores.get(rel_dir)
            else:
                spec = self._gitignore(rel_dir)
            if spec is None:
                continue
            sub = "/".join(parts[depth:]) + ("/" if is_dir else "")
            result = spec.check_file(sub).include
            if result is not None:
                ignored = result
        return bool(ignored)

    def _dir_is_ignored(self, rel_dir: str) -> bool:
        if rel_dir == "":
            return False
        cached = self._dir_ignored.get(rel_dir)
        if cached is not None:
            return cached
        parent = rel_dir.rpartition("/")[0]
        result = self._dir_is_ignored(parent) or bool(self._own_rules_ignore(rel_dir, True))
        self._dir_ignored[rel_dir] = result
        return result

    @staticmethod
    def is_denied(rel: str) -> bool:
        """A secret by name: the file, or a folder on its way (`exlsp.index.secrets`)."""
        if secret_name(rel):
            return True
        parts = rel.split("/")
        return any(secret_name("/".join(parts[:i])) for i in range(1, len(parts)))

    def is_ignored(self, rel: str, is_dir: bool = False) -> bool:
        """True when `rel` (or a directory above it) is excluded by any rule."""
        if rel == "":
            return False
        if is_dir:
            return self._dir_is_ignored(rel)
        parent = rel.rpartition("/")[0]
        if self._dir_is_ignored(parent) or self._own_rules_ignore(rel, is_dir=False):
            return True
        return self._include is not None and not self._include.check_file(rel).include

    def surely_ignored(self, rel: str) -> bool:
        """`rel` (a file or a folder) is never indexed, by what is known without the
        file system: VCS and secret folders and names, `exclude`, the .gitignore
        files already read, folders already found ignored. For the watcher's
        thread and the event loop (it reads nothing): file events under
        ``node_modules/`` or for ``*.pyc`` are dropped before they wait for a
        batch. False means "maybe": the index worker decides."""
        if not rel:
            return False
        if self._surely.get(rel) or self._dir_ignored.get(rel):
            return True
        parts = rel.split("/")
        ignored = False
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if i < len(parts):
                known = self._dir_ignored.get(sub)
                if known is None:
                    known = bool(self._own_rules_ignore(sub, True, known_only=True))
            elif parts[-1] == ".gitignore":
                known = False  # excluded from the index, yet it changes the rules
            else:
                # The last part may be a folder or a file named like one: file rules
                # (those match folders too), not `include` (a folder moved in holds
                # included files whatever its name).
                known = bool(self._own_rules_ignore(sub, False, known_only=True))
            if known:
                ignored = True
                break
        if ignored:
            if len(self._surely) >= 4096:
                self._surely.clear()
            self._surely[rel] = True
        return ignored

    # --- walking and reading -------------------------------------------------

    def _skip(self, rel: str, why: str) -> None:
        """Note a path that cannot be indexed for a reason the user may want to fix."""
        if rel not in self.unreadable:
            log.info("not indexed: %s (%s)", display_path(rel), why)
        self.unreadable[rel] = why

    def walk(self, under: str = "") -> Iterator[str]:
        """Relative paths of the candidate files under `under` (rules applied, not read).

        `under` must really lie inside the workspace (links resolved); links to
        folders are not followed; what cannot be listed or named is skipped."""
        start = self.abspath(under)
        if under and (
            not utf8_name(under)
            or self.is_ignored(under, is_dir=True)
            or self.real_relpath(under) is None
        ):
            return

        def unlistable(exc: OSError) -> None:
            name = os.fsdecode(exc.filename) if exc.filename is not None else str(start)
            self._skip(self.relpath(name) or name, exc.strerror or type(exc).__name__)

        for dirpath, dirnames, filenames in os.walk(start, onerror=unlistable, followlinks=False):
            rel_dir = self.relpath(dirpath)
            if rel_dir is None:
                continue
            prefix = rel_dir + "/" if rel_dir else ""
            kept = []
            for d in sorted(dirnames):
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    continue  # symlinked directories are not followed (cycles, escapes)
                if not utf8_name(d):
                    self._skip(prefix + d, "the name is not UTF-8")
                elif not self.is_ignored(prefix + d, is_dir=True):
                    kept.append(d)
            dirnames[:] = kept
            for f in sorted(filenames):
                rel = prefix + f
                if not self.is_ignored(rel):
                    yield rel

    def read(self, rel: str) -> FileRead:
        """Read one file if every rule allows it; the verdict says why not otherwise."""
        if not rel or rel.startswith("../"):
            return FileRead(rel, Verdict.OUTSIDE)
        if not utf8_name(rel):
            self._skip(rel, "the name is not UTF-8")
            return FileRead(rel, Verdict.BAD_NAME)
        if self.is_denied(rel):
            return FileRead(rel, Verdict.DENIED)
        # Where the path really leads: a link on the way (the file, or a folder
        # above it) may leave the workspace or point at a secret.
        real_rel = self.real_relpath(rel)
        if real_rel is None:
            return FileRead(rel, Verdict.OUTSIDE)
        if real_rel == "":
            return FileRead(rel, Verdict.DIRECTORY)
        if real_rel != rel and self.is_denied(real_rel):
            return FileRead(rel, Verdict.DENIED)
        real = self.abspath(real_rel)
        try:
            st = real.lstat()
        except FileNotFoundError:
            return FileRead(rel, Verdict.MISSING)
        except OSError as exc:
            self._skip(rel, exc.strerror or type(exc).__name__)
            return FileRead(rel, Verdict.UNREADABLE)
        if stat.S_ISDIR(st.st_mode):
            return FileRead(rel, Verdict.DIRECTORY)
        if self.is_ignored(rel):
            return FileRead(rel, Verdict.IGNORED)
        if not stat.S_ISREG(st.st_mode):  # also a link swapped in since it was resolved
            return FileRead(rel, Verdict.NOT_REGULAR)
        limit = self._config.maxFileBytes
        if self._config.maxDataFileBytes and real.suffix.lower() in DATA_SUFFIXES:
            limit = min(limit, self._config.maxDataFileBytes)
        if st.st_size > limit:
            return FileRead(rel, Verdict.TOO_LARGE, size=st.st_size)
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with open(fd, "rb") as fh:
                data = fh.read(limit + 1)
        except OSError as exc:
            self._skip(rel, exc.strerror or type(exc).__name__)
            return FileRead(rel, Verdict.UNREADABLE)
        self.unreadable.pop(rel, None)
        if len(data) > limit:
            return FileRead(rel, Verdict.TOO_LARGE, size=len(data))
        if b"\x00" in data[:SNIFF_BYTES]:
            return FileRead(rel, Verdict.BINARY, size=len(data))
        text = data.decode("utf-8", errors="replace")
        if len(text) > 2000 and len(text) / (text.count("\n") + 1) > MAX_AVERAGE_LINE:
            return FileRead(rel, Verdict.MINIFIED, size=len(data))
        secret = secret_in_text(text)
        if secret is not None:
            log.info("not indexed: %s holds %s", rel, secret)
            return FileRead(rel, Verdict.DENIED, size=len(data))
        return FileRead(
            rel,
            Verdict.OK,
            text=text,
            content_hash=content_hash(data),
            mtime_ns=st.st_mtime_ns,
            size=len(data),
        )

    def stat_key(self, rel: str) -> tuple[int, int] | None:
        """(mtime_ns, size) of a file without reading it; None if it cannot be stat'ed."""
        try:
            st = self.abspath(rel).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size
