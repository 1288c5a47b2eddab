"""Completion quality: HumanEval infilling through the engine, post-processing, retrieval.

Three modes, one results file each under `benchmarks/results/`:

- ``model`` runs HumanEval infilling (openai/human-eval-infilling, MIT; the data
  is in `benchmarks/data/human_eval_infilling/`) through the completion engine
  with any model and backend, as an editor would: the document is the task's
  program with the middle taken out and the cursor where it was. A middle of
  whole lines becomes an empty line with the cursor after the indentation of
  the middle's first line (what an editor shows after Enter); any other middle
  leaves the cursor inside the line. Each suggestion is spliced back and the
  program's tests run in a sandboxed subprocess (pass@1, greedy); exact match
  compares the suggestion with the true middle, trailing whitespace aside.
  Generation is sequential (one model, one job at a time); test execution runs
  in parallel with it.
- ``oracle`` measures post-processing alone: the "model" writes the true
  middle and then keeps going with the rest of the true file; the score is how
  often the filters cut exactly at the end of the middle.
- ``retrieval`` builds single-line tasks from a real multi-file project on this
  machine: a line that calls or reads a name defined (``def``/``class``) only
  in another file of the project, and nowhere else in its own file; the cursor
  goes before the name, the rest of the line is what to complete. Each task runs
  with the workspace index (the engine's `ContextSource`) off and on; the score
  is exact match and how often the suggestion starts with the needed name.

Usage:

    python -m exlsp.benchmarks.quality model --subsets single,multi --limit 0,500
    python -m exlsp.benchmarks.quality oracle
    python -m exlsp.benchmarks.quality retrieval --project tqdm,pathspec

With no ``--model`` the built-in default model is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exlsp.benchmarks import provenance

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / "data" / "human_eval_infilling"
RESULTS_DIR = provenance.RESULTS_DIR
SUBSETS = {
    "single": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}
# For scale: published HumanEval-FIM exact match (Qwen2.5-Coder technical report,
# table 7, average over Python/Java/JavaScript); another harness, not comparable
# figure for figure.
PUBLISHED_EM = {
    "DeepSeek-Coder-1.3B": 80.7,
    "Qwen2.5-Coder-1.5B": 83.5,
    "StarCoder2-7B": 82.0,
    "Qwen2.5-Coder-7B": 86.2,
}

# --- tasks and placements -----------------------------------------------------------


@dataclass(frozen=True)
class Task:
    task_id: str
    subset: str
    prompt: str
    middle: str
    suffix: str
    test: str
    entry_point: str


def load_tasks(subset: str) -> list[Task]:
    path = DATA_DIR / SUBSETS[subset]
    tasks: list[Task] = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            raw = json.loads(line)
            tasks.append(
                Task(
                    task_id=raw["task_id"],
                    subset=subset,
                    prompt=raw["prompt"],
                    middle=raw["canonical_solution"],
                    suffix=raw["suffix"],
                    test=raw["test"],
                    entry_point=raw["entry_point"],
                )
            )
    return tasks


def sample(tasks: Sequence[Task], limit: int, seed: int) -> list[Task]:
    """`limit` tasks drawn with `seed` (in their original order); 0: all of them."""
    if limit <= 0 or limit >= len(tasks):
        return list(tasks)
    chosen = sorted(random.Random(seed).sample(range(len(tasks)), limit))
    return [tasks[i] for i in chosen]


@dataclass(frozen=True)
class Placement:
    """The editor's view of a task: the document, the cursor, the completion wanted."""

    document: str
    offset: int
    expected: str
    # The program is document[:offset] + completion + document[offset:].


def place(task: Task) -> Placement:
    middle = task.middle
    whole_lines = middle.endswith("\n") and (not task.prompt or task.prompt.endswith("\n"))
    if whole_lines:
        return Placement(task.prompt + "\n" + task.suffix, len(task.prompt), middle[:-1])
    return Placement(task.prompt + task.suffix, len(task.prompt), middle)


def program(task: Task, placement: Placement, completion: str) -> str:
    doc, at = placement.document, placement.offset
    body = doc[:at] + completion + doc[at:]
    return f"{body}\n\n{task.test}\n\ncheck({task.entry_point})\n"


def normalize(text: str) -> str:
    """Trailing whitespace of each line and trailing blank lines do not count."""
    return "\n".join(line.rstrip() for line in text.split("\n")).rstrip("\n")


