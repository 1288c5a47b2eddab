"""The `exlsp` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from exlsp.completion.languages import EXTENSIONS
from exlsp.server.config import LOG_FORMAT, Config, level_number, merge

log = logging.getLogger("exlsp")

# File extension -> LSP language id, from the one language table.
LANGUAGES = EXTENSIONS


def _version() -> str:
    from exlsp.server.lsp import __version__

    return __version__


def setup_logging(level: str, file: str | None, serve: bool = False) -> None:
    root = logging.getLogger("exlsp")
    root.setLevel(level_number(level))
    fmt = logging.Formatter(LOG_FORMAT)
    if file:
        handler: logging.Handler = logging.FileHandler(file, encoding="utf-8")
        handler.setFormatter(fmt)
        root.addHandler(handler)
    if file and not serve:
        return
    # Editors file a server's stderr as errors: `serve` writes only warnings and
    # errors there; its info lines go to the client (window/logMessage) and the
    # log file. (stderr never carries protocol traffic: stdio uses stdout.)
    stderr = logging.StreamHandler()
    stderr.setFormatter(fmt)
    if serve:
        stderr.setLevel(logging.WARNING)
    root.addHandler(stderr)


def config_layers(path: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The settings below the defaults, lowest first: the user file, then `--config`."""
    from exlsp.server.user_config import UserConfigError, read_user_config, user_config_path

    layers: list[tuple[str, dict[str, Any]]] = []
    try:
        layers.append((f"user file {user_config_path()}", read_user_config()))
    except UserConfigError as e:
        print(f"exlsp: the user configuration file is ignored: {e}", file=sys.stderr)
    if path:
        layers.append((f"--config {path}", json.loads(Path(path).read_text(encoding="utf-8"))))
    return layers


def load_config(path: str | None) -> Config:
    """Defaults < the user configuration file < the `--config` file."""
    config = Config()
    for origin, data in config_layers(path):
        config, errors = merge(config, data)
        for e in errors:
            print(f"exlsp: {origin}: {e}", file=sys.stderr)
    return config


# -- serve -------------------------------------------------------------------------


def _tcp_address(spec: str, listen_any: bool) -> tuple[str, int]:
    """[HOST:]PORT; a host that is not loopback only with --listen-any (and a warning):
    whoever connects reads the code around the cursor and the suggestions."""
    host, _, port = spec.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise SystemExit(f"exlsp serve: --tcp takes [HOST:]PORT, got {spec!r}") from None
    loopback = host == "localhost"
    with contextlib.suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    if not loopback:
        if not listen_any:
            raise SystemExit(
                f"exlsp serve: {host} is not a loopback address; exlsp listens on 127.0.0.1"
                " unless you add --listen-any (anyone who can connect sees your code)"
            )
        print(
            f"exlsp: warning: listening on {host}:{number} without authentication: anyone who"
            " can reach this port can read your code and suggestions (one client at a time)",
            file=sys.stderr,
        )
    return host, number


def cmd_serve(args: argparse.Namespace) -> int:
    from exlsp.server.lsp import build_server

    server = build_server()
    server.log_file_from_command_line = bool(args.log_file)
    if args.tcp:
        host, port = _tcp_address(args.tcp, args.listen_any)
        server.start_tcp(host, port)
    else:
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
            language=LANGUAGES.get(path.suffix.lower(), path.suffix.lstrip(".")),
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
    # The backend could not answer (a remote server is down): not an empty suggestion.
    failed = bool(out["error"]) and out["stats"]["source"] == "error"
    if args.json:
        print(json.dumps(out, indent=2))
    elif not failed:
        print(out["suggestion"])
    if failed:
        print(f"exlsp complete: {out['error']}", file=sys.stderr)
        return 1
    return 0


# -- doctor, index, search ----------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from exlsp.server.doctor import run_doctor

    config = load_config(args.config)
    if args.model:
        config.model.path = args.model
    if args.backend:
        config.model.backend = args.backend
    return run_doctor(config.model, assist=config.assist.model_config())


def cmd_host(args: argparse.Namespace) -> int:
    """`exlsp host status|stop`: the model hosts this user runs (one per configuration)."""
    from exlsp.completion.host import control

    if args.action == "stop":
        model = None
        if not args.all:
            config = load_config(args.config)
            model = config.model
        stopped = control.stop_hosts(model)
        print(
            f"stopped the model host(s): {', '.join(f'pid {p}' for p in stopped)}"
            if stopped
            else "no model host was running"
        )
        return 0
    hosts = control.running_hosts()
    if args.json:
        print(json.dumps(hosts, indent=2))
        return 0
    if not hosts:
        print("no model host is running")
        return 0
    for n, stats in enumerate(hosts):
        if n:
            print()
        rows = control.describe(stats)
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"{label.ljust(width)}  {value}")
    if len(hosts) > 1:
        print(f"\n{len(hosts)} hosts: each model configuration has its own")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from exlsp.index.cli import run_index

    return run_index(Path(args.path), load_config(args.config).index)


