"""Workspace index benchmark on CPython's standard library (`Lib/`).

Not a test. One run measures, on a copy of the running interpreter's stdlib
directory (sysconfig "stdlib", without site-packages and caches):

1. cold index, lexical only: wall time, files, chunks, chunks/s;
2. save -> queryable: a function is appended to a file, the change reported
   (editor event, and the watchdog fallback), and the time until a search
   finds it;
3. query latency p50/p95 (the retriever's query: lines around a random cursor)
   and recall@10 of 3-line queries cut from random chunks;
4. with `--embed-files N`: the same on the first N modules with the real
   embedding model (all-MiniLM-L6-v2): embedding throughput, vector and hybrid
   latency and recall (embedding all of Lib/ takes hours on a small CPU), and
   the recall of the same queries through an IVF index with as many partitions
   as Lib/ would have (what the approximate vector search costs in quality);
5. with `--synthetic-vectors`: hybrid latency over the whole of Lib/ (IVF
   vector index) where chunk vectors are random unit vectors and only the query
   is embedded by the real model: a latency figure at full scale, not a
   quality one.

Latencies of vector and hybrid queries come three ways: "vector"/"hybrid"
embed the query first, on the calling thread (as the first version of the
retriever did on every refresh); "vector_search"/"hybrid_search" get the query
vector already computed, which is what a completion request pays (the
retriever computes query vectors in the background), with the embedding time
reported on its own as "query_embedding"; "retriever_snippets" is the
retriever's whole call at a new place (no query vector yet: lexical) and
"retriever_snippets_warm" the call at the same place once the vector is there.
Every latency has a wall-clock and a CPU-time (the whole process) summary:
on a shared machine the wall clock also measures the other jobs (the load
average is recorded before and after each section).

Results: `benchmarks/results/index-<name>.json` (machine, commit, date) and a
table on stdout. Example:

    python -m exlsp.benchmarks.index_bench --name cpu2 --embed-files 40
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exlsp.benchmarks import provenance
from exlsp.completion.types import DocumentView
from exlsp.index import table_indexes as store_module
from exlsp.index import upkeep
from exlsp.index.config import IndexConfig
from exlsp.index.embed import Embedder, load_embedder
from exlsp.index.retrieve import (
    VECTOR_LINES_AFTER,
    VECTOR_LINES_BEFORE,
    WorkspaceRetriever,
    query_window,
)
from exlsp.index.service import WorkspaceIndex
from exlsp.index.watch import ChangeKind

RESULTS_DIR = provenance.RESULTS_DIR
COPY_IGNORE = shutil.ignore_patterns(
    "site-packages", "__pycache__", "*.pyc", "*.so", "*.a", "*.o", "*.exe", "*.whl"
)


# --- machine and output --------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info = provenance.machine_info(
        ("lancedb", "pyarrow", "tree-sitter", "sentence-transformers", "torch")
    )
    return {"date": provenance.now(), "commit": provenance.commit_info(), **info}


def summary_ms(values: Sequence[float], cpu: Sequence[float] = ()) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    out = {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "max_ms": round(ordered[-1], 2),
    }
    if cpu:
        cpu_sorted = sorted(cpu)
        out["cpu_p50_ms"] = round(statistics.median(cpu_sorted), 2)
        out["cpu_p95_ms"] = round(
            cpu_sorted[min(len(cpu_sorted) - 1, int(0.95 * len(cpu_sorted)))], 2
        )
    return out


class Timings:
    """Wall-clock and process CPU time of repeated calls."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        c0, t0 = time.process_time(), time.perf_counter()
        value = fn(*args, **kwargs)
        self.wall.append((time.perf_counter() - t0) * 1000)
        self.cpu.append((time.process_time() - c0) * 1000)
        return value

    def summary(self) -> dict[str, float]:
        return summary_ms(self.wall, self.cpu)


# --- pieces --------------------------------------------------------------------------


def copy_stdlib(dest: Path, only: int | None = None) -> Path:
    src = Path(sysconfig.get_paths()["stdlib"])
    if only is None:
        shutil.copytree(src, dest, ignore=COPY_IGNORE, symlinks=True)
    else:
        dest.mkdir(parents=True)
        modules = sorted(p for p in src.glob("*.py") if p.is_file())[:only]
        for p in modules:
            shutil.copy2(p, dest / p.name)
    return dest


