"""Accepted suggestions: the `exlsp.accepted` command and `exlsp/didPartiallyAccept`.

Each inline item carries the command (LSP 3.18's only acceptance hook: the
client runs it after inserting the item); the project's own clients report
partial accepts (a word, a line) with the notification. Both only count, in
the local acceptance statistics (completion/acceptance.py).
"""

from __future__ import annotations

from typing import Any

from exlsp.completion.acceptance import AcceptanceStats
from exlsp.server.lsp import ExlspServer

ACCEPTED_COMMAND = "exlsp.accepted"
PARTIAL_ACCEPT = "exlsp/didPartiallyAccept"


def acceptance(ls: ExlspServer) -> AcceptanceStats | None:
    service = ls.service
    return service.acceptance if service is not None else None


def _field(params: Any, name: str) -> Any:
    if isinstance(params, dict):
        return params.get(name)
    return getattr(params, name, None)


def register(server: ExlspServer) -> None:
    @server.command(ACCEPTED_COMMAND)
    def accepted(ls: ExlspServer, *args: Any) -> None:
        stats = acceptance(ls)
        if stats is not None and args and isinstance(args[0], str):
            stats.accepted(args[0])

    @server.feature(PARTIAL_ACCEPT)
    def partially_accepted(ls: ExlspServer, params: Any) -> None:
        stats = acceptance(ls)
        sid = _field(params, "id")
        length = _field(params, "acceptedLength")
        if (
            stats is not None
            and isinstance(sid, str)
            and isinstance(length, int)
            and not isinstance(length, bool)
        ):
            stats.partially_accepted(sid, length)