def cmd_search(args: argparse.Namespace) -> int:
    from exlsp.index.cli import run_search

    return run_search(Path(args.path), args.query, load_config(args.config).index, args.limit)


# -- models, pull, config -----------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def cmd_models(args: argparse.Namespace) -> int:
    from exlsp.completion import models

    config = load_config(args.config)
    if args.free_gib is not None:
        free, where = int(args.free_gib * 2**30), "given (--free-gib)"
        cpu = args.backend == "transformers" and args.cpu
    else:
        free, where = models.available_memory(config.model.device)
        cpu = where == "RAM"
    backend = args.backend or ("transformers" if cpu else "exllamav2")
    max_seq_len = args.max_seq_len or config.model.maxSeqLen
    cache_type = args.cache_type or config.model.cacheType
    fits = models.size_all(
        free,
        backend,
        max_seq_len=max_seq_len,
        cache_type=cache_type,
        second_cache=not args.no_second_cache,
        cpu=cpu,
    )
    best = models.recommend(fits)
    by_name: dict[str, list[models.Fit]] = {}
    for f in fits:
        by_name.setdefault(f.variant.model.name, []).append(f)
    if args.json:
        out = {
            "free": free,
            "where": where,
            "backend": backend,
            "maxSeqLen": max_seq_len,
            "cacheType": cache_type,
            "models": [
                {
                    **dataclasses.asdict(m),
                    "variants": [
                        {
                            "backend": f.variant.backend,
                            "repo": f.variant.repo,
                            "revision": f.variant.revision,
                            "bpw": f.variant.bpw,
                            "bytes": f.estimate.total,
                            "fits": f.fits,
                        }
                        for f in by_name.get(m.name, [])
                    ],
                }
                for m in models.catalogue()
            ],
            "recommended": _pull_command(best) if best else None,
        }
        print(json.dumps(out, indent=2))
        return 0
    spare = int(models.HEADROOM * 100)
    print(
        f"{backend} backend; {_gib(free)} free ({where}); maxSeqLen {max_seq_len}, "
        f"cache {cache_type if backend in ('exllamav2', 'exllamav3') else 'unquantized'}"
        + (
            ""
            if args.no_second_cache or backend == "exllamav3"  # one paged cache serves all
            else " (x2: hover/actions get their own)"
        )
        + f", {_gib(models.WORKING_BYTES)} working memory, {spare} % kept spare"
    )
    print()
    table: list[tuple[str, ...]] = [
        ("MODEL", "PARAMS", "CONTEXT", "LICENCE", "FIM", "VARIANT", "REPOSITORY", "NEEDS", "FITS")
    ]
    notes: dict[int, list[str]] = {}
    for m in models.catalogue():
        facts = (m.name, f"{m.parameters / 1e9:.2f}B", str(m.context), m.licence, m.fim_template)
        rows = by_name.get(m.name, [])
        for i, f in enumerate(rows):
            v = f.variant
            mark = ("yes" if f.fits else "no") + ("  <- recommended" if best is f else "")
            lead = facts if i == 0 else ("",) * len(facts)
            table.append((*lead, v.kind, v.source, _gib(f.estimate.total), mark))
        if args.sources:
            notes[len(table) - 1] = [f"source: {src}" for src in m.sources]
            if m.gguf:
                notes[len(table) - 1].append(f"GGUF (llama.cpp server): {', '.join(m.gguf)}")
            if m.unverified:
                notes[len(table) - 1].append(f"unverified: {', '.join(m.unverified)}")
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {1, 2, 7}
    for n, row in enumerate(table):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        for note in notes.get(n, []):
            print(f"    {note}")
    print()
    if best is None:
        print("nothing in the catalogue fits; lower maxSeqLen or cacheType, or use a smaller GPU")
        print("model through the openai backend (README: Running for a team)")
    else:
        print(f"recommended: {_pull_command(best)}")
        companion = best.variant.model.instruct
        if companion is not None:
            print(
                f"for explanations and refactors: exlsp pull --assist {best.variant.model.name}"
                f" ({companion}; same size again)"
            )
    if not args.sources:
        print("(`exlsp models --sources` lists where each fact comes from, and GGUF repositories)")
    return 0


def _pull_command(fit: Any) -> str:
    v = fit.variant
    bits = f" --bits {v.bpw:g}" if v.exl2 else ""
    if v.converted:
        return (
            f"exlsp pull {v.model.name}, then convert it: python -m "
            f"exllamav3.conversion.convert_model -i DIR -o DIR-exl3 -w WORK -b {v.bpw:g}"
        )
    return f"exlsp pull {v.model.name}{bits}"


