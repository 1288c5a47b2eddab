"""Which of exlsp's files and functions one keystroke enters.

Two typing runs through `exlsp serve` (the default model, or `--backend instant`;
no index), of `--short` and `--long` in-line keystrokes (didChange, then
inlineCompletion), each with the server under a profiler that counts every
call into exlsp's own code. A function called at least once more
per extra keystroke is on the keystroke's path; the files it lives in are the
files a keystroke runs code in. Run it on two commits to compare layouts:

    python -m exlsp.benchmarks.keystroke_trace --name keystroke-trace
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from exlsp.benchmarks import provenance
from exlsp.benchmarks.latency import RpcClient, _wait_ready

_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = tuple(str(_ROOT / name) + os.sep for name in ("server", "completion", "index"))


def _serve_traced(out: str, argv: list[str]) -> None:
    """Run `exlsp serve` counting calls into exlsp's code; write them to `out` at exit."""
    counts: Counter[str] = Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            path = frame.f_code.co_filename
            if path.startswith(_PACKAGES):
                counts[f"{path[len(str(_ROOT)) + 1 :]}:{frame.f_code.co_qualname}"] += 1

    def dump() -> None:
        sys.setprofile(None)
        Path(out).write_text(json.dumps(counts))

    atexit.register(dump)
    quit_now = os._exit

    def exit_after_dump(code: int) -> None:  # `exlsp serve` ends with os._exit
        dump()
        quit_now(code)

    os._exit = exit_after_dump
    import threading

    threading.setprofile(profile)
    sys.setprofile(profile)
    from exlsp.server.cli import main

    sys.exit(main(argv))


_DOCUMENT = (
    "import os\n\n\ndef total(items):\n    s = 0\n    for x in items:\n        s += x\n"
    "    return s\n\n\n"
)
_TYPED = "print(total([1, 2, 3]) + len(os.listdir('.')))  # a line typed one key at a time"


async def _type(cmd: list[str], keystrokes: int, options: dict[str, Any]) -> None:
    """didOpen, then per keystroke: didChange and inlineCompletion, answered before the next."""
    client = RpcClient()
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile() as stderr:
        root = Path(tmp)
        uri = (root / "main.py").as_uri()
        await client.start(cmd, stderr, dict(os.environ))
        try:
            await client.initialize(root, options)
            await _wait_ready(client, 120)
            doc = {"uri": uri, "languageId": "python", "version": 1, "text": _DOCUMENT}
            client.notify("textDocument/didOpen", {"textDocument": doc})
            line = _DOCUMENT.count("\n")
            for i, ch in enumerate((_TYPED * 4)[:keystrokes]):
                at = {"line": line, "character": i}
                client.notify(
                    "textDocument/didChange",
                    {
                        "textDocument": {"uri": uri, "version": i + 2},
                        "contentChanges": [{"range": {"start": at, "end": at}, "text": ch}],
                    },
                )
                position = {"line": line, "character": i + 1}
                await client.call(
                    "textDocument/inlineCompletion",
                    {
                        "textDocument": {"uri": uri},
                        "position": position,
                        "context": {"triggerKind": 2},
                    },
                )
        finally:
            await client.close()


def _counts(keystrokes: int, options: dict[str, Any]) -> Counter[str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "counts.json"
        cmd = [sys.executable, "-m", "exlsp.benchmarks.keystroke_trace", "--serve-traced", str(out)]
        asyncio.run(_type(cmd, keystrokes, options))
        return Counter(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-traced", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=40)
    parser.add_argument("--backend", default="transformers", help="transformers or instant")
    parser.add_argument("--name", default="", help="write benchmarks/results/NAME.json")
    args, rest = parser.parse_known_args(argv)
    if args.serve_traced:
        _serve_traced(args.serve_traced, ["serve", *rest])
        return 0
    options = {
        "model": {"backend": args.backend, "host": "off"},
        "index": {"enabled": False},
        "completion": {"prefetch": False},
    }
    short, long = _counts(args.short, options), _counts(args.long, options)
    extra = args.long - args.short
    per_key = sorted(k for k in long if long[k] - short.get(k, 0) >= extra)
    files = sorted({k.split(":", 1)[0] for k in per_key})
    result = {
        "keystrokes": [args.short, args.long],
        "backend": args.backend,
        "files": files,
        "functions": per_key,
        "file_count": len(files),
        "function_count": len(per_key),
        "date": provenance.now(),
        "commit": provenance.commit_info(),
        "machine": provenance.machine_info(("pygls",)),
    }
    print(f"{len(files)} files, {len(per_key)} functions per keystroke")
    for name in files:
        print(" ", name, sum(1 for k in per_key if k.startswith(name + ":")))
    if args.name:
        print(provenance.write_results(provenance.RESULTS_DIR / f"{args.name}.json", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
