"""Typing replay through `exlsp serve` over stdio: per-keystroke latency and KV reuse.

The benchmark plays an editor. It opens a real source file with a span of it
taken out, puts the cursor where the span was, and types the span back one
character at a time at a set rate. Each keystroke is what VS Code sends: an
incremental `textDocument/didChange` of one character, a `$/cancelRequest` for
the previous `textDocument/inlineCompletion` if it is still pending
(cancel-previous), then a new `textDocument/inlineCompletion`. Right after each
completion answers, `exlsp/stats` is read; its `last` figures belong to the
latest completion, so they are kept only when its `lastRequest` is the cursor of
the request just answered (a later keystroke can get in between).

One run compares, side by side, with the same file, cursor and keystrokes:

- `reuse`:   the configured backend with KV-cache reuse (the normal mode);
- `noreuse`: the same with `completion.kvReuse: false` (a fresh KV cache per
             request: every request prefills its whole prompt);
- `instant`: backend `instant`, which loads only the tokenizer and generates
             nothing: what is left is the server's own overhead per request
             (JSON-RPC, document sync, prompt build, scheduling).

The client is a small JSON-RPC client written here rather than a pygls client,
so that the client's own (de)serialization does not land in the server's
figures; latency is measured from the moment the request is written to the
server's stdin to the moment its response has been read from its stdout.

Decode speed: `exlsp/stats` has no decode time, so it is derived as
(generatedTokens - 1) / (totalMs - promptBuildMs - queueMs - ttftMs): the time
after the first token (which ttft covers) for the tokens after the first one.
The remainder includes the engine's per-token post-processing, so it is a
lower bound of the backend's own decode speed. Where stats carry `decodeMs`,
that is used instead.

Usage (CPU, the built-in tiny model):

    python -m exlsp.benchmarks.latency --name latency-cpu-tiny

The accepting typist (`python -m exlsp.benchmarks.latency accept`) types the
same kind of span but reads each answer first: when the suggestion is what
they were about to type they accept it (the whole item, running its command;
or, from 4 characters, the words that agree, reported with
`exlsp/didPartiallyAccept`) and ask again at once. It reports accepted
characters per keystroke and the wait after each accept, per backend, with
`completion.prefetch` on and off.

Results: `benchmarks/results/<name>.json` (machine, commit, date, configuration
and every variant's figures, including each request) and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exlsp.benchmarks.provenance import (
    RESULTS_DIR,
    commit_info,
    dist,
    loadavg,
    machine_info,
    now,
)

VARIANTS = ("reuse", "noreuse", "instant", "host-reuse", "host-instant")
# Variants whose model runs in a shared model host; the others run it in the server.
HOST_VARIANTS = ("host-reuse", "host-instant")
TARGET_HOST_OVERHEAD_P50_MS = 0.3  # host-instant over instant, same run
TARGET_SESSION_RSS_MB = 150.0  # each additional editor session with the host on
TARGET_WARM_FIRST_SUGGESTION_S = 1.0  # a new session's first suggestion, warm host
TARGET_PREFILL_WITHIN_LINE = 16  # median prefilled tokens per keystroke within a line
TARGET_OVERHEAD_P50_MS = 2.0  # instant backend, per request
MIN_PROMPT_TOKENS = 1000
MIN_PARTIAL_ACCEPT = 4  # the accepting typist takes part of a suggestion from this many chars


def default_file() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"


# --- a minimal JSON-RPC client over the server's stdio -------------------------------


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = int(error.get("code", 0))


@dataclass
class Response:
    received: float  # perf_counter() when the response was read
    result: Any = None
    error: RpcError | None = None


class RpcClient:
    """Content-Length framed JSON-RPC with an LSP server subprocess.

    Requests from the server (workspace/configuration, progress creation...) are
    answered with `null`; notifications are counted and warnings kept.
    """

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._next_id = 0
        self._pending: dict[int, tuple[asyncio.Future[Response], Callable[[Response], None] | None]]
        self._pending = {}
        self._reader: asyncio.Task[None] | None = None
        self.notifications: Counter[str] = Counter()
        self.messages: list[str] = []  # showMessage, and logMessage warnings/errors

    async def start(self, cmd: Sequence[str], stderr: Any, env: dict[str, str]) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
            limit=1 << 24,
        )
        self._reader = asyncio.create_task(self._read())

    def _write(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        body = json.dumps(message, separators=(",", ":")).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def notify(self, method: str, params: Any) -> None:
        self._write({"jsonrpc": "2.0", "method": method, "params": params})

    def request(
        self,
        method: str,
        params: Any,
        on_response: Callable[[Response], None] | None = None,
    ) -> tuple[int, asyncio.Future[Response]]:
        """Send a request; `on_response` runs in the reader as soon as the answer is read."""
        self._next_id += 1
        msg_id = self._next_id
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = (fut, on_response)
        self._write({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return msg_id, fut

    async def initialize(self, root: Path, options: dict[str, Any]) -> Any:
        """`initialize` with `root` as the one workspace folder, then `initialized`."""
        result = await self.call(
            "initialize",
            {
                "processId": os.getpid(),
                "clientInfo": {"name": "exlsp-latency-bench"},
                "rootUri": root.as_uri(),
                "workspaceFolders": [{"uri": root.as_uri(), "name": root.name}],
                "capabilities": _capabilities(),
                "initializationOptions": options,
            },
        )
        self.notify("initialized", {})
        return result

    async def call(self, method: str, params: Any, timeout: float = 60) -> Any:
        _, fut = self.request(method, params)
        response = await asyncio.wait_for(fut, timeout)
        if response.error is not None:
            raise response.error
        return response.result

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        stdout = self.proc.stdout
        try:
            while True:
                length = 0
                while True:
                    line = await stdout.readline()
                    if not line:
                        return
                    if line in (b"\r\n", b"\n"):
                        break
                    name, _, value = line.decode("ascii").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await stdout.readexactly(length)
                received = time.perf_counter()
                self._dispatch(json.loads(body), received)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("the server closed its output"))
            self._pending.clear()

    def _dispatch(self, msg: dict[str, Any], received: float) -> None:
        if "method" in msg:
            if "id" in msg:  # a request from the server
                self._write({"jsonrpc": "2.0", "id": msg["id"], "result": None})
                return
            method = msg["method"]
            self.notifications[method] += 1
            params = msg.get("params") or {}
            if method == "window/showMessage" or (
                method == "window/logMessage" and params.get("type", 4) <= 2
            ):
                self.messages.append(str(params.get("message", "")))
            return
        entry = self._pending.pop(msg.get("id"), None)  # type: ignore[arg-type]
        if entry is None:
            return
        fut, on_response = entry
        error = msg.get("error")
        response = Response(received, msg.get("result"), RpcError(error) if error else None)
        if on_response is not None:
            on_response(response)
        if not fut.done():
            fut.set_result(response)

    async def close(self, timeout: float = 10) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.call("shutdown", None, timeout=timeout)
            with contextlib.suppress(Exception):
                self.notify("exit", None)
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, timeout)
        return proc.returncode


# --- the replay -----------------------------------------------------------------------


@dataclass
class Keystroke:
    index: int  # -1: the request at the cursor before typing starts (cold prompt)
    char: str
    kind: str  # "line" (within a line) or "newline"
    phase: str  # "open", "typing" (at the rate, cancel-previous) or "paced"
    line: int  # cursor after the keystroke (LSP position, UTF-16 units)
    character: int
    char_index: int  # the cursor's character (code point) index, as `lastRequest` says
    request_id: int = 0
    sent: float = 0.0
    latency_ms: float | None = None
    outcome: str = "pending"  # completed, cancelled, error, timeout
    error: str | None = None
    items: int = 0
    suggestion_chars: int = 0
    stats: dict[str, Any] | None = None
    stats_note: str = ""  # why stats are missing
    round: int = 0
    future: asyncio.Future[Response] | None = field(default=None, repr=False)
    stats_future: asyncio.Future[Response] | None = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        """The per-request record kept in the results (stats trimmed to figures)."""
        s = self.stats or {}
        keep = (
            "source",
            "promptTokens",
            "reusedTokens",
            "prefilledTokens",
            "generatedTokens",
            "ttftMs",
            "totalMs",
            "promptBuildMs",
            "queueMs",
            "decodeMs",
            "stopReason",
            "multiline",
            "snippetTokens",
        )
        out = {
            "i": self.index,
            "char": self.char,
            "kind": self.kind,
            "phase": self.phase,
            "outcome": self.outcome,
            "latencyMs": _round(self.latency_ms),
        }
        out.update({k: _round(s[k]) for k in keep if k in s})
        if self.stats_note:
            out["statsNote"] = self.stats_note
        if self.round:
            out["round"] = self.round
        return out


def _round(value: Any, digits: int = 3) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _model_dir(init_options: dict[str, Any]) -> Path:
    path = (init_options.get("model") or {}).get("path") or ""
    if path:
        return Path(path).expanduser()
    from exlsp.benchmarks.build_model import default_model_dir

    return default_model_dir()


def _token_counter(model_dir: Path) -> Callable[[str], int]:
    """Token counts with the model's own tokenizer (a character estimate without one)."""
    tok_file = model_dir / "tokenizer.json"
    if tok_file.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        return lambda text: len(tok.encode(text, add_special_tokens=False).ids)
    return lambda text: math.ceil(len(text) / 3.5)