def build(
    root: Path, config: IndexConfig, embedder: Embedder | None = None, watch: bool = False
) -> tuple[WorkspaceIndex, dict[str, Any]]:
    t0, c0 = time.perf_counter(), time.process_time()
    index = WorkspaceIndex(root, config, use_watchdog=watch, embedder=embedder)
    index.start()
    if not index.wait_idle(3600, embeddings=False):
        raise RuntimeError("the scan did not finish")
    lexical_s = time.perf_counter() - t0
    lexical_cpu_s = time.process_time() - c0
    if not index.wait_idle(6 * 3600):
        raise RuntimeError("the embedding backlog did not finish")
    total_s = time.perf_counter() - t0
    stats = index.stats()
    if stats.last_error:
        raise RuntimeError(stats.last_error)
    info: dict[str, Any] = {
        "files": stats.files,
        "chunks": stats.chunks,
        "chunks_with_vectors": stats.chunks_with_vectors,
        "lexical_ready_s": round(lexical_s, 2),
        "lexical_ready_cpu_s": round(lexical_cpu_s, 2),  # CPU time of all threads
        "total_s": round(total_s, 2),
        "chunks_per_s_lexical": round(stats.chunks / lexical_s, 1),
    }
    if stats.chunks_with_vectors:
        info["embed_s"] = round(total_s - lexical_s, 2)
        info["chunks_per_s_embedding"] = round(
            stats.chunks_with_vectors / max(1e-9, total_s - lexical_s), 1
        )
    return index, info


def all_chunks(index: WorkspaceIndex) -> list[dict[str, Any]]:
    store = index._store
    assert store is not None
    columns = ["id", "path", "start_line", "end_line", "text"]
    return list(store.table.search().select(columns).limit(None).to_arrow().to_pylist())


def three_line_queries(chunks: list[dict[str, Any]], n: int, rng: random.Random) -> list[Any]:
    """(query text, chunk id) of 3 consecutive non-blank-ish lines from random chunks."""
    out: list[Any] = []
    candidates = [c for c in chunks if str(c["text"]).count("\n") >= 3]
    while len(out) < n and candidates:
        c = rng.choice(candidates)
        lines = str(c["text"]).splitlines(keepends=True)
        i = rng.randrange(0, len(lines) - 2)
        q = "".join(lines[i : i + 3])
        if len(q.strip()) < 20:
            continue
        out.append((q, c["id"]))
    return out


def recall_at_10(index: WorkspaceIndex, queries: list[Any], mode: str) -> dict[str, Any]:
    strict = lenient = 0
    timings = Timings()
    for q, cid in queries:
        hits = timings(index.search, q, limit=10, mode=mode)
        if any(h.id == cid for h in hits):
            strict += 1
            lenient += 1
        elif any(q in h.text for h in hits):
            lenient += 1  # another chunk holds these exact lines (overlap, copies)
    n = max(1, len(queries))
    return {
        "recall_at_10": round(strict / n, 4),
        "recall_at_10_any_chunk_with_the_lines": round(lenient / n, 4),
        "latency": timings.summary(),
    }


def cursor_documents(root: Path, n: int, rng: random.Random) -> list[DocumentView]:
    files = sorted(p for p in root.rglob("*.py") if p.is_file())
    docs: list[DocumentView] = []
    while len(docs) < n and files:
        path = rng.choice(files)
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        if len(lines) < 30:
            continue
        line = rng.randrange(10, len(lines))
        docs.append(DocumentView(path.as_uri(), lines, line, 0, "python", str(path)))
    return docs


