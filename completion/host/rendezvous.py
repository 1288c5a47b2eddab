"""Where a model host is found, and starting one when none runs.

A host listens on a Unix socket (mode 0600) in a folder only its user can
enter (0700): `$EXLSP_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/exlsp`, else
`exlsp-<uid>` under the temporary folder. The socket's name is a hash of the
model settings that change what is loaded, so another configuration gets a host
of its own. Servers that find no host start one under an flock on a lock file
beside the socket: two starting at the same moment end with exactly one host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exlsp.completion.config import ModelConfig

# What changes the loaded model: another value, another host.
LOAD_FIELDS = (
    "backend",
    "path",
    "device",
    "dtype",
    "contextLength",
    "cacheType",
    "maxSeqLen",
    "ngramDraft",
    "threads",
)
# How long a server waits for a host it started to listen (the host binds its
# socket before it imports the model's libraries).
START_TIMEOUT_S = 30.0


class HostError(RuntimeError):
    """No host could be reached or started; the message is for the user."""


def runtime_dir() -> Path:
    """The rendezvous folder, made 0700 when missing; refused when another user owns it."""
    env = os.environ.get("EXLSP_RUNTIME_DIR")
    if env:
        path = Path(env)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "exlsp"
    else:
        path = Path(tempfile.gettempdir()) / f"exlsp-{os.getuid()}"
    return private_dir(path)


def private_dir(path: Path) -> Path:
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise HostError(f"{path} is not a folder")
    if st.st_uid != os.getuid():
        raise HostError(f"{path} belongs to another user")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def load_key(model: ModelConfig) -> dict[str, Any]:
    """The settings that decide what a host loads, in a stable order."""
    fields = dataclasses.asdict(model)
    key = {name: fields[name] for name in LOAD_FIELDS}
    if key["path"]:
        key["path"] = str(Path(key["path"]).expanduser().resolve())
    return key


def host_name(model: ModelConfig) -> str:
    digest = hashlib.sha256(json.dumps(load_key(model), sort_keys=True).encode()).hexdigest()
    return f"h-{digest[:12]}"


@dataclasses.dataclass(frozen=True)
class HostPaths:
    socket: Path
    lock: Path
    token: Path  # a secret the clients show where peer credentials are unknown
    log: Path

    @classmethod
    def for_model(cls, model: ModelConfig) -> HostPaths:
        folder = runtime_dir()
        name = host_name(model)
        return cls(
            socket=folder / f"{name}.sock",
            lock=folder / f"{name}.lock",
            token=folder / f"{name}.token",
            log=host_log_dir() / f"{name}.log",
        )


def host_log_dir() -> Path:
    from exlsp.benchmarks.build_model import cache_dir

    path = cache_dir() / "hosts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end; None where the system cannot tell."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def read_token(paths: HostPaths) -> str:
    try:
        return paths.token.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def can_connect(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def host_command(model: ModelConfig, paths: HostPaths) -> list[str]:
    settings = {**load_key(model), "hostIdleMinutes": model.hostIdleMinutes}
    settings["hostSlots"] = model.hostSlots
    return [
        sys.executable,
        "-m",
        "exlsp.completion.host",
        "--socket",
        str(paths.socket),
        "--model",
        json.dumps(settings),
        "--detach",
    ]


def ensure_host(model: ModelConfig, paths: HostPaths) -> bool:
    """Make sure a host listens on `paths.socket`; True when this call started it.

    Blocking (a start takes up to a few seconds): call it off the event loop.
    """
    if can_connect(paths.socket):
        return False
    with _locked(paths.lock):
        if can_connect(paths.socket):
            return False  # another server started it while this one waited
        with contextlib.suppress(FileNotFoundError):
            paths.socket.unlink()  # left by a host that was killed
        with open(paths.log, "ab") as log:
            # --detach: the command forks the host into a session of its own and
            # returns, so the host outlives this server and is nobody's zombie.
            proc = subprocess.run(
                host_command(model, paths),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                close_fds=True,
                timeout=START_TIMEOUT_S,
                check=False,
            )
        if proc.returncode != 0:
            raise HostError(f"the model host did not start (see {paths.log})")
        limit = time.monotonic() + START_TIMEOUT_S
        while not can_connect(paths.socket):
            if time.monotonic() > limit:
                raise HostError(f"the model host did not start listening (see {paths.log})")
            time.sleep(0.02)
    return True