_COMMENTS = ("#", "//", "/*", "*", "--", ";")


@dataclass
class ReplayPlan:
    text_before: str  # the document up to the cursor
    typed: str  # what is typed at the cursor, one character per keystroke
    text_after: str  # the rest of the document, after the cursor
    start_line: int  # 0-based line of the cursor when typing starts
    tokens_before: int

    @property
    def document(self) -> str:
        return self.text_before + self.text_after


def plan_replay(
    text: str,
    keystrokes: int,
    count_tokens: Callable[[str], int],
    min_tokens_before: int,
    start_line: int | None = None,
) -> ReplayPlan:
    """Where to type: at the start of the first line of code (not blank, not a
    comment) with at least `min_tokens_before` tokens above it, so the prefix
    window is full; or at `start_line` (0-based). The typed span is taken out of
    the document; the rest of the file stays after the cursor as the suffix.
    Lines end with "\n" only (the replay normalizes line endings)."""
    lines = re.findall(r"[^\n]*\n|[^\n]+$", text)
    if not lines:
        raise ValueError("the replay file is empty")
    offsets = [0]
    for ln in lines:
        offsets.append(offsets[-1] + len(ln))
    # The last line at which `keystrokes` characters can still be typed.
    last = max((i for i in range(len(lines)) if len(text) - offsets[i] >= keystrokes), default=0)
    if start_line is None:
        start_line = last
        used = 0  # counted line by line, as the prompt builder counts its windows
        for i in range(len(lines)):
            code = lines[i].strip() and not lines[i].lstrip().startswith(_COMMENTS)
            if used >= min_tokens_before and code and i <= last:
                start_line = i
                break
            used += count_tokens(lines[i])
    start_line = max(0, min(start_line, last))
    cut = offsets[start_line]
    typed = text[cut : cut + keystrokes]
    before = text[:cut]
    tokens_before = sum(count_tokens(ln) for ln in lines[:start_line])
    return ReplayPlan(before, typed, text[cut + len(typed) :], start_line, tokens_before)