def cmd_pull(args: argparse.Namespace) -> int:
    from exlsp.server.pull import PullError, pull
    from exlsp.server.user_config import user_config_path

    try:
        result = pull(args.model, args.bits, configure=not args.no_configure, assist=args.assist)
    except PullError as e:
        print(f"exlsp pull: {e}", file=sys.stderr)
        return 1
    print(f"downloaded   {result.repo}@{result.revision} ({result.commit[:12]})")
    print(f"into         {result.path} ({_gib(result.size_bytes)})")
    print(f"weights      {result.quantization}")
    if result.fim_template is None:
        print("FIM template none (a chat model: explanations and refactors)")
    else:
        print(f"FIM template {result.fim_template} (detected from the tokenizer)")
    if args.no_configure:
        print("configured   nothing (--no-configure)")
    else:
        where = user_config_path()
        section = result.role
        print(f"configured   {section}.path and {section}.backend = {result.backend!r} in {where}")
    return 0


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


def cmd_config(args: argparse.Namespace) -> int:
    from exlsp.server.config import _SECRETS, to_wire
    from exlsp.server.user_config import user_config_path

    config = Config()
    sources = dict.fromkeys(_leaves(to_wire(config)), "default")
    for origin, data in config_layers(args.config):
        config, errors = merge(config, data)
        for e in errors:
            print(f"exlsp: {origin}: {e}", file=sys.stderr)
        bad = {e.split(":", 1)[0] for e in errors}
        for path in _leaves(data):
            if path in sources and path not in bad:
                sources[path] = origin
    values = _leaves(to_wire(config))
    secret = {f"{a}.{b}" for a, b in _SECRETS}
    for path in secret:
        if values.get(path):
            values[path] = "(set)"
    if args.json:
        print(json.dumps({"config": to_wire(config), "sources": sources}, indent=2))
        return 0
    print(f"user configuration file: {user_config_path()}")
    width = max(len(p) for p in values)
    for path, value in values.items():
        print(f"{path:<{width}}  {json.dumps(value):<40}  {sources[path]}")
    return 0


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
    from exlsp.benchmarks.repo_eval import run_from_args, table

    root = Path(args.path)
    if not (root / ".git").exists():
        raise SystemExit(f"exlsp eval: not a git repository: {root}")
    result = run_from_args(args, LANGUAGES)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="exlsp", description="AI code completions for any LSP editor from a local model."
    )
    parser.add_argument("--version", action="version", version=f"exlsp {_version()}")
    levels = ["debug", "info", "warning", "error", "critical"]
    parser.add_argument(
        "--log-file",
        help="write the log to this file (serve: before logging.file; default: stderr)",
    )
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
    p.add_argument(
        "--tcp", metavar="[HOST:]PORT", help="listen on TCP (host 127.0.0.1; one client)"
    )
    p.add_argument(
        "--listen-any",
        action="store_true",
        help="allow a --tcp host that is not loopback (no authentication: use with care)",
    )
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

    p = sub.add_parser(
        "host", parents=[common], help="the shared model hosts: their status, or stop them"
    )
    p.add_argument("action", choices=["status", "stop"])
    p.add_argument("--config", help="stop: the configuration whose host to stop")
    p.add_argument("--all", action="store_true", help="stop: every model host of this user")
    p.add_argument("--json", action="store_true", help="status: print JSON")
    p.set_defaults(func=cmd_host)

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
        "models", parents=[common], help="list the model catalogue and what fits this machine"
    )
    p.add_argument(
        "--backend",
        choices=["exllamav2", "exllamav3", "transformers"],
        help="size for this backend",
    )
    p.add_argument("--max-seq-len", type=int, help="KV cache tokens (default: model.maxSeqLen)")
    p.add_argument(
        "--cache-type", choices=["fp16", "q8", "q6", "q4"], help="default: model.cacheType"
    )
    p.add_argument(
        "--no-second-cache", action="store_true", help="leave out hover/actions' own cache"
    )
    p.add_argument("--free-gib", type=float, help="size for this much free memory instead")
    p.add_argument("--cpu", action="store_true", help="with --free-gib: transformers on a CPU")
    p.add_argument("--sources", action="store_true", help="print each entry's sources")
    p.add_argument("--config", help="a JSON file with the configuration tree")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("pull", parents=[common], help="download a model, check it and configure it")
    p.add_argument("model", metavar="NAME|REPO[@REVISION]")
    p.add_argument("--bits", type=float, help="EXL2 bits per weight of a catalogue model")
    p.add_argument(
        "--assist",
        action="store_true",
        help="the model for hover and code actions (a catalogue name: its instruct companion)",
    )
    p.add_argument(
        "--no-configure", action="store_true", help="do not write the user configuration file"
    )
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "config",
        parents=[common],
        help="show the merged configuration and where each value is from",
    )
    p.add_argument("--config", help="a JSON file with the configuration tree")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_config)

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
    p.add_argument(
        "--retrieval",
        action="store_true",
        help="run each model without and with snippets from PATH's index",
    )
    p.add_argument("--json", action="store_true", help="print JSON with per-task records")
    p.set_defaults(func=cmd_eval)

    args = parser.parse_args(argv)
    level = args.log_level or ("info" if args.command == "serve" else "critical")
    setup_logging(level, args.log_file, serve=args.command == "serve")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