def cursor_latency(
    index: WorkspaceIndex,
    docs: list[DocumentView],
    modes: Sequence[str],
    embedder: Embedder | None = None,
    all_partitions: bool = False,
) -> dict[str, Any]:
    """Latency of the retriever's own query (the windows around the cursor), per mode.

    With `embedder`: also the query embedding alone, and vector / hybrid searches
    given the query vector; with `all_partitions`, those searches again with
    every IVF partition probed (the exhaustive search the index did before).
    """
    retriever = WorkspaceRetriever(index)
    cfg = index.config
    windows = []
    for doc in docs:
        text, nearest = query_window(doc, cfg.queryLinesBefore, cfg.queryLinesAfter)
        vector_text, _ = query_window(doc, VECTOR_LINES_BEFORE, VECTOR_LINES_AFTER)
        windows.append((text, nearest, vector_text))
    out: dict[str, Any] = {}
    for mode in modes:
        timings = Timings()
        for text, nearest, vector_text in windows:
            timings(index.search, text, 16, mode=mode, lines=nearest, vector_text=vector_text)
        out[mode] = timings.summary()
    if embedder is not None:
        embedding = Timings()
        vectors = [embedding(embedder.embed_query, vt) for _, _, vt in windows]
        out["query_embedding"] = embedding.summary()
        store = index._store
        assert store is not None
        variants = [("", store.probe_fraction)]
        if all_partitions and store.nprobes() is not None:
            variants.append(("_all_partitions", 1.0))
        for suffix, fraction in variants:
            store.probe_fraction = fraction
            try:
                for mode in ("vector", "hybrid"):
                    timings = Timings()
                    for (text, nearest, _), vec in zip(windows, vectors, strict=True):
                        timings(index.search, text, 16, mode=mode, lines=nearest, query_vector=vec)
                    out[f"{mode}_search{suffix}"] = timings.summary()
            finally:
                store.probe_fraction = variants[0][1]
        out["nprobes"] = store.nprobes()
        out["partitions"] = store._vector_partitions or None
    # The retriever at a new place (no query vector yet), then at the same place again
    # once the background embedding is done (not timed: it runs off the request path).
    cold, warm = Timings(), Timings()
    vector_use: dict[str, int] = {}
    for doc in docs:
        cold(retriever.snippets_sync, doc, 4000)
        index.query_vectors.wait_idle(60)
        warm(retriever.snippets_sync, doc, 4000)
        vector_use[retriever.last_vector] = vector_use.get(retriever.last_vector, 0) + 1
    out["retriever_snippets"] = cold.summary()
    out["retriever_snippets_warm"] = warm.summary()
    out["retriever_snippets_warm"]["query_vector"] = vector_use
    return out


def save_to_queryable(index: WorkspaceIndex, root: Path, trials: int, editor: bool) -> Any:
    """Append a uniquely named function, report it, time until search finds it."""
    targets = sorted(root.glob("*.py"))[:trials]
    times = []
    for n, path in enumerate(targets):
        name = f"zq_saved_marker_{'e' if editor else 'w'}_{n}_{random.randrange(1 << 30)}"
        t0 = time.perf_counter()
        with open(path, "a") as fh:
            fh.write(f"\n\ndef {name}(value):\n    return value\n")
        if editor:
            index.file_events([(str(path), ChangeKind.CHANGED)])
        deadline = t0 + 30
        while time.perf_counter() < deadline:
            hits = index.search(f"{name}(1)", limit=1, mode="lexical")
            if hits and name in hits[0].text:
                break
            time.sleep(0.005)
        else:
            times.append(float("inf"))
            continue
        times.append((time.perf_counter() - t0) * 1000)
    return summary_ms(times)


