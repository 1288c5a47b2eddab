"""Memory of `exlsp serve` while documents are opened, edited and closed.

Each cycle opens a new document, types one line into it, asks for an inline
completion every tenth time and closes it; the server's RSS is read from /proc
at fixed counts. Growth per document after the first checkpoint is what stays
behind for every document an editor opens and closes (the caches' fill-up and
the index's start are in the first checkpoint). The `instant` backend builds
every prompt but generates nothing, so the model's own memory does not blur it.

    python -m exlsp.benchmarks.document_rss --documents 6000 --name document-rss-cpu
    python -m exlsp.benchmarks.document_rss --documents 6000 --index --name document-rss-index-cpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from exlsp.benchmarks import provenance

TEXT = "def f(x):\n    return x + 1\n" * 20


class Client:
    """A bare JSON-RPC client over the server's stdio."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.next_id = 0

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        header = b""
        while not header.endswith(b"\r\n\r\n"):
            header += self.proc.stdout.read(1)
        fields = dict(line.split(b": ", 1) for line in header.strip().split(b"\r\n"))
        length = int(fields[b"Content-Length"])
        return dict(json.loads(self.proc.stdout.read(length)))

    def request(self, method: str, params: dict[str, Any]) -> Any:
        self.next_id += 1
        self.send({"id": self.next_id, "method": method, "params": params})
        while True:
            message = self.read()
            if message.get("id") == self.next_id and "method" not in message:
                return message.get("result")

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0])


def run(documents: int, index: bool, workspace: Path) -> dict[str, Any]:
    client = Client([sys.executable, "-m", "exlsp.server", "serve"])
    options: dict[str, Any] = {"model": {"backend": "instant"}}
    options["index"] = (
        {"enabled": True, "embeddingModel": "none", "databaseDir": str(workspace / ".db")}
        if index
        else {"enabled": False}
    )
    init = {
        "capabilities": {"textDocument": {"inlineCompletion": {}}},
        "rootUri": workspace.as_uri(),
        "initializationOptions": options,
    }
    client.request("initialize", init)
    client.send({"method": "initialized", "params": {}})
    while client.request("exlsp/stats", {})["state"] != "ready":
        time.sleep(0.1)
    # The index's first scan (and its imports) settle before the count starts.
    limit = time.monotonic() + 120
    while index and time.monotonic() < limit:
        stats = client.request("exlsp/stats", {})["index"]
        if stats and stats["state"] in ("idle", "failed"):
            break
        time.sleep(0.2)
    marks = sorted({min(documents - 1, n) for n in (500, 1000, 2000, 4000, documents - 1)})
    rss: dict[int, int] = {}
    started = time.perf_counter()
    for k in range(documents):
        uri = (workspace / f"doc{k}.py").as_uri()
        item = {"uri": uri, "languageId": "python", "version": 1, "text": TEXT}
        client.send({"method": "textDocument/didOpen", "params": {"textDocument": item}})
        at = {"line": 1, "character": 4}
        change = {"range": {"start": at, "end": at}, "text": "y = 2\n    "}
        client.send(
            {
                "method": "textDocument/didChange",
                "params": {
                    "textDocument": {"uri": uri, "version": 2},
                    "contentChanges": [change],
                },
            }
        )
        if k % 10 == 0:
            client.request(
                "textDocument/inlineCompletion",
                {"textDocument": {"uri": uri}, "position": at, "context": {"triggerKind": 1}},
            )
        client.send({"method": "textDocument/didClose", "params": {"textDocument": {"uri": uri}}})
        if k in marks:
            client.request("exlsp/stats", {})  # every message before it is handled
            rss[k + 1] = client.rss_kb()
    seconds = time.perf_counter() - started
    client.request("shutdown", {})
    client.send({"method": "exit"})
    client.proc.wait(30)
    first, last = min(rss), max(rss)
    return {
        "documents": documents,
        "index": index,
        "rssKbAt": rss,
        "growthBytesPerDocument": round((rss[last] - rss[first]) * 1024 / (last - first), 1)
        if last > first
        else None,
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exlsp.benchmarks.document_rss")
    parser.add_argument("--documents", type=int, default=6000)
    parser.add_argument("--index", action="store_true", help="with the workspace index on")
    parser.add_argument("--name", default="document-rss")
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS_DIR)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="exlsp-rss-") as tmp:
        result = run(args.documents, args.index, Path(tmp))
    print(json.dumps(result, indent=2))
    payload = {
        "benchmark": "document_rss",
        "command": "python -m exlsp.benchmarks.document_rss "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": provenance.now(),
        "commit": provenance.commit_info(),
        "machine": provenance.machine_info(("pygls",)),
        **result,
    }
    provenance.write_results(args.results_dir / f"{args.name}.json", payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