def run_replay(
    server_cmd: list[str],
    file: Path,
    *,
    keystrokes: int,
    rate_hz: float,
    init_options: dict[str, Any],
    paced_keystrokes: int = 0,
    start_line: int | None = None,
    workspace: Path | None = None,
    ready_timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Replay typing `keystrokes` characters of `file` through the server `server_cmd`.

    Keystrokes come at `rate_hz`, each cancelling the previous request if it is
    still unanswered. Then, if `paced_keystrokes`, that many more characters are
    typed one after another, each only after the previous answer arrived (nothing
    is cancelled): the per-request cost without the survivor bias of cancel-previous
    (at a rate the model cannot keep up with, only the cheap requests complete).

    The workspace folder (what the server may index) is `workspace`, by default
    the file's folder; the server is ready (model loaded, index idle) before the
    first keystroke.

    Returns the figures of the typing (see `summarize`), those of the paced part
    under "paced", the replay's plan, the server's warnings and every request's
    record under "request_log".
    """
    records, meta = replay_records(
        server_cmd,
        file,
        keystrokes=keystrokes,
        rate_hz=rate_hz,
        init_options=init_options,
        paced_keystrokes=paced_keystrokes,
        start_line=start_line,
        workspace=workspace,
        ready_timeout_s=ready_timeout_s,
        env=env,
    )
    return replay_result(records, meta)


def replay_records(
    server_cmd: list[str],
    file: Path,
    *,
    keystrokes: int,
    rate_hz: float,
    init_options: dict[str, Any],
    paced_keystrokes: int = 0,
    start_line: int | None = None,
    workspace: Path | None = None,
    ready_timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
) -> tuple[list[Keystroke], dict[str, Any]]:
    """`run_replay`'s requests, unsummarized, and what is known about the run."""
    return asyncio.run(
        _replay(
            list(server_cmd),
            Path(file),
            keystrokes=keystrokes,
            rate_hz=rate_hz,
            init_options=init_options,
            paced_keystrokes=paced_keystrokes,
            start_line=start_line,
            workspace=Path(workspace) if workspace else None,
            ready_timeout_s=ready_timeout_s,
            env=env,
        )
    )


def _capabilities() -> dict[str, Any]:
    return {
        "general": {"positionEncodings": ["utf-16"]},
        "textDocument": {
            "synchronization": {"didSave": False},
            "inlineCompletion": {},
            "completion": {},
        },
        "workspace": {"configuration": False, "workspaceFolders": True},
    }


_INDEX_BUSY = ("created", "starting", "scanning", "updating", "embedding")


async def _wait_ready(client: RpcClient, timeout: float) -> dict[str, Any]:
    """The model loaded, and the workspace index (where the server has one) idle, so
    that indexing does not overlap the typing and every variant sees the same snippets."""
    limit = time.monotonic() + timeout
    while True:
        stats = await client.call("exlsp/stats", {})
        index = stats.get("index") or {}
        if stats.get("state") == "error" or (
            stats.get("state") == "ready" and index.get("state") not in _INDEX_BUSY
        ):
            return dict(stats)
        if time.monotonic() > limit:
            raise TimeoutError(f"the model or the index not ready in {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def _replay(
    server_cmd: list[str],
    file: Path,
    *,
    keystrokes: int,
    rate_hz: float,
    init_options: dict[str, Any],
    paced_keystrokes: int,
    start_line: int | None,
    workspace: Path | None,
    ready_timeout_s: float,
    env: dict[str, str] | None,
) -> tuple[list[Keystroke], dict[str, Any]]:
    text = file.read_text(encoding="utf-8", errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    completion = init_options.get("completion") or {}
    prefix_budget = int(completion.get("prefixTokens", 1024))
    count = _token_counter(_model_dir(init_options))
    plan = plan_replay(text, keystrokes + paced_keystrokes, count, prefix_budget, start_line)
    deadline_s = float(completion.get("deadlineMs", 2000)) / 1000

    server_env = dict(os.environ if env is None else env)
    server_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    client = RpcClient()
    with tempfile.TemporaryFile(mode="w+b") as stderr:
        await client.start(server_cmd, stderr, server_env)
        try:
            root = (workspace or file.parent).resolve()
            await client.initialize(root, init_options)
            t_load = time.perf_counter()
            ready = await _wait_ready(client, ready_timeout_s)
            load_s = time.perf_counter() - t_load
            if ready["state"] != "ready":
                raise RuntimeError(f"the server could not load the model: {ready.get('error')}")
            records = await _type(client, file, plan, keystrokes, rate_hz, deadline_s)
        except BaseException:
            stderr.seek(0)
            tail = stderr.read()[-4000:].decode("utf-8", "replace")
            sys.stderr.write(f"exlsp server stderr (tail):\n{tail}\n")
            raise
        finally:
            returncode = await client.close()

    meta: dict[str, Any] = {}
    meta["plan"] = {
        "file": str(file),
        "start_line": plan.start_line + 1,
        "tokens_before_cursor": plan.tokens_before,
        "document_chars": len(plan.document),
        "keystrokes": min(keystrokes, len(plan.typed)),
        "newline_keystrokes": plan.typed[:keystrokes].count("\n"),
        "paced_keystrokes": max(0, len(plan.typed) - keystrokes),
        "rate_hz": rate_hz,
        "typed": plan.typed,
    }
    meta["server"] = {
        "model": ready.get("model"),
        "fim_template": ready.get("fimTemplate"),
        "workspace": str(root),
        "index": ready.get("index"),
        "load_s": round(load_s, 2),
        "notifications": dict(client.notifications),
        "messages": client.messages[:20],
        "exit_code": returncode,
    }
    return records, meta


def replay_result(records: Sequence[Keystroke], meta: dict[str, Any]) -> dict[str, Any]:
    """The figures of one replay (or of several pooled: see `--rounds`)."""
    result = summarize([r for r in records if r.phase == "typing"])
    paced = [r for r in records if r.phase == "paced"]
    if paced:
        result["paced"] = summarize(paced)
    opening = [r for r in records if r.phase == "open"]
    if opening:
        result["first_request"] = opening[0].row()
    result.update(meta)
    result["request_log"] = [r.row() for r in records]
    return result


async def _type(
    client: RpcClient,
    file: Path,
    plan: ReplayPlan,
    typing: int,
    rate_hz: float,
    deadline_s: float,
) -> list[Keystroke]:
    uri = file.resolve().as_uri()
    language = "python" if file.suffix in (".py", ".pyi") else file.suffix.lstrip(".")
    version = 1
    client.notify(
        "textDocument/didOpen",
        {"textDocument": {"uri": uri, "languageId": language, "version": 1, "text": plan.document}},
    )
    line = plan.start_line
    before_lines = plan.text_before.split("\n")
    col_text = before_lines[-1] if plan.text_before else ""  # the cursor line, left of it
    records: list[Keystroke] = []
    pending: list[Keystroke] = []

    def send(rec: Keystroke) -> None:
        def on_response(response: Response) -> None:
            rec.latency_ms = (response.received - rec.sent) * 1000
            if response.error is not None:
                rec.outcome = "cancelled" if response.error.code == -32800 else "error"
                rec.error = str(response.error)
                return
            rec.outcome = "completed"
            items = (response.result or {}).get("items") or []
            rec.items = len(items)
            rec.suggestion_chars = len(items[0].get("insertText", "")) if items else 0
            # Ask at once: `last` is the latest completion's, and this one is it
            # unless a later keystroke's request gets in before this one.
            _, rec.stats_future = client.request("exlsp/stats", {})

        params = {
            "textDocument": {"uri": uri},
            "position": {"line": rec.line, "character": rec.character},
            "context": {"triggerKind": 2},  # automatic
        }
        rec.sent = time.perf_counter()
        rec.request_id, rec.future = client.request(
            "textDocument/inlineCompletion", params, on_response
        )
        records.append(rec)
        pending.append(rec)

    # The request at the cursor before typing (as when the editor focuses the file):
    # its prompt is cold; it is reported apart from the keystrokes.
    send(Keystroke(-1, "", "open", "open", line, _utf16_len(col_text), len(col_text)))
    await _settle(records, timeout=deadline_s + 30)
    pending.clear()

    interval = 1.0 / rate_hz
    t0 = time.perf_counter() + 0.2
    for i, ch in enumerate(plan.typed):
        phase = "typing" if i < typing else "paced"
        if phase == "paced":
            # After the answer (and its stats) to the previous keystroke, one interval.
            await _settle(records, timeout=deadline_s + 30)
            await asyncio.sleep(interval)
        else:
            delay = t0 + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        start = {"line": line, "character": _utf16_len(col_text)}
        version += 1
        client.notify(
            "textDocument/didChange",
            {
                "textDocument": {"uri": uri, "version": version},
                "contentChanges": [{"range": {"start": start, "end": start}, "text": ch}],
            },
        )
        if ch == "\n":
            line, col_text, kind = line + 1, "", "newline"
        else:
            col_text += ch
            kind = "line"
        # Cancel-previous: only a request still unanswered is cancelled.
        for rec in pending:
            if rec.outcome == "pending":
                client.notify("$/cancelRequest", {"id": rec.request_id})
        pending.clear()
        send(Keystroke(i, ch, kind, phase, line, _utf16_len(col_text), len(col_text)))
    await _settle(records, timeout=deadline_s + 30)
    return records


async def _settle(records: list[Keystroke], timeout: float) -> None:
    """Wait for every answer and every stats reply; match the stats to their request."""
    limit = time.perf_counter() + timeout
    waiting = [r.future for r in records if r.outcome == "pending" and r.future is not None]
    if waiting:
        await asyncio.wait(waiting, timeout=timeout)
    for r in records:
        if r.outcome == "pending":
            r.outcome = "timeout"
    for r in records:
        if r.outcome != "completed" or r.stats is not None or r.stats_note:
            continue
        if r.stats_future is None:
            r.stats_note = "no stats request"
            continue
        try:
            reply = await asyncio.wait_for(r.stats_future, max(0.1, limit - time.perf_counter()))
        except (TimeoutError, ConnectionError) as e:
            r.stats_note = f"stats failed: {e!r}"
            continue
        payload = reply.result or {}
        where = payload.get("lastRequest") or {}
        if (where.get("line"), where.get("character")) != (r.line, r.char_index):
            r.stats_note = "superseded"  # a later request's stats
            continue
        r.stats = dict(payload.get("last") or {})


# --- figures ------------------------------------------------------------------------


def _decode_ms(s: dict[str, Any]) -> float | None:
    if s.get("decodeMs"):
        return float(s["decodeMs"])
    if s.get("ttftMs") is None:
        return None
    rest = s["totalMs"] - s.get("promptBuildMs", 0.0) - s.get("queueMs", 0.0) - s["ttftMs"]
    return rest if rest > 0 else None


def summarize(records: Sequence[Keystroke]) -> dict[str, Any]:
    """The figures of one replay (the keystroke requests, not the opening request)."""
    done = [r for r in records if r.outcome == "completed"]
    with_stats = [r for r in done if r.stats]
    model = [r for r in with_stats if r.stats and r.stats.get("source") == "model"]

    def reuse(rs: Sequence[Keystroke], kind: str) -> dict[str, Any]:
        sel = [r.stats for r in rs if r.kind == kind and r.stats]
        return {
            "n": len(sel),
            "reused": dist([s.get("reusedTokens") for s in sel]),
            "prefilled": dist([s.get("prefilledTokens") for s in sel]),
        }

    decode_tokens = 0
    decode_ms = 0.0
    per_request_tps: list[float] = []
    for r in model:
        s = r.stats or {}
        ms = _decode_ms(s)
        n = int(s.get("generatedTokens") or 0) - 1
        if ms is None or n < 1:
            continue
        decode_tokens += n
        decode_ms += ms
        per_request_tps.append(n / ms * 1000)

    latencies = [r.latency_ms for r in done]
    server_ms = [r.stats.get("totalMs") for r in with_stats if r.stats]
    outside = [
        r.latency_ms - r.stats["totalMs"]
        for r in with_stats
        if r.stats and r.latency_ms is not None and r.stats.get("totalMs") is not None
    ]
    return {
        "requests": {
            "sent": len(records),
            "completed": len(done),
            "cancelled": sum(r.outcome == "cancelled" for r in records),
            "errors": sum(r.outcome in ("error", "timeout") for r in records),
            "with_stats": len(with_stats),
            "stats_superseded": sum(r.stats_note == "superseded" for r in done),
            "with_suggestion": sum(r.items > 0 for r in done),
        },
        "latency_ms": dist(latencies),
        "latency_ms_by_kind": {
            kind: dist([r.latency_ms for r in done if r.kind == kind])
            for kind in ("line", "newline")
        },
        "ttft_ms": dist([r.stats.get("ttftMs") for r in model if r.stats]),
        "prompt_tokens": dist([r.stats.get("promptTokens") for r in with_stats if r.stats]),
        "snippet_tokens": dist([r.stats.get("snippetTokens") for r in with_stats if r.stats]),
        # Every answered keystroke (type-ahead and attached ones cost no prefill).
        "kv_all": {"line": reuse(with_stats, "line"), "newline": reuse(with_stats, "newline")},
        # Keystrokes that ran the model (a new generation).
        "kv_model": {"line": reuse(model, "line"), "newline": reuse(model, "newline")},
        "decode": {
            "tokens": decode_tokens,
            "ms": _round(decode_ms),
            "tok_s": _round(decode_tokens / decode_ms * 1000 if decode_ms else None, 1),
            "tok_s_per_request": dist(per_request_tps),
            "method": "(generatedTokens-1) / (totalMs - promptBuildMs - queueMs - ttftMs)",
        },
        "generated_tokens": dist([r.stats.get("generatedTokens") for r in model if r.stats]),
        "sources": dict(Counter(str(r.stats.get("source")) for r in with_stats if r.stats)),
        "stop_reasons": dict(
            Counter(str(r.stats.get("stopReason")) for r in with_stats if r.stats)
        ),
        # Inside the engine, and what the request costs outside it (JSON-RPC, pygls,
        # document sync, position conversion, the response).
        "engine": {
            "engine_total_ms": dist(server_ms),
            "prompt_build_ms": dist([r.stats.get("promptBuildMs") for r in with_stats if r.stats]),
            "queue_ms": dist([r.stats.get("queueMs") for r in model if r.stats]),
            "outside_engine_ms": dist(outside),
        },
    }


# --- editor sessions on one model host ----------------------------------------------------


def _rss_mb(pid: int) -> float | None:
    from exlsp.completion.host.server import process_rss

    rss = process_rss(pid)
    return None if rss is None else round(rss / 2**20, 1)


def _maps_torch(pid: int) -> bool | None:
    """Whether torch's library is mapped in the process (Linux)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


async def _session(
    server_cmd: list[str], file: Path, options: dict[str, Any], env: dict[str, str]
) -> tuple[RpcClient, dict[str, Any]]:
    """Start one editor session: its server, the file open, completions until the model
    answers one; the time from `initialize` to that first suggestion."""
    client = RpcClient()
    await client.start(server_cmd, asyncio.subprocess.DEVNULL, env)
    t0 = time.perf_counter()
    root = file.parent.resolve()
    await client.initialize(root, options)
    text = file.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    line = min(len(lines) - 1, 40)
    uri = file.resolve().as_uri()
    client.notify(
        "textDocument/didOpen",
        {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}},
    )
    params = {
        "textDocument": {"uri": uri},
        "position": {"line": line, "character": len(lines[line])},
        "context": {"triggerKind": 2},
    }
    limit = time.monotonic() + 600
    while True:
        await client.call("textDocument/inlineCompletion", params, timeout=60)
        last = (await client.call("exlsp/stats", {})).get("last") or {}
        if last.get("source") == "model":
            break
        if time.monotonic() > limit:
            raise TimeoutError("no suggestion from the model")
        await asyncio.sleep(0.01)
    first_s = time.perf_counter() - t0
    assert client.proc is not None
    row: dict[str, Any] = {"first_suggestion_s": round(first_s, 3), "pid": client.proc.pid}
    if (options.get("index") or {}).get("enabled", True):
        # The index on: measured once it holds vectors (its embedding model loaded,
        # in the server or in the host).
        while True:
            index = (await client.call("exlsp/stats", {})).get("index") or {}
            if index.get("chunks_with_vectors"):
                break
            if time.monotonic() > limit:
                raise TimeoutError(f"the index has no vectors: {index}")
            await asyncio.sleep(0.2)
        row["index_vectors_s"] = round(time.perf_counter() - t0, 3)
        row["index_state"] = index.get("state")
    return client, row


async def _sessions(
    server_cmd: list[str],
    file: Path,
    options: dict[str, Any],
    count: int,
    host_env: dict[str, str],
    inproc_env: dict[str, str],
) -> dict[str, Any]:
    """`count` editor sessions on one model host: each server's RSS (and whether it
    maps torch), the host's, each session's first suggestion after its initialize;
    then one session with the model in-process, for comparison."""
    from exlsp.completion.host import control

    clients: list[RpcClient] = []
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(count):
            warm = any(
                h["model"]["backend"] == options["model"]["backend"]
                for h in control.running_hosts()
            )
            client, row = await _session(server_cmd, file, options, host_env)
            clients.append(client)
            row["host_warm"] = warm
            rows.append(row)
        await asyncio.sleep(1.0)
        for row in rows:
            row["rss_mb"] = _rss_mb(row["pid"])
            row["maps_torch"] = _maps_torch(row["pid"])
        hosts = control.running_hosts()
        host = next((h for h in hosts if h["model"]["backend"] == options["model"]["backend"]), {})
    finally:
        for client in clients:
            await client.close()
    inproc, row = await _session(server_cmd, file, options, inproc_env)
    row["rss_mb"] = _rss_mb(row["pid"])
    row["maps_torch"] = _maps_torch(row["pid"])
    await inproc.close()
    extra = [r["rss_mb"] for r in rows[1:] if r["rss_mb"] is not None]
    warm = [r["first_suggestion_s"] for r in rows if r["host_warm"]]
    return {
        "sessions": rows,
        "host": {
            "pid": host.get("pid"),
            "rss_mb": round(host["rssBytes"] / 2**20, 1) if host.get("rssBytes") else None,
            "loads": host.get("loads"),
            "sessions": len(host.get("sessions") or []),
            "slots_bytes": host.get("slots"),
            "embedders": host.get("embedders"),
        },
        "in_process": row,
        "additional_session_rss_mb_max": max(extra) if extra else None,
        "warm_first_suggestion_s_max": max(warm) if warm else None,
    }


def session_targets(sessions: dict[str, Any]) -> dict[str, Any]:
    rss = sessions.get("additional_session_rss_mb_max")
    warm = sessions.get("warm_first_suggestion_s_max")
    torch_free = not any(r.get("maps_torch") for r in sessions.get("sessions", []))
    return {
        "additional_session_rss_mb": {
            "target": f"<= {TARGET_SESSION_RSS_MB} and no model memory",
            "value": rss,
            "no_torch_in_servers": torch_free,
            "met": rss is not None and rss <= TARGET_SESSION_RSS_MB and torch_free,
        },
        "warm_host_first_suggestion_s": {
            "target": f"<= {TARGET_WARM_FIRST_SUGGESTION_S}",
            "value": warm,
            "met": warm is not None and warm <= TARGET_WARM_FIRST_SUGGESTION_S,
        },
    }


# --- the command line -----------------------------------------------------------------


def variant_options(base: dict[str, Any], variant: str) -> dict[str, Any]:
    options = copy.deepcopy(base)
    if variant == "noreuse":
        options["completion"]["kvReuse"] = False
    elif variant in ("instant", "host-instant"):
        options["model"]["backend"] = "instant"
    elif variant not in ("reuse", "host-reuse"):
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    return options


def effective_config(init_options: dict[str, Any]) -> dict[str, Any]:
    """The server's whole configuration tree for these initializationOptions."""
    from exlsp.server.config import Config, merge, to_wire

    config, errors = merge(Config(), init_options)
    out = to_wire(config)
    if errors:
        out["_errors"] = errors
    return out


def _server_knows(section: str) -> bool:
    from exlsp.server.config import Config

    return hasattr(Config(), section)


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("opening request (cold): latency ms", ("first_request", "latencyMs")),
    ("opening request (cold): ttft ms", ("first_request", "ttftMs")),
    ("requests answered / sent", ()),
    ("latency p50 ms", ("latency_ms", "p50")),
    ("latency p95 ms", ("latency_ms", "p95")),
    ("latency p50 ms, each round", ("rounds",)),
    ("latency p50 ms, newline keys", ("latency_ms_by_kind", "newline", "p50")),
    ("ttft p50 ms", ("ttft_ms", "p50")),
    ("ttft p95 ms", ("ttft_ms", "p95")),
    ("prompt tokens p50", ("prompt_tokens", "p50")),
    ("prompt tokens min", ("prompt_tokens", "min")),
    ("  of them snippet tokens p50", ("snippet_tokens", "p50")),
    ("in-line key, model: prefilled p50", ("kv_model", "line", "prefilled", "p50")),
    ("in-line key, model: prefilled p95", ("kv_model", "line", "prefilled", "p95")),
    ("in-line key, model: reused p50", ("kv_model", "line", "reused", "p50")),
    ("in-line key, all: prefilled p50", ("kv_all", "line", "prefilled", "p50")),
    ("newline key, model: prefilled p50", ("kv_model", "newline", "prefilled", "p50")),
    ("newline key, model: prefilled p95", ("kv_model", "newline", "prefilled", "p95")),
    ("newline key, model: reused p50", ("kv_model", "newline", "reused", "p50")),
    ("decode tok/s", ("decode", "tok_s")),
    ("engine total p50 ms", ("engine", "engine_total_ms", "p50")),
    ("prompt build p50 ms", ("engine", "prompt_build_ms", "p50")),
    ("queue p50 ms", ("engine", "queue_ms", "p50")),
    ("outside engine p50 ms", ("engine", "outside_engine_ms", "p50")),
    ("sources m/t/a/e", ()),
    ("paced: answered / sent", ("paced",)),
    ("paced: latency p50 ms", ("paced", "latency_ms", "p50")),
    ("paced: latency p95 ms", ("paced", "latency_ms", "p95")),
    ("paced: ttft p50 ms", ("paced", "ttft_ms", "p50")),
    ("paced: ttft p95 ms", ("paced", "ttft_ms", "p95")),
    ("paced: in-line, model: prefilled p50", ("paced", "kv_model", "line", "prefilled", "p50")),
    ("paced: in-line, model: reused p50", ("paced", "kv_model", "line", "reused", "p50")),
    ("paced: newline, model: prefilled p50", ("paced", "kv_model", "newline", "prefilled", "p50")),
    ("paced: decode tok/s", ("paced", "decode", "tok_s")),
    ("paced: sources m/t/a/e", ("paced",)),
]