class SyntheticEmbedder:
    """Random unit vectors for chunks (fast); the real model for queries."""

    def __init__(self, real: Embedder) -> None:
        self._real = real
        self._rng = np.random.default_rng(0)

    @property
    def name(self) -> str:
        return f"synthetic-random+{self._real.name}"

    @property
    def dim(self) -> int:
        return self._real.dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        v = self._rng.standard_normal((len(texts), self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def embed_query(self, text: str) -> np.ndarray:
        return self._real.embed_query(text)


# --- the run -------------------------------------------------------------------------


class _Skip(Exception):
    pass


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args).copy()}
    work = Path(tempfile.mkdtemp(prefix="exlsp-index-bench-"))
    try:
        root = copy_stdlib(work / "Lib")
        results["workspace"] = str(Path(sysconfig.get_paths()["stdlib"]))

        sections = set(args.sections.split(","))
        # 1. Cold lexical index.
        lexical_cfg = IndexConfig(embeddingModel="none", databaseDir=str(work / "db-lexical"))
        load_before = provenance.loadavg()
        index, info = build(root, lexical_cfg, watch=True)
        info["load_average_before_after"] = [load_before, provenance.loadavg()]
        results["cold_lexical"] = info
        print(f"cold lexical: {info}", file=sys.stderr)
        try:
            if "lexical" not in sections:
                raise _Skip
            # 2. Save -> queryable.
            results["save_to_queryable"] = {
                "editor_event": save_to_queryable(index, root, args.trials, editor=True),
                "watchdog": save_to_queryable(index, root, args.trials, editor=False),
                "debounce_ms": lexical_cfg.debounceMs,
            }
            # 3. Query latency and recall, lexical.
            chunks = all_chunks(index)
            queries = three_line_queries(chunks, args.queries, rng)
            docs = cursor_documents(root, args.queries, rng)
            load_before = provenance.loadavg()
            results["lexical"] = {
                "three_line_queries": recall_at_10(index, queries, "lexical"),
                "cursor_queries": cursor_latency(index, docs, ["lexical"]),
            }
            results["lexical"]["load_average_before_after"] = [load_before, provenance.loadavg()]
            print(f"lexical: {results['lexical']}", file=sys.stderr)
        except _Skip:
            pass
        finally:
            index.stop()

        embedder = None
        if args.embed_files or args.synthetic_vectors:
            embedder = load_embedder(IndexConfig(embeddingDevice=args.device))
            if embedder is None:
                results["embeddings"] = {"skipped": "no sentence-transformers or model package"}

        # 4. Real embeddings on a subset.
        if args.embed_files and embedder is not None and "subset" in sections:
            sub = copy_stdlib(work / "Lib-subset", only=args.embed_files)
            cfg = IndexConfig(databaseDir=str(work / "db-embed"), embeddingDevice=args.device)
            index, info = build(sub, cfg, embedder=embedder)
            try:
                chunks = all_chunks(index)
                queries = three_line_queries(chunks, args.queries, rng)
                docs = cursor_documents(sub, min(args.queries, 100), rng)
                windows = [
                    query_window(d, VECTOR_LINES_BEFORE, VECTOR_LINES_AFTER)[0] for d in docs
                ]
                load_before = provenance.loadavg()
                embedding = Timings()
                for w in windows:
                    embedding(embedder.embed_query, w)
                results["embedded_subset"] = {
                    "index": info,
                    "model": embedder.name,
                    "device": getattr(embedder, "device", "?"),
                    "query_embedding": embedding.summary(),
                    "three_line_queries": {
                        mode: recall_at_10(index, queries, mode)
                        for mode in ("lexical", "vector", "hybrid")
                    },
                    "cursor_queries": cursor_latency(
                        index, docs, ["lexical", "vector", "hybrid"], embedder=embedder
                    ),
                }
                full_chunks = _get(results, "cold_lexical", "chunks")
                if full_chunks:
                    results["embedded_subset"]["three_line_queries_ivf"] = ivf_recall(
                        index, queries, full_chunks
                    )
                results["embedded_subset"]["load_average_before_after"] = [
                    load_before,
                    provenance.loadavg(),
                ]
                print(f"embedded subset: {results['embedded_subset']}", file=sys.stderr)
            finally:
                index.stop()

        # 5. Full-scale hybrid latency with synthetic chunk vectors.
        if args.synthetic_vectors and embedder is not None and "synthetic" in sections:
            upkeep.EMBED_BATCH = upkeep.MAX_EMBED_BATCH = 4096
            synthetic = SyntheticEmbedder(embedder)
            cfg = IndexConfig(databaseDir=str(work / "db-synthetic"))
            index, info = build(root, cfg, embedder=synthetic)
            try:
                store = index._store
                assert store is not None
                info["vector_index"] = [i.index_type for i in store.table.list_indices()]
                docs = cursor_documents(root, args.queries, rng)
                load_before = provenance.loadavg()
                results["synthetic_full"] = {
                    "index": info,
                    "cursor_queries": cursor_latency(
                        index,
                        docs,
                        ["lexical", "vector", "hybrid"],
                        embedder=synthetic,
                        all_partitions=True,
                    ),
                    "load_average_before_after": [load_before, provenance.loadavg()],
                }
                print(f"synthetic: {results['synthetic_full']}", file=sys.stderr)
            finally:
                index.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def ivf_recall(index: WorkspaceIndex, queries: list[Any], full_chunks: int) -> dict[str, Any]:
    """Recall of the 3-line queries through an IVF index with as many partitions as
    an index of `full_chunks` rows has (the subset is too small to get one itself)."""
    store = index._store
    assert store is not None
    partitions = max(1, round(full_chunks / store_module.VECTOR_PARTITION_ROWS))
    saved = store_module.VECTOR_PARTITION_ROWS
    store_module.VECTOR_PARTITION_ROWS = max(8, store.count_rows() // partitions)
    try:
        store._build_vector_index()
        store.warm()
        out: dict[str, Any] = {
            "partition_rows": store_module.VECTOR_PARTITION_ROWS,
            "partitions": store._vector_partitions,
            "nprobes": store.nprobes(),
        }
        for mode in ("vector", "hybrid"):
            out[mode] = recall_at_10(index, queries, mode)
        return out
    finally:
        store_module.VECTOR_PARTITION_ROWS = saved


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def print_table(r: dict[str, Any]) -> None:
    rows: list[tuple[str, Any, str]] = [
        ("cold lexical index (s)", _get(r, "cold_lexical", "lexical_ready_s"), "<= 60"),
        (
            "  files / chunks",
            f"{_get(r, 'cold_lexical', 'files')} / {_get(r, 'cold_lexical', 'chunks')}",
            "",
        ),
        ("  chunks/s", _get(r, "cold_lexical", "chunks_per_s_lexical"), ""),
        (
            "save->queryable editor p50/max (ms)",
            f"{_get(r, 'save_to_queryable', 'editor_event', 'p50_ms')} / "
            f"{_get(r, 'save_to_queryable', 'editor_event', 'max_ms')}",
            "<= 1000",
        ),
        (
            "save->queryable watchdog p50/max (ms)",
            f"{_get(r, 'save_to_queryable', 'watchdog', 'p50_ms')} / "
            f"{_get(r, 'save_to_queryable', 'watchdog', 'max_ms')}",
            "<= 1000",
        ),
        (
            "lexical cursor query p50/p95 (ms)",
            f"{_get(r, 'lexical', 'cursor_queries', 'lexical', 'p50_ms')} / "
            f"{_get(r, 'lexical', 'cursor_queries', 'lexical', 'p95_ms')}",
            "",
        ),
        (
            "retriever snippets p50/p95 (ms)",
            f"{_get(r, 'lexical', 'cursor_queries', 'retriever_snippets', 'p50_ms')} / "
            f"{_get(r, 'lexical', 'cursor_queries', 'retriever_snippets', 'p95_ms')}",
            "",
        ),
        (
            "lexical recall@10 (3 lines)",
            f"{_get(r, 'lexical', 'three_line_queries', 'recall_at_10')} (any chunk: "
            f"{_get(r, 'lexical', 'three_line_queries', 'recall_at_10_any_chunk_with_the_lines')})",
            "",
        ),
    ]
    sub = r.get("embedded_subset")
    if sub:
        rows += [
            (
                "subset chunks / embed chunks/s",
                f"{_get(sub, 'index', 'chunks')} / {_get(sub, 'index', 'chunks_per_s_embedding')}",
                "",
            ),
            (
                "query embedding p50/p95 (ms)",
                f"{_get(sub, 'query_embedding', 'p50_ms')} / "
                f"{_get(sub, 'query_embedding', 'p95_ms')}",
                "",
            ),
        ]
        for mode in ("lexical", "vector", "hybrid"):
            rows.append(
                (
                    f"subset {mode} recall@10 / p95 ms",
                    f"{_get(sub, 'three_line_queries', mode, 'recall_at_10')} / "
                    f"{_get(sub, 'cursor_queries', mode, 'p95_ms')}",
                    ">= 0.97" if mode == "hybrid" else "",
                )
            )
        for mode in ("vector", "hybrid"):
            rows.append(
                (
                    f"subset {mode} recall@10 through IVF",
                    f"{_get(sub, 'three_line_queries_ivf', mode, 'recall_at_10')} "
                    f"({_get(sub, 'three_line_queries_ivf', 'nprobes')} of "
                    f"{_get(sub, 'three_line_queries_ivf', 'partitions')} partitions)",
                    "",
                )
            )
    syn = r.get("synthetic_full")
    if syn:
        chunks = _get(syn, "index", "chunks")
        for key, target in (
            ("lexical", ""),
            ("query_embedding", ""),
            ("vector", ""),
            ("hybrid", ""),
            ("vector_search", ""),
            ("hybrid_search", "<= 20"),
            ("vector_search_all_partitions", ""),
            ("hybrid_search_all_partitions", ""),
            ("retriever_snippets", ""),
            ("retriever_snippets_warm", ""),
        ):
            q = _get(syn, "cursor_queries", key)
            rows.append(
                (
                    f"full {key} p50/p95 (ms, {chunks} chunks)",
                    f"{_get(q, 'p50_ms')} / {_get(q, 'p95_ms')} "
                    f"(cpu {_get(q, 'cpu_p50_ms')} / {_get(q, 'cpu_p95_ms')})",
                    target,
                )
            )
    width = max(len(name) for name, _, _ in rows)
    for name, value, target in rows:
        print(f"{name:<{width}}  {value!s:<28} {target}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=platform.node() or "local", help="results file suffix")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--trials", type=int, default=10, help="save->queryable trials")
    parser.add_argument(
        "--embed-files",
        type=int,
        default=0,
        metavar="N",
        help="also embed the first N stdlib modules with the real model",
    )
    parser.add_argument(
        "--synthetic-vectors",
        action="store_true",
        help="full-scale hybrid latency with random chunk vectors",
    )
    parser.add_argument("--device", default="auto", help="embedding device")
    parser.add_argument(
        "--sections",
        default="lexical,subset,synthetic",
        help="after the cold lexical index (always built): lexical (save->queryable, "
        "lexical latency and recall), subset (--embed-files), synthetic (--synthetic-vectors)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    results = run(args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"index-{args.name}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n", "utf-8")
    print_table(results)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
