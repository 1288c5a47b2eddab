"""The `exlsp` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from exlsp.server.config import Config, level_number, merge

log = logging.getLogger("exlsp")

LANGUAGES = {
    ".py": "python",
    ".pyi": "python",
    ".ts": "typescript",
    ".tsx": "typescriptreact",
    ".js": "javascript",
    ".jsx": "javascriptreact",
    ".mjs": "javascript",
    ".go": "go",
    ".rs": "rust",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".java": "java",
    ".rb": "ruby",
    ".lua": "lua",
    ".sh": "shellscript",
    ".cs": "csharp",
    ".kt": "kotlin",
    ".swift": "swift",
    ".php": "php",
    ".scala": "scala",
}


def _version() -> str:
    from exlsp.server.lsp import __version__

    return __version__


def setup_logging(level: str, file: str | None) -> None:
    root = logging.getLogger("exlsp")
    root.setLevel(level_number(level))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    # stderr never carries protocol traffic (stdio uses stdout), so it is safe to log there.
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler()
    handler.setFormatter(fmt)
    root.addHandler(handler)


def load_config(path: str | None) -> Config:
    config = Config()
    if path:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        config, errors = merge(config, data)
        for e in errors:
            print(f"exlsp: {path}: {e}", file=sys.stderr)
    return config


# -- serve -------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from exlsp.server.lsp import build_server

    server = build_server()
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        server.start_tcp(host or "127.0.0.1", int(port))
        return 0
    server.start_io()
    # The model and the index were closed at `shutdown`. What is left is the
    # interpreter's teardown of torch and transformers, 2-3 s here: long enough
    # for editors to kill the process (VS Code waits 2 s). Skip it.
    logging.shutdown()
    with contextlib.suppress(ValueError, OSError):  # pygls closes stdout at `exit`
        sys.stdout.flush()
    os._exit(server.exit_code)


# -- complete ----------------------------------------------------------------------


def _parse_location(spec: str) -> tuple[Path, int, int]:
    try:
        file, line, col = spec.rsplit(":", 2)
        return Path(file), int(line), int(col)
    except ValueError:
        raise SystemExit(f"exlsp complete: expected FILE:LINE:COL, got {spec!r}") from None


async def _complete_once(config: Config, path: Path, line: int, col: int) -> dict[str, Any]:
    from exlsp.completion.service import CompletionService
    from exlsp.completion.types import CompletionRequest, DocumentView, Trigger
    from exlsp.server.documents import line_body, split_lines

    text = path.read_text(encoding="utf-8", errors="replace")
    lines = split_lines(text)
    if not 1 <= line <= len(lines):
        raise SystemExit(f"exlsp complete: line {line} is outside {path} (1-{len(lines)})")
    body = line_body(lines[line - 1])
    if not 1 <= col <= len(body) + 1:
        raise SystemExit(f"exlsp complete: column {col} is outside line {line} (1-{len(body) + 1})")
    service = CompletionService(config.engine())
    await service.start()
    try:
        if service.state != "ready":
            raise SystemExit(f"exlsp complete: the model could not be loaded: {service.error}")
        view = DocumentView(
            uri=path.resolve().as_uri(),
            lines=lines,
            line=line - 1,
            character=col - 1,
            language=LANGUAGES.get(path.suffix, path.suffix.lstrip(".")),
            path=str(path),
        )
        result = await service.complete(CompletionRequest(view, Trigger.INVOKED))
        backend = service.backend
        return {
            "suggestion": result.suggestions[0].text if result.suggestions else "",
            "stats": dataclasses.asdict(result.stats),
            "model": dataclasses.asdict(backend.info) if backend else None,
            "error": result.error,
        }
    finally:
        service.close()


def cmd_complete(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.model:
        config.model.path = args.model
    if args.backend:
        config.model.backend = args.backend
    path, line, col = _parse_location(args.location)
    if not path.is_file():
        raise SystemExit(f"exlsp complete: no such file: {path}")
    out = asyncio.run(_complete_once(config, path, line, col))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(out["suggestion"])
    return 0


# -- doctor, index, search ----------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from exlsp.server.doctor import run_doctor

    config = load_config(args.config)
    if args.model:
        config.model.path = args.model
    if args.backend:
        config.model.backend = args.backend
    return run_doctor(config.model)


def cmd_index(args: argparse.Namespace) -> int:
    from exlsp.index.cli import run_index

    return run_index(Path(args.path), load_config(args.config).index)


def cmd_search(args: argparse.Namespace) -> int:
    from exlsp.index.cli import run_search

    return run_search(Path(args.path), args.query, load_config(args.config).index, args.limit)


# -- stats ------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    from exlsp.completion.acceptance import format_totals, load, stats_path, to_wire

    path = stats_path()
    totals = load(path)
    if args.json:
        print(json.dumps({"path": str(path), **to_wire(totals)}, indent=2))
    else:
        print(f"{path}\n{format_totals(totals)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from exlsp.benchmarks.repo_eval import run_eval, table

    root = Path(args.path)
    if not (root / ".git").exists():
        raise SystemExit(f"exlsp eval: not a git repository: {root}")
    result = run_eval(root, args.model or [""], args.tasks, args.seed, LANGUAGES, args.backend)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="exlsp", description="AI code completions for any LSP editor from a local model."
    )
    parser.add_argument("--version", action="version", version=f"exlsp {_version()}")
    levels = ["debug", "info", "warning", "error", "critical"]
    parser.add_argument("--log-file", help="write the log to this file (default: stderr)")
    # Default: info for `serve` (its log is the editor's), quiet for the one-shot
    # commands, whose output is on stdout and whose failures exit with the reason.
    parser.add_argument("--log-level", default=None, choices=levels)
    # The same options after the subcommand (`exlsp serve --log-level debug`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-file", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=levels, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the language server (stdio by default)")
    p.add_argument("--tcp", metavar="[HOST:]PORT", help="listen on TCP (host 127.0.0.1)")
    p.add_argument("--stdio", action="store_true", help="use stdio (the default)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "complete", parents=[common], help="print one completion for FILE:LINE:COL (1-based)"
    )
    p.add_argument("location", metavar="FILE:LINE:COL")
    p.add_argument("--model", help="model directory (default: the built-in model)")
    p.add_argument("--backend", help="transformers, exllamav2, openai or instant")
    p.add_argument("--config", help="a JSON file with the configuration tree")
    p.add_argument("--json", action="store_true", help="print JSON with the stats")
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser(
        "doctor", parents=[common], help="check the GPU, the libraries and the model"
    )
    p.add_argument("--model", help="model directory")
    p.add_argument("--backend", help="backend to check")
    p.add_argument("--config", help="a JSON file with the configuration tree")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("index", parents=[common], help="build or update the index of PATH")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--config", help="a JSON file with the configuration tree")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", parents=[common], help="search the index of PATH")
    p.add_argument("path", metavar="PATH")
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--config", help="a JSON file with the configuration tree")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "stats", parents=[common], help="print the local counts of suggestions shown and accepted"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "eval", parents=[common], help="score models on fill-in-the-middle tasks from PATH's files"
    )
    p.add_argument("path", metavar="PATH", help="a git repository")
    p.add_argument(
        "--model", action="append", help="model directory; repeat to compare (default: built-in)"
    )
    p.add_argument("--backend", default="transformers", help="backend for every model")
    p.add_argument("--tasks", type=int, default=60, help="number of tasks (default 60)")
    p.add_argument("--seed", type=int, default=0, help="task selection seed (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON with per-task records")
    p.set_defaults(func=cmd_eval)

    args = parser.parse_args(argv)
    if args.command == "serve" and args.tcp and ":" not in args.tcp:
        args.tcp = f"127.0.0.1:{args.tcp}"
    level = args.log_level or ("info" if args.command == "serve" else "critical")
    setup_logging(level, args.log_file)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