def _cell(result: dict[str, Any], label: str, path: tuple[str, ...]) -> tuple[str, float | None]:
    if "error" in result:
        return "failed", None
    if path[:1] == ("paced",):
        if "paced" not in result:
            return "-", None
        result, path = result["paced"], path[1:]
    if path == ("rounds",):
        p50s = [r.get("latency_ms_p50") for r in result.get("rounds", [])]
        return "/".join("-" if v is None else f"{v:.1f}" for v in p50s) or "-", None
    if "answered / sent" in label:
        r = result["requests"]
        return f"{r['completed']}/{r['sent']}", None
    if "sources" in label:
        s = result.get("sources", {})
        return "/".join(
            str(s.get(k, 0)) for k in ("model", "type-ahead", "attached", "empty")
        ), None
    v = _get(result, *path)
    if v is None:
        return "-", None
    return (f"{v:.2f}" if isinstance(v, float) and abs(v) < 100 else f"{v:.0f}"), float(v)


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    ratios = []
    if "reuse" in results and "noreuse" in results:
        ratios.append(("noreuse/reuse", "noreuse", "reuse"))
    if "reuse" in results and "instant" in results:
        ratios.append(("instant/reuse", "instant", "reuse"))
    header = ["", *names, *(r[0] for r in ratios)]
    rows = [header]
    for label, path in ROWS:
        cells = {n: _cell(results[n], label, path) for n in names}
        row = [label, *(cells[n][0] for n in names)]
        for _, a, b in ratios:
            va, vb = cells[a][1], cells[b][1]
            row.append(f"{va / vb:.2f}" if va is not None and vb else "")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _without_log(result: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in result.items() if k != "requests_list"}
    if isinstance(out.get("plan"), dict):
        out["plan"] = {k: v for k, v in out["plan"].items() if k != "typed"}  # once, on top
    return out