def split_lines(text: str) -> list[str]:
    """Lines as LSP counts them (``\\n``, ``\\r\\n``, ``\\r``), each with its ending."""
    parts = re.split(r"(\r\n|\r|\n)", text)
    lines = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
    lines.append(parts[-1])
    return lines


def document_view(text: str, offset: int, uri: str, path: str) -> Any:
    from exlsp.completion.types import DocumentView

    lines = split_lines(text)
    start = 0
    for number, line in enumerate(lines):
        if offset <= start + len(line.rstrip("\r\n")) or number == len(lines) - 1:
            return DocumentView(uri, lines, number, offset - start, "python", path)
        start += len(line)
    raise AssertionError("unreachable")


# --- sandboxed execution --------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    seconds: float = 10.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20


def _apply_limits(limits: Limits) -> Callable[[], None]:
    def apply() -> None:
        cpu = int(limits.seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    return apply


def run_program(source: str, limits: Limits = Limits()) -> tuple[bool, str]:
    """Run `source` in a fresh interpreter in an empty temporary directory.

    Isolated mode (no user site, no environment variables, no current directory
    on the path), a new session so that a timeout kills everything it started,
    and limits on CPU time, address space, file size and open files. Returns
    (passed, reason).
    """
    with tempfile.TemporaryDirectory(prefix="exlsp-quality-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(source, encoding="utf-8")
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", str(path)],
            cwd=tmp,
            env={"PATH": "/usr/bin:/bin", "HOME": tmp, "PYTHONHASHSEED": "0"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_apply_limits(limits),
        )
        try:
            _, err = proc.communicate(timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, "timeout"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode == 0:
            return True, "passed"
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return False, (lines[-1][:200] if lines else f"exit {proc.returncode}")


# --- progress and environment -----------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (a line per 10 % when not a terminal)."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(1, total)
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._shown = -1

    def step(self, note: str = "") -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * self.done / self.total)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{rate:.2f}/s eta {eta:.0f}s {note}"
        )
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
            if self.done == self.total:
                sys.stderr.write("\n")
        elif self.done * 10 // self.total != self._shown or self.done == self.total:
            self._shown = self.done * 10 // self.total
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[k], 1)


# --- oracle mode --------------------------------------------------------------------------


@dataclass
class OracleCase:
    task_id: str
    exact: bool
    by: str | None
    got: str
    expected: str


def oracle_case(task: Task) -> OracleCase:
    from exlsp.completion.engine import filter_context
    from exlsp.completion.postprocess import postprocess

    placement = place(task)
    doc = document_view(placement.document, placement.offset, "file:///task.py", "task.py")
    ctx = filter_context(doc, "auto")
    raw = placement.expected + placement.document[placement.offset :]
    out = postprocess(raw, ctx)
    exact = normalize(out.text) == normalize(placement.expected)
    return OracleCase(task.task_id, exact, out.by, out.text, placement.expected)


def run_oracle(args: argparse.Namespace) -> dict[str, Any]:
    subsets: dict[str, Any] = {}
    for subset in args.subsets:
        tasks = sample(load_tasks(subset), args.limit.get(subset, 0), args.seed)
        cases = [oracle_case(t) for t in tasks]
        misses = [c for c in cases if not c.exact]
        subsets[subset] = {
            "tasks": len(cases),
            "exact_cut": round(100 * (len(cases) - len(misses)) / max(1, len(cases)), 2),
            "misses_by_filter": dict(Counter(str(c.by) for c in misses)),
            "misses": [asdict(c) for c in misses[: args.show_misses]],
        }
    return {"subsets": subsets}


# --- model mode -----------------------------------------------------------------------------


def engine_config(args: argparse.Namespace) -> Any:
    from exlsp.completion.config import CompletionConfig, EngineConfig, ModelConfig

    model = ModelConfig(
        path=args.model or "", backend=args.backend, device=args.device, threads=args.threads
    )
    completion = CompletionConfig(deadlineMs=args.deadline_ms, streamPartial=False)
    return EngineConfig(model=model, completion=completion)


async def _start_service(args: argparse.Namespace, context: Any = None) -> Any:
    from exlsp.completion.service import CompletionService

    service = CompletionService(engine_config(args), context)
    await service.start()
    if service.state != "ready":
        raise SystemExit(f"model failed to load: {service.error}")
    return service


def _model_info(service: Any) -> dict[str, Any]:
    backend = service.backend
    path = Path(backend.info.path)
    info: dict[str, Any] = {"path": str(path), "backend": backend.name}
    build = path / "exlsp-build.json"
    if build.is_file():
        record = json.loads(build.read_text(encoding="utf-8"))
        info["build"] = {
            k: record.get(k) for k in ("family", "parameters", "steps", "tokens", "train_seconds")
        }
    return info


