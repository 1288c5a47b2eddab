"""Asking running model hosts for their figures, or to stop (`exlsp host`, doctor)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any

from exlsp.completion.config import ModelConfig
from exlsp.completion.host import rendezvous
from exlsp.completion.host.wire import FrameError, recv_sync, send_sync


def request(socket_path: Path, op: str, timeout: float = 10.0) -> dict[str, Any] | None:
    """One command to the host on `socket_path`; None when none listens there."""
    token = rendezvous.read_token(
        rendezvous.HostPaths(
            socket_path, socket_path, socket_path.with_suffix(".token"), socket_path
        )
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(socket_path))
            send_sync(s, {"op": op, "token": token})
            return recv_sync(s)
        except (OSError, FrameError):
            return None


def running_hosts() -> list[dict[str, Any]]:
    """The figures of every host of this user that answers (one per configuration)."""
    try:
        folder = rendezvous.runtime_dir()
    except (OSError, rendezvous.HostError):
        return []
    hosts = []
    for path in sorted(folder.glob("h-*.sock")):
        stats = request(path, "stats", timeout=5)
        if stats is not None and stats.get("op") == "stats":
            hosts.append(stats)
    return hosts


def host_for(model: ModelConfig) -> dict[str, Any] | None:
    """The figures of `model`'s host; None when it does not run."""
    with contextlib.suppress(OSError, rendezvous.HostError):
        stats = request(rendezvous.HostPaths.for_model(model).socket, "stats", timeout=5)
        if stats is not None and stats.get("op") == "stats":
            return stats
    return None


def stop_hosts(model: ModelConfig | None = None) -> list[int]:
    """Stop `model`'s host, or every host of this user; the pids that were told to."""
    try:
        folder = rendezvous.runtime_dir()
    except (OSError, rendezvous.HostError):
        return []
    paths = (
        [rendezvous.HostPaths.for_model(model).socket]
        if model is not None
        else sorted(folder.glob("h-*.sock"))
    )
    stopped = []
    for path in paths:
        answer = request(path, "stop", timeout=5)
        if answer is not None and answer.get("op") == "stopping":
            stopped.append(int(answer["pid"]))
    return stopped


def describe(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """A host's rows for `exlsp host status` and `exlsp doctor`."""
    model = stats.get("model") or {}
    where = f" on {model.get('device')}" if model.get("device") not in (None, "auto") else ""
    rows = [
        ("host", f"pid {stats.get('pid')}, {stats.get('state')}, up {stats.get('uptimeS')} s"),
        ("host model", f"{model.get('backend')} {model.get('path') or 'built-in model'}{where}"),
        ("host socket", str(stats.get("socket"))),
        ("host memory", _memory(stats)),
        (
            "host sessions",
            ", ".join(f"pid {s['pid']} ({s['requests']} {_what(s)})" for s in stats["sessions"])
            or "none connected",
        ),
        ("host loads", f"{stats.get('loads')} model load(s), {stats.get('requests')} requests"),
    ]
    embedders = stats.get("embedders") or []
    if embedders:
        names = ", ".join(f"{e['name']} ({e['dim']} dims, {e['device']})" for e in embedders)
        rows.append(("host embeddings", f"{names}; {stats.get('embeddedTexts')} texts embedded"))
    if stats.get("error"):
        rows.append(("host error", str(stats["error"])))
    return rows


def _what(session: dict[str, Any]) -> str:
    return "embedding requests" if session.get("role") == "embed" else "requests"


def _memory(stats: dict[str, Any]) -> str:
    parts = [f"RSS {_mib(stats.get('rssBytes'))}"]
    if stats.get("vramBytes"):
        parts.append(f"VRAM {_mib(stats['vramBytes'])}")
    slots = stats.get("slots") or {}
    if slots:
        kv = sum(slots.values())
        parts.append(f"KV cache {_mib(kv)} in {len(slots)} slot(s)")
    return ", ".join(parts)


def _mib(n: Any) -> str:
    return "unknown" if n is None else f"{n / 2**20:.1f} MiB"