def results_json(out: dict[str, Any]) -> str:
    """Indented JSON, except the per-request records: one line each."""
    head = {k: v for k, v in out.items() if k != "requests"}
    text = json.dumps(head, indent=1)
    logs = out.get("requests") or {}
    if not logs:
        return text + "\n"
    parts = []
    for variant, rows in logs.items():
        body = ",\n".join("   " + json.dumps(row) for row in rows)
        parts.append(f"  {json.dumps(variant)}: [\n{body}\n  ]")
    text = (
        text[: text.rindex("}")].rstrip() + ',\n "requests": {\n' + ",\n".join(parts) + "\n }\n}\n"
    )
    assert json.loads(text) == json.loads(json.dumps(out))
    return text


def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    prefill = _get(results.get("reuse", {}), "kv_model", "line", "prefilled", "p50")
    out["prefilled_within_line_p50"] = {
        "target": f"<= {TARGET_PREFILL_WITHIN_LINE}",
        "value": prefill,
        "value_all_keystrokes": _get(
            results.get("reuse", {}), "kv_all", "line", "prefilled", "p50"
        ),
        "met": prefill is not None and prefill <= TARGET_PREFILL_WITHIN_LINE,
    }
    overhead = _get(results.get("instant", {}), "latency_ms", "p50")
    out["server_overhead_p50_ms"] = {
        "target": f"<= {TARGET_OVERHEAD_P50_MS}",
        "value": overhead,
        "met": overhead is not None and overhead <= TARGET_OVERHEAD_P50_MS,
    }
    host = _get(results.get("host-instant", {}), "latency_ms", "p50")
    if host is not None and overhead is not None:
        out["host_overhead_p50_ms"] = {
            "target": f"<= {TARGET_HOST_OVERHEAD_P50_MS} (host-instant - instant)",
            "value": round(host - overhead, 3),
            "met": host - overhead <= TARGET_HOST_OVERHEAD_P50_MS,
        }
    prompt = [
        _get(r, "prompt_tokens", "p50") for r in results.values() if _get(r, "prompt_tokens", "p50")
    ]
    out["prompt_tokens_p50_at_least_1000"] = {
        "value": min(prompt) if prompt else None,
        "met": bool(prompt) and min(prompt) >= MIN_PROMPT_TOKENS,
    }
    return out