async def _complete(service: Any, text: str, offset: int, uri: str, path: str) -> Any:
    from exlsp.completion.types import CompletionRequest

    return await service.complete(CompletionRequest(document_view(text, offset, uri, path)))


async def run_model(args: argparse.Namespace) -> dict[str, Any]:
    service = await _start_service(args)
    info = _model_info(service)
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    limits = Limits(seconds=args.timeout)
    subsets: dict[str, Any] = {}
    try:
        for subset in args.subsets:
            tasks = sample(load_tasks(subset), args.limit.get(subset, 0), args.seed)
            progress = Progress(subset, len(tasks))
            pending: list[tuple[Task, Placement, str, Any, Future[tuple[bool, str]]]] = []
            for n, task in enumerate(tasks):
                placement = place(task)
                uri = f"file:///humaneval/{subset}/{n}.py"
                result = await _complete(
                    service, placement.document, placement.offset, uri, f"humaneval/{n}.py"
                )
                text = result.suggestions[0].text if result.suggestions else ""
                future = pool.submit(run_program, program(task, placement, text), limits)
                pending.append((task, placement, text, result.stats, future))
                progress.step()
            records = []
            for task, placement, text, stats, future in pending:
                passed, reason = future.result()
                records.append(
                    {
                        "task_id": task.task_id,
                        "passed": passed,
                        "exact": normalize(text) == normalize(placement.expected),
                        "reason": reason,
                        "ms": round(stats.total_ms, 1),
                        "prompt_tokens": stats.prompt_tokens,
                        "generated_tokens": stats.generated_tokens,
                        "stop": stats.stop_reason,
                        "completion": text,
                    }
                )
            latencies = [r["ms"] for r in records]
            subsets[subset] = {
                "tasks": len(records),
                "pass_at_1": round(100 * sum(r["passed"] for r in records) / len(records), 2),
                "exact_match": round(100 * sum(r["exact"] for r in records) / len(records), 2),
                "latency_ms": {
                    "mean": round(statistics.fmean(latencies), 1),
                    "p50": _percentile(latencies, 0.5),
                    "p90": _percentile(latencies, 0.9),
                },
                "mean_generated_tokens": round(
                    statistics.fmean(r["generated_tokens"] for r in records), 1
                ),
                "records": records,
            }
    finally:
        pool.shutdown()
        service.close()
    return {"model": info, "subsets": subsets}


# --- retrieval mode -----------------------------------------------------------------------------

_DEFINED = re.compile(r"^[ \t]*(?:async[ \t]+)?(?:def|class)[ \t]+([A-Za-z_]\w*)", re.MULTILINE)
_USE = re.compile(r"(?<![\w])([A-Za-z_]\w{3,})\b")


@dataclass(frozen=True)
class RetrievalTask:
    path: str  # relative to the workspace
    line: int
    column: int
    name: str
    expected: str  # the rest of the line


def project_root(name: str) -> Path:
    """A package directory: a path, or an installed or standard-library package name."""
    candidate = Path(name)
    if candidate.is_dir():
        return candidate.resolve()
    for key in ("purelib", "platlib", "stdlib"):
        root = Path(sysconfig.get_paths()[key]) / name
        if root.is_dir():
            return root
    raise SystemExit(f"no package directory named {name!r}")


def retrieval_tasks(root: Path, limit: int, seed: int) -> list[RetrievalTask]:
    files = {
        p.relative_to(root).as_posix(): p.read_text(encoding="utf-8", errors="replace")
        for p in sorted(root.rglob("*.py"))
        if "__pycache__" not in p.parts
    }
    defined_in: dict[str, set[str]] = {}
    for rel, text in files.items():
        for m in _DEFINED.finditer(text):
            defined_in.setdefault(m.group(1), set()).add(rel)
    tasks: list[RetrievalTask] = []
    for rel, text in files.items():
        counts = Counter(_USE.findall(text))
        for number, line in enumerate(text.split("\n")):
            stripped = line.strip()
            if (
                not stripped
                or stripped.startswith(("#", "import ", "from ", "def ", "class ", "@"))
                or '"""' in line
                or "'''" in line
            ):
                continue
            for m in _USE.finditer(line):
                name = m.group(1)
                where = defined_in.get(name, set())
                # Defined elsewhere only, and used nowhere else in this file.
                if not where or rel in where or counts[name] != 1:
                    continue
                before = line[: m.start()]
                if before.count('"') % 2 or before.count("'") % 2 or "#" in before:
                    continue
                expected = line[m.start() :].rstrip()
                tasks.append(RetrievalTask(rel, number, m.start(), name, expected))
                break
    rng = random.Random(seed)
    rng.shuffle(tasks)
    return tasks[:limit] if limit > 0 else tasks


