"""Which files of a workspace are indexed, and reading them safely.

A file is indexed when it is included by the configuration, not excluded, not
ignored by any ``.gitignore`` on its way from the root (nested files count,
deeper ones override), not on the deny-list of secret files, a regular file or
a symlink that stays inside the workspace, not larger than ``maxFileBytes`` and
not binary. Deny-listed files are never opened.
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

log = logging.getLogger(__name__)

# Secret files: never read, whatever the configuration says. .gitignore syntax,
# so a pattern without a slash matches the name at any depth.
DENY_PATTERNS: tuple[str, ...] = (
    ".env*",
    "*.env",
    "*.pem",
    "*.key",
    "*.crt.key",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.kdbx",
    "*.gpg",
    "*.tfstate",
    "*.tfstate.*",
    "*.tfvars",
    "credentials*",
    "secrets.*",
    "secret.*",
    "service-account*.json",
    ".netrc",
    "_netrc",
    ".npmrc",
    ".pypirc",
    ".pgpass",
    ".git-credentials",
    ".htpasswd",
    ".dockercfg",
    ".ssh/",
    ".aws/",
    ".gnupg/",
    ".docker/",
    ".kube/",
)

# Names that are skipped before any rule is evaluated: the watcher sees every
# event under the root, including these busy trees.
ALWAYS_SKIPPED_DIRS = frozenset({".git", ".hg", ".svn", ".jj"})

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

    Not thread-safe: the index worker owns it.
    """

    def __init__(self, root: Path, config: IndexConfig) -> None:
        self.root = root.resolve()
        self._config = config
        self._include = _spec(list(config.include)) if config.include else None
        self._exclude = _spec(list(config.exclude))
        self._deny = _spec(list(DENY_PATTERNS))
        # directory (relative, "" for the root) -> its .gitignore spec, or None
        self._gitignores: dict[str, GitIgnoreSpec | None] = {}
        self._dir_ignored: dict[str, bool] = {}

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

    def plain_path(self, path: str | os.PathLike[str]) -> str:
        """A path or file:// URI as a POSIX path without a root (for name rules)."""
        return Path(os.path.normpath(self._local(path))).as_posix().lstrip("/")

    def relpath(self, path: str | os.PathLike[str]) -> str | None:
        """Workspace-relative POSIX path of `path` (a path or a file:// URI); None outside."""
        p = Path(self._local(path))
        if not p.is_absolute():
            p = self.root / p
        try:
            rel = Path(os.path.normpath(p)).relative_to(self.root)
        except ValueError:
            return None
        posix = rel.as_posix()
        return "" if posix == "." else posix

    def abspath(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    # --- rules ---------------------------------------------------------------

    def reload(self) -> None:
        """Forget cached .gitignore files (call when one changed)."""
        self._gitignores.clear()
        self._dir_ignored.clear()

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

    def _own_rules_ignore(self, rel: str, is_dir: bool) -> bool:
        """Rules for `rel` itself, assuming no parent directory is ignored."""
        parts = rel.split("/")
        name = parts[-1]
        if is_dir and name in ALWAYS_SKIPPED_DIRS:
            return True
        probe = rel + "/" if is_dir else rel
        if self._deny is not None and self._deny.check_file(probe).include:
            return True
        if self._exclude is not None and self._exclude.check_file(probe).include:
            return True
        if is_dir and (self.abspath(rel) / "pyvenv.cfg").is_file():
            return True  # a virtual environment, whatever its name
        ignored: bool | None = None
        for depth in range(len(parts)):
            spec = self._gitignore("/".join(parts[:depth]))
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
        result = self._dir_is_ignored(parent) or self._own_rules_ignore(rel_dir, is_dir=True)
        self._dir_ignored[rel_dir] = result
        return result

    def is_denied(self, rel: str) -> bool:
        """On the secret deny-list (the file itself or a directory above it)."""
        if self._deny is None:
            return False
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if self._deny.check_file("/".join(parts[:i]) + "/").include:
                return True
        return bool(self._deny.check_file(rel).include)

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

    def quick_skip(self, rel: str) -> bool:
        """A cheap test for the watcher thread: paths inside VCS directories."""
        return any(part in ALWAYS_SKIPPED_DIRS for part in rel.split("/"))

    # --- walking and reading -------------------------------------------------

    def walk(self, under: str = "") -> Iterator[str]:
        """Relative paths of the candidate files under `under` (rules applied, not read)."""
        start = self.abspath(under)
        if under and self.is_ignored(under, is_dir=True):
            return
        for dirpath, dirnames, filenames in os.walk(start, followlinks=False):
            rel_dir = self.relpath(dirpath)
            if rel_dir is None:
                continue
            prefix = rel_dir + "/" if rel_dir else ""
            kept = []
            for d in sorted(dirnames):
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    continue  # symlinked directories are not followed (cycles, escapes)
                if not self.is_ignored(prefix + d, is_dir=True):
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
        if self.is_denied(rel):
            return FileRead(rel, Verdict.DENIED)
        path = self.abspath(rel)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return FileRead(rel, Verdict.MISSING)
        except OSError:
            return FileRead(rel, Verdict.UNREADABLE)
        if stat.S_ISDIR(st.st_mode):
            return FileRead(rel, Verdict.DIRECTORY)
        if self.is_ignored(rel):
            return FileRead(rel, Verdict.IGNORED)
        if stat.S_ISLNK(st.st_mode):
            try:
                target = path.resolve(strict=True)
                target.relative_to(self.root)
            except (OSError, ValueError, RuntimeError):
                return FileRead(rel, Verdict.OUTSIDE)
            try:
                st = target.stat()
            except OSError:
                return FileRead(rel, Verdict.UNREADABLE)
        if not stat.S_ISREG(st.st_mode):
            return FileRead(rel, Verdict.NOT_REGULAR)
        if st.st_size > self._config.maxFileBytes:
            return FileRead(rel, Verdict.TOO_LARGE, size=st.st_size)
        try:
            with open(path, "rb") as fh:
                data = fh.read(self._config.maxFileBytes + 1)
        except OSError:
            return FileRead(rel, Verdict.UNREADABLE)
        if len(data) > self._config.maxFileBytes:
            return FileRead(rel, Verdict.TOO_LARGE, size=len(data))
        if b"\x00" in data[:SNIFF_BYTES]:
            return FileRead(rel, Verdict.BINARY, size=len(data))
        text = data.decode("utf-8", errors="replace")
        if len(text) > 2000 and len(text) / (text.count("\n") + 1) > MAX_AVERAGE_LINE:
            return FileRead(rel, Verdict.MINIFIED, size=len(data))
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