# --- the accepting typist ---------------------------------------------------------------


@dataclass
class AcceptStep:
    typed: int  # characters of the span in the document before this step
    latency_ms: float  # the inline request's answer time
    after_accept: bool  # the request came right after an accept
    suggestion_chars: int
    accepted_chars: int  # what this step's accept took (0: the typist typed on)
    source: str = ""  # the engine's `last.source` for this request


def accept_length(suggestion: str, upcoming: str) -> int:
    """What the typist takes from `suggestion` when `upcoming` is what they were about to
    type: all of it when it matches, else the words it agrees on (0: type on)."""
    from exlsp.benchmarks.repo_eval import chars_accepted

    take = chars_accepted(suggestion, upcoming)
    # A word or two of punctuation is quicker typed than accepted.
    return take if take == len(suggestion) or take >= MIN_PARTIAL_ACCEPT else 0


async def _accepting(
    client: RpcClient, file: Path, plan: ReplayPlan, keystrokes: int, deadline_s: float
) -> list[AcceptStep]:
    """Type the span; after each answer, accept what matches the text still to type.

    The typist reads each answer before the next keystroke (no cancel-previous): an
    accept inserts the item (its `insertText` over its `range`, as the editor does),
    runs the item's command, and asks for the next suggestion at once; that
    request's time is the wait after the accept.
    """
    uri = file.resolve().as_uri()
    language = "python" if file.suffix in (".py", ".pyi") else file.suffix.lstrip(".")
    client.notify(
        "textDocument/didOpen",
        {"textDocument": {"uri": uri, "languageId": language, "version": 1, "text": plan.document}},
    )
    version = 1
    span = plan.typed
    done = 0  # characters of the span in the document
    typed_keys = 0
    steps: list[AcceptStep] = []
    after_accept = False

    def cursor() -> dict[str, int]:
        text = plan.text_before + span[:done]
        last = text.rsplit("\n", 1)[-1]
        return {"line": text.count("\n"), "character": _utf16_len(last)}

    def edit(rng: dict[str, Any], text: str) -> None:
        nonlocal version
        version += 1
        client.notify(
            "textDocument/didChange",
            {
                "textDocument": {"uri": uri, "version": version},
                "contentChanges": [{"range": rng, "text": text}],
            },
        )

    while done < len(span) and typed_keys < keystrokes:
        t = time.perf_counter()
        params = {"textDocument": {"uri": uri}, "position": cursor(), "context": {"triggerKind": 2}}
        result = await client.call("textDocument/inlineCompletion", params, timeout=deadline_s + 30)
        latency = (time.perf_counter() - t) * 1000
        stats = await client.call("exlsp/stats", {})
        items = (result or {}).get("items") or []
        item = items[0] if items else None
        suggestion = ""
        if item is not None:
            # The item replaces the typed word: what it adds starts after the word.
            left = (plan.text_before + span[:done]).rsplit("\n", 1)[-1]
            word = re.search(r"[\w$]*$", left)
            insert = item.get("insertText", "")
            typed_word = word.group(0) if word else ""
            suggestion = insert[len(typed_word) :] if insert.startswith(typed_word) else ""
        upcoming = span[done:]
        take = accept_length(suggestion, upcoming) if suggestion else 0
        steps.append(
            AcceptStep(
                done,
                latency,
                after_accept,
                len(suggestion),
                take,
                (stats.get("last") or {}).get("source", ""),
            )
        )
        if take and item is not None:
            # Accept: the whole item when it all matches, else the agreeing words.
            if take == len(suggestion):
                edit(item["range"], item["insertText"])
                command = item.get("command")
                if command:
                    await client.call(
                        "workspace/executeCommand",
                        {"command": command["command"], "arguments": command.get("arguments")},
                    )
            else:
                at = cursor()
                edit({"start": at, "end": at}, suggestion[:take])
                if item.get("command"):
                    client.notify(
                        "exlsp/didPartiallyAccept",
                        {
                            "id": item["command"]["arguments"][0],
                            "acceptedLength": len(item["insertText"]) - len(suggestion) + take,
                            "kind": "word",
                        },
                    )
            done += take
            after_accept = True
            continue
        # Type one character.
        at = cursor()
        edit({"start": at, "end": at}, span[done])
        done += 1
        typed_keys += 1
        after_accept = False
    return steps