async def _retrieval_records(
    args: argparse.Namespace, workspace: Path, tasks: Sequence[RetrievalTask], context: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    service = await _start_service(args, context)
    info = _model_info(service)
    progress = Progress(f"{workspace.name}, index {'on' if context else 'off'}", len(tasks))
    records = []
    try:
        for n, task in enumerate(tasks):
            text = (workspace / task.path).read_text(encoding="utf-8")
            lines = text.split("\n")
            lines[task.line] = lines[task.line][: task.column]
            document = "\n".join(lines)
            offset = sum(len(x) + 1 for x in lines[: task.line]) + task.column
            uri = (workspace / task.path).as_uri() + f"#task{n}"
            result = await _complete(service, document, offset, uri, task.path)
            got = result.suggestions[0].text if result.suggestions else ""
            # Whether the prompt showed the model the name at all (retrieval recall).
            built = service.engine.last_prompt if service.engine is not None else None
            shown = built is not None and bool(
                re.search(
                    rf"\b{re.escape(task.name)}\b", service.engine.tokenizer.decode(built.ids)
                )
            )
            records.append(
                {
                    "project": workspace.name,
                    "name_in_prompt": shown,
                    "task": asdict(task),
                    "completion": got,
                    "exact": normalize(got) == normalize(task.expected),
                    "name_hit": got.startswith(task.name),
                    "snippet_tokens": result.stats.snippet_tokens,
                    "prompt_tokens": result.stats.prompt_tokens,
                    "ms": round(result.stats.total_ms, 1),
                }
            )
            progress.step()
    finally:
        service.close()
    return records, info


async def run_retrieval(args: argparse.Namespace) -> dict[str, Any]:
    from exlsp.index.config import IndexConfig
    from exlsp.index.retrieve import WorkspaceRetriever
    from exlsp.index.service import WorkspaceIndex

    by_variant: dict[str, list[dict[str, Any]]] = {"index_off": [], "index_on": []}
    projects: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for name in args.project.split(","):
        source = project_root(name)
        with tempfile.TemporaryDirectory(prefix="exlsp-retrieval-") as tmp:
            workspace = Path(tmp) / source.name
            shutil.copytree(source, workspace, ignore=shutil.ignore_patterns("__pycache__"))
            tasks = retrieval_tasks(workspace, args.retrieval_limit, args.seed)
            config = IndexConfig(
                databaseDir=str(Path(tmp) / "index"), embeddingModel=args.embedding_model
            )
            index = WorkspaceIndex(workspace, config, use_watchdog=False)
            started = time.perf_counter()
            index.start()
            try:
                if not index.wait_idle(timeout=600):
                    raise SystemExit("the workspace index did not settle within 10 minutes")
                projects.append(
                    {
                        "name": source.name,
                        "path": str(source),
                        "tasks": len(tasks),
                        "index_seconds": round(time.perf_counter() - started, 1),
                        "index_chunks": index.stats().chunks,
                    }
                )
                retriever = WorkspaceRetriever(index, config)
                for variant, context in (("index_off", None), ("index_on", retriever)):
                    records, info = await _retrieval_records(args, workspace, tasks, context)
                    by_variant[variant] += records
            finally:
                index.stop()
    variants: dict[str, Any] = {}
    for variant, records in by_variant.items():
        count = max(1, len(records))
        variants[variant] = {
            "tasks": len(records),
            "exact_match": round(100 * sum(r["exact"] for r in records) / count, 2),
            "name_hit": round(100 * sum(r["name_hit"] for r in records) / count, 2),
            "name_in_prompt": round(100 * sum(r["name_in_prompt"] for r in records) / count, 2),
            "mean_snippet_tokens": round(
                statistics.fmean(r["snippet_tokens"] for r in records) if records else 0.0, 1
            ),
            "latency_ms_p50": _percentile([r["ms"] for r in records], 0.5),
            "records": records,
        }
    off, on = variants["index_off"], variants["index_on"]
    return {
        "model": info,
        "projects": projects,
        "lift": {
            "exact_match": round(on["exact_match"] - off["exact_match"], 2),
            "name_hit": round(on["name_hit"] - off["name_hit"], 2),
        },
        "variants": variants,
    }


# --- command line ---------------------------------------------------------------------------------


def _limits(text: str, subsets: Sequence[str]) -> dict[str, int]:
    values = [int(v) for v in text.split(",")] if text else []
    if len(values) == 1:
        values = values * len(subsets)
    if values and len(values) != len(subsets):
        raise SystemExit("--limit takes one number, or one per subset")
    return dict(zip(subsets, values, strict=False))


def _table(mode: str, result: dict[str, Any]) -> str:
    rows: list[str] = []
    if mode == "oracle":
        rows.append(f"{'subset':<14}{'tasks':>7}{'exact cut %':>13}")
        for name, s in result["subsets"].items():
            rows.append(f"{name:<14}{s['tasks']:>7}{s['exact_cut']:>13.2f}")
    elif mode == "model":
        rows.append(
            f"{'subset':<14}{'tasks':>7}{'pass@1 %':>10}{'EM %':>8}{'p50 ms':>9}{'p90 ms':>9}"
        )
        for name, s in result["subsets"].items():
            lat = s["latency_ms"]
            rows.append(
                f"{name:<14}{s['tasks']:>7}{s['pass_at_1']:>10.2f}{s['exact_match']:>8.2f}"
                f"{lat['p50']:>9.1f}{lat['p90']:>9.1f}"
            )
    else:
        rows.append(
            f"{'variant':<12}{'tasks':>7}{'EM %':>8}{'name hit %':>12}"
            f"{'name in prompt %':>18}{'snippet tok':>13}"
        )
        for name, s in result["variants"].items():
            rows.append(
                f"{name:<12}{s['tasks']:>7}{s['exact_match']:>8.2f}{s['name_hit']:>12.2f}"
                f"{s['name_in_prompt']:>18.2f}{s['mean_snippet_tokens']:>13.1f}"
            )
        lift = result["lift"]
        rows.append(f"lift: EM {lift['exact_match']:+.2f} points, name hit {lift['name_hit']:+.2f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exlsp.benchmarks.quality", description=__doc__.split("\n")[0]
    )
    parser.add_argument("mode", choices=("model", "oracle", "retrieval"))
    parser.add_argument("--subsets", default="single,multi", help=f"of {','.join(SUBSETS)}")
    parser.add_argument(
        "--limit", default="", help="tasks per subset (one value or one each); 0: all"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="", help="model directory; default: the built-in model")
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the backend")
    parser.add_argument("--deadline-ms", type=int, default=60_000)
    parser.add_argument("--jobs", type=int, default=2, help="test programs run at once")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per test program")
    parser.add_argument(
        "--project",
        default="tqdm,pathspec",
        help="retrieval: packages or directories, comma-separated",
    )
    parser.add_argument("--retrieval-limit", type=int, default=200)
    parser.add_argument("--embedding-model", default="", help='retrieval: "none" for BM25 only')
    parser.add_argument("--show-misses", type=int, default=50)
    parser.add_argument("--name", default="", help="results file name (without .json)")
    args = parser.parse_args(argv)
    args.subsets = [s for s in args.subsets.split(",") if s]
    for s in args.subsets:
        if s not in SUBSETS:
            parser.error(f"unknown subset {s!r}")
    args.limit = _limits(args.limit, args.subsets)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    load_start = provenance.loadavg()
    started = time.perf_counter()
    if args.mode == "oracle":
        result = run_oracle(args)
    elif args.mode == "model":
        result = asyncio.run(run_model(args))
    else:
        result = asyncio.run(run_retrieval(args))
    payload = {
        "benchmark": "humaneval-infilling" if args.mode != "retrieval" else "cross-file-retrieval",
        "mode": args.mode,
        "date": provenance.now(),
        "commit": provenance.commit_info(),
        "machine": provenance.machine_info(("torch", "transformers", "tokenizers")),
        "loadavg": {"start": load_start, "end": provenance.loadavg()},
        "seconds": round(time.perf_counter() - started, 1),
        "command": "python -m exlsp.benchmarks.quality "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            k: v for k, v in vars(args).items() if k not in {"mode", "show_misses", "name"}
        },
        "published_exact_match_for_scale": PUBLISHED_EM if args.mode == "model" else None,
        **result,
    }
    name = args.name or f"quality-{args.mode}"
    path = provenance.write_results(RESULTS_DIR / f"{name}.json", payload)
    print(_table(args.mode, result))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
