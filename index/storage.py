"""Where an index's database lives: a local directory or object storage.

A local database directory is the user's alone (0700, whatever the umask; the
files exlsp writes itself, 0600), and one process at a time writes it
(`WriterLock`).

The database may also live on object storage (``s3://bucket/prefix``, S3 or an
S3-compatible service): LanceDB reads and writes it directly and ``meta.json``
goes through pyarrow's S3 file system. Object storage has no lock file: one
writer at a time (the CI job that builds a shared index), any number of readers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

META = "meta.json"
LOCK = "writer.lock"


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


def _remote_path(location: str, name: str) -> str:
    return f"{location.removeprefix('s3://')}/{name}"


def read_meta(location: Path | str, storage: ObjectStorage | None) -> dict[str, Any] | None:
    """``meta.json`` of the database at `location`; None if missing or unreadable."""
    try:
        if isinstance(location, Path):
            text = (location / META).read_text()
        else:
            assert storage is not None
            stream = storage.filesystem().open_input_stream(_remote_path(location, META))
            with stream as f:
                text = bytes(f.read()).decode("utf-8")
        data = json.loads(text)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_meta(
    location: Path | str, storage: ObjectStorage | None, data: Mapping[str, Any]
) -> None:
    """Replace ``meta.json`` (atomically in a local directory, 0600)."""
    text = json.dumps(data, indent=2, sort_keys=True)
    if isinstance(location, Path):
        path = location / META
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(_private_file(tmp, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
        return
    assert storage is not None
    with storage.filesystem().open_output_stream(_remote_path(location, META)) as f:
        f.write(text.encode("utf-8"))


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