def accept_summary(steps: Sequence[AcceptStep]) -> dict[str, Any]:
    keys = sum(1 for s in steps if s.accepted_chars == 0)
    accepted = sum(s.accepted_chars for s in steps)
    accepts = [s for s in steps if s.accepted_chars]
    waits = [s.latency_ms for s in steps if s.after_accept]
    return {
        "keystrokes": keys,
        "accepts": len(accepts),
        "accepted_chars": accepted,
        "accepted_chars_per_keystroke": round(accepted / keys, 3) if keys else None,
        "span_chars": (steps[-1].typed + max(1, steps[-1].accepted_chars)) if steps else 0,
        "wait_after_accept_ms": dist(waits),
        "latency_ms": dist([s.latency_ms for s in steps]),
        "sources_after_accept": dict(Counter(s.source for s in steps if s.after_accept)),
    }


async def _accept_run(
    server_cmd: list[str],
    file: Path,
    keystrokes: int,
    init_options: dict[str, Any],
    start_line: int | None,
) -> dict[str, Any]:
    text = file.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    completion = init_options.get("completion") or {}
    count = _token_counter(_model_dir(init_options))
    plan = plan_replay(
        text, keystrokes, count, int(completion.get("prefixTokens", 1024)), start_line
    )
    deadline_s = float(completion.get("deadlineMs", 2000)) / 1000
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    client = RpcClient()
    with tempfile.TemporaryFile(mode="w+b") as stderr:
        await client.start(server_cmd, stderr, env)
        try:
            root = file.parent.resolve()
            await client.initialize(root, init_options)
            ready = await _wait_ready(client, 600)
            if ready["state"] != "ready":
                raise RuntimeError(f"the server could not load the model: {ready.get('error')}")
            steps = await _accepting(client, file, plan, keystrokes, deadline_s)
        finally:
            await client.close()
    out = accept_summary(steps)
    out["plan"] = {"file": str(file), "start_line": plan.start_line + 1, "span": plan.typed}
    out["steps"] = [
        {
            "typed": s.typed,
            "latencyMs": round(s.latency_ms, 2),
            "afterAccept": s.after_accept,
            "suggestionChars": s.suggestion_chars,
            "acceptedChars": s.accepted_chars,
            "source": s.source,
        }
        for s in steps
    ]
    return out


def main_accept(argv: Sequence[str]) -> int:
    """The accepting typist: backends x prefetch on/off, side by side, one results file."""
    p = argparse.ArgumentParser(prog="python -m exlsp.benchmarks.latency accept")
    p.add_argument("--file", type=Path, default=None)
    p.add_argument("--model", default="")
    p.add_argument("--backends", default="instant,transformers")
    p.add_argument("--keystrokes", type=int, default=300)
    p.add_argument("--start-line", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--name", default="latency-accept")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    model = args.model
    if not model:
        from exlsp.benchmarks.build_model import default_model_dir

        model = str(default_model_dir())
    scratch = Path(tempfile.mkdtemp(prefix="exlsp-accept-"))
    file = Path(
        shutil.copy(args.file or default_file(), scratch / (args.file or default_file()).name)
    )
    server_cmd = [sys.executable, "-m", "exlsp.server", "serve"]
    results: dict[str, Any] = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        for prefetch in (True, False):
            options = {
                "model": {"path": model, "backend": backend, "device": "cpu", "threads": 1},
                "completion": {
                    "maxTokens": args.max_tokens,
                    "maxTokensSingleLine": args.max_tokens,
                    "prefetch": prefetch,
                    "acceptanceStats": False,
                },
                "index": {"enabled": False},
            }
            label = f"{backend}/prefetch-{'on' if prefetch else 'off'}"
            start = args.start_line - 1 if args.start_line else None
            results[label] = asyncio.run(
                _accept_run(server_cmd, file, args.keystrokes, options, start)
            )
    rows = [
        f"{'variant':<28} {'keys':>5} {'accepts':>7} {'acc/key':>7} {'wait p50':>9} {'wait p95':>9}"
    ]
    for label, r in results.items():
        w = r["wait_after_accept_ms"]
        rows.append(
            f"{label:<28} {r['keystrokes']:>5} {r['accepts']:>7} "
            f"{r['accepted_chars_per_keystroke'] or 0:>7.3f} "
            f"{w.get('p50') or 0:>9.1f} {w.get('p95') or 0:>9.1f}"
        )
    print("\n".join(rows))
    payload = {
        "benchmark": "latency-accept",
        "command": "python -m exlsp.benchmarks.latency accept " + " ".join(argv),
        "date": now(),
        "commit": commit_info(),
        "machine": machine_info(),
        "model": model,
        "results": results,
    }
    from exlsp.benchmarks.provenance import write_results

    write_results(args.results_dir / f"{args.name}.json", payload)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["accept"]:
        return main_accept(args_in[1:])
    p = argparse.ArgumentParser(
        prog="python -m exlsp.benchmarks.latency",
        description="Replay typing through `exlsp serve` and measure per-keystroke latency.",
    )
    p.add_argument("--file", type=Path, default=None, help="source file to replay (textwrap.py)")
    p.add_argument("--model", default="", help="model directory (default: the built-in model)")
    p.add_argument("--backend", default="transformers", help="transformers, exllamav2, openai")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of the transformers backend (0: torch's default, all cores)",
    )
    p.add_argument("--keystrokes", type=int, default=200)
    p.add_argument(
        "--paced",
        type=int,
        default=40,
        help="keystrokes typed after the replay, each after the previous answer",
    )
    p.add_argument("--rate", type=float, default=10.0, help="keystrokes per second")
    p.add_argument("--variants", default=",".join(VARIANTS), help="reuse,noreuse,instant")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="replay every variant this many times (order rotated), figures pooled",
    )
    p.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request, max")
    p.add_argument("--deadline-ms", type=int, default=2000)
    p.add_argument("--prefix-tokens", type=int, default=1280)
    p.add_argument("--suffix-tokens", type=int, default=256)
    p.add_argument("--start-line", type=int, default=None, help="1-based line to type at")
    p.add_argument(
        "--workspace",
        type=Path,
        default=None,
        help="workspace folder the server may index (default: a temporary folder holding "
        "only a copy of the file)",
    )
    p.add_argument("--no-index", action="store_true", help="switch the workspace index off")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="SECTION.KEY=JSON",
        help="another initialization option for every variant, e.g. completion.streamPartial=false",
    )
    p.add_argument(
        "--sessions",
        type=int,
        default=0,
        help="then start this many editor sessions on one model host (RSS, first suggestion)",
    )
    p.add_argument(
        "--sessions-index",
        action="store_true",
        help="with --sessions: the workspace index on in each session (its embedding model "
        "in the host, or in the server for the in-process session), measured once it has vectors",
    )
    p.add_argument("--name", default="latency", help="results/<name>.json")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "--server", default=f"{sys.executable} -m exlsp.server serve", help="server command"
    )
    args = p.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; one of {', '.join(VARIANTS)}")
    model = args.model
    if not model:
        from exlsp.benchmarks.build_model import default_model_dir

        model = str(default_model_dir())  # built here, before any server starts
    file = args.file or default_file()
    base: dict[str, Any] = {
        "model": {
            "path": model,
            "backend": args.backend,
            "device": args.device,
            "threads": args.threads,
        },
        "completion": {
            "prefixTokens": args.prefix_tokens,
            "suffixTokens": args.suffix_tokens,
            "maxTokens": args.max_tokens,
            "maxTokensSingleLine": args.max_tokens,
            "deadlineMs": args.deadline_ms,
            "kvReuse": True,
        },
    }
    for option in args.option:
        key, sep, value = option.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and section and name):
            p.error(f"--option {option!r}: expected SECTION.KEY=JSON")
        try:
            base.setdefault(section, {})[name] = json.loads(value)
        except ValueError:
            base.setdefault(section, {})[name] = value  # a bare string
    server_cmd = args.server.split()
    start_line = args.start_line - 1 if args.start_line else None
    scratch: Path | None = None
    source_file = file
    workspace: Path = args.workspace or file.parent
    if args.workspace is None:
        # Not the file's own folder (for the default file, the whole standard library).
        scratch = Path(tempfile.mkdtemp(prefix="exlsp-latency-"))
        workspace = scratch / "workspace"
        workspace.mkdir()
        file = Path(shutil.copy(file, workspace / file.name))
    if _server_knows("index"):
        if args.no_index:
            base.setdefault("index", {})["enabled"] = False
        elif scratch is not None:
            base.setdefault("index", {}).setdefault("databaseDir", str(scratch / "index-db"))
    # Host variants get a model host of their own (not the user's), stopped at the end;
    # the others run the model in the server.
    runtime = Path(tempfile.mkdtemp(prefix="exlsp-host-"))
    os.environ["EXLSP_RUNTIME_DIR"] = str(runtime)  # for `control` in this process
    host_env = {**os.environ, "EXLSP_MODEL_HOST": "auto"}
    inproc_env = {**os.environ, "EXLSP_MODEL_HOST": "off"}
    results: dict[str, dict[str, Any]] = {}
    sessions: dict[str, Any] | None = None
    configs: dict[str, Any] = {}
    machine = machine_info()
    machine["loadavg_before"] = machine.pop("loadavg")
    pooled: dict[str, list[Keystroke]] = {v: [] for v in variants}
    metas: dict[str, dict[str, Any]] = {}
    per_round: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    errors: dict[str, str] = {}
    wall: Counter[str] = Counter()
    try:
        for round_no in range(1, args.rounds + 1):
            # Rounds rotate the order, so a burst of load on a shared machine does not
            # always land on the same variant; the figures pool every round's requests.
            shift = (round_no - 1) % len(variants)
            for v in variants[shift:] + variants[:shift]:
                if v in errors:
                    continue
                options = variant_options(base, v)
                configs[v] = {
                    "initializationOptions": options,
                    "effective": effective_config(options),
                }
                label = f"[{v}{f' round {round_no}' if args.rounds > 1 else ''}]"
                print(
                    f"{label} replaying {args.keystrokes} keystrokes at {args.rate}/s ...",
                    flush=True,
                )
                t0 = time.perf_counter()
                try:
                    records, meta = replay_records(
                        server_cmd,
                        file,
                        keystrokes=args.keystrokes,
                        rate_hz=args.rate,
                        init_options=options,
                        paced_keystrokes=args.paced,
                        start_line=start_line,
                        workspace=workspace,
                        env=host_env if v in HOST_VARIANTS else inproc_env,
                    )
                except Exception as e:
                    errors[v] = f"{type(e).__name__}: {e}"
                    print(f"{label} failed: {errors[v]}", flush=True)
                    continue
                wall[v] += time.perf_counter() - t0
                if args.rounds > 1:
                    for r in records:
                        r.round = round_no
                pooled[v] += records
                metas.setdefault(v, meta)
                typing = summarize([r for r in records if r.phase == "typing"])
                per_round[v].append(
                    {
                        "round": round_no,
                        "loadavg": loadavg(),
                        "latency_ms_p50": _get(typing, "latency_ms", "p50"),
                        "ttft_ms_p50": _get(typing, "ttft_ms", "p50"),
                        "engine_total_ms_p50": _get(typing, "engine", "engine_total_ms", "p50"),
                    }
                )
                print(f"{label} done in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.sessions:
            print(f"[sessions] {args.sessions} editor sessions on one model host ...", flush=True)
            # The index off unless asked: it and its embedding model change the RSS.
            session_options = variant_options(base, "reuse")
            session_options.setdefault("index", {})["enabled"] = bool(args.sessions_index)
            sessions = asyncio.run(
                _sessions(
                    server_cmd,
                    file,
                    session_options,
                    args.sessions,
                    host_env,
                    inproc_env,
                )
            )
    finally:
        from exlsp.completion.host import control

        control.stop_hosts()
        shutil.rmtree(runtime, ignore_errors=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    for v in variants:
        if v in errors:
            results[v] = {"error": errors[v]}
            continue
        r = replay_result(pooled[v], metas[v])
        r["requests_list"] = r.pop("request_log", [])
        r["rounds"] = per_round[v]
        r["wall_s"] = round(wall[v], 1)
        results[v] = r

    plan = next((r.get("plan") for r in results.values() if r.get("plan")), None)
    machine["loadavg_after"] = loadavg()
    out = {
        "benchmark": "latency",
        "date": now(),
        "machine": machine,
        "commit": commit_info(),
        "command": " ".join(["python -m exlsp.benchmarks.latency", *(argv or sys.argv[1:])]),
        "replay": {
            "source_file": str(source_file),
            **{k: v for k, v in (plan or {}).items() if k != "typed"},
        },
        "typed": (plan or {}).get("typed"),
        "config": configs,
        "targets": {**targets(results), **(session_targets(sessions) if sessions else {})},
        "sessions": sessions,
        "variants": {v: _without_log(r) for v, r in results.items()},
        "requests": {v: r.get("requests_list", []) for v, r in results.items()},
    }
    text = table(results)
    print()
    if plan:
        print(
            f"{Path(plan['file']).name}: typing {plan['keystrokes']} characters "
            f"({plan['newline_keystrokes']} newlines) at line {plan['start_line']}, "
            f"{plan['tokens_before_cursor']} tokens above, {plan['rate_hz']}/s with "
            f"cancel-previous, then {plan['paced_keystrokes']} paced; {args.rounds} round(s); "
            f"backend "
            f"{args.backend} on {args.device}, {args.threads} thread(s); "
            f"load average {machine['loadavg_before']} -> {machine['loadavg_after']}"
        )
    print(text)
    print(
        "m/t/a/e: model / type-ahead / attached / empty. Decode tok/s: "
        "(generatedTokens-1) / (totalMs - promptBuildMs - queueMs - ttftMs)."
    )
    print()
    for name, t in out["targets"].items():
        print(f"target {name}: {t.get('target', '')} value={t['value']} met={t['met']}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{args.name}.json"
    path.write_text(results_json(out), encoding="utf-8")
    print(f"\nwritten {path}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
