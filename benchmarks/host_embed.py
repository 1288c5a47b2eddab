"""The cost of embedding through the model host against in-process.

Embeds the same chunk texts (this repository's Python files, cut as the index
cuts them) with the default embedding model twice: through a model host (the
instant backend, so no completion model competes) with `HostEmbedder`, and with
`SentenceTransformerEmbedder` in this process. Reports the median time of each
batch size and of one query, and the largest difference between the vectors.

    python -m exlsp.benchmarks.host_embed --name host-embed-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from exlsp.benchmarks.provenance import commit_info, machine_info, now

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def chunk_texts(count: int) -> list[str]:
    from exlsp.index.embed import embedding_input

    texts: list[str] = []
    for path in sorted(REPO.glob("[bcis]*/*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for start in range(0, len(lines), 40):
            body = "\n".join(lines[start : start + 40])
            texts.append(embedding_input(str(path.relative_to(REPO)), "", body))
            if len(texts) == count:
                return texts
    return texts


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exlsp.benchmarks.host_embed")
    p.add_argument("--batches", default="1,32,256", help="batch sizes (texts per request)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="host-embed")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)

    from exlsp.completion.builtin_model import SHIPPED_MODEL_DIR
    from exlsp.completion.config import ModelConfig
    from exlsp.completion.host import control, host_embedder
    from exlsp.index.config import IndexConfig
    from exlsp.index.embed import embedder_settings, load_embedder

    os.environ["EXLSP_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="exlsp-host-")
    os.environ.pop("EXLSP_MODEL_HOST", None)
    config = IndexConfig(embeddingDevice=args.device)
    settings = embedder_settings(config)
    if settings is None:
        raise SystemExit("the default embedding model is not installed")
    model = ModelConfig(backend="instant", path=str(SHIPPED_MODEL_DIR), device="cpu")
    batches = [int(b) for b in args.batches.split(",")]
    texts = chunk_texts(max(batches))
    out: dict[str, Any] = {
        "benchmark": "host-embed",
        "date": now(),
        "machine": machine_info(),
        "commit": commit_info(),
        "command": "python -m exlsp.benchmarks.host_embed "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "model": settings.name,
        "batch_size_setting": settings.batch_size,
        "results": {},
    }
    remote = host_embedder(model, settings)
    assert remote is not None
    try:
        t0 = time.perf_counter()
        remote.embed(texts[:1])  # starts the host and loads the model there
        out["host_first_call_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        t0 = time.perf_counter()
        local = load_embedder(config)
        out["in_process_load_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        assert local is not None
        local.embed(texts[:1])
        for n in batches:
            batch = texts[:n]
            row: dict[str, Any] = {"texts": len(batch)}
            for label, embedder in (("host", remote), ("in_process", local)):
                times = timed(lambda e=embedder, b=batch: e.embed(b), args.repeats)  # type: ignore[misc]
                row[f"{label}_ms_median"] = round(statistics.median(times), 2)
                row[f"{label}_ms_all"] = [round(t, 2) for t in times]
            diff = np.abs(remote.embed(batch) - local.embed(batch)).max()
            row["max_abs_difference"] = float(diff)
            row["host_overhead_ms"] = round(row["host_ms_median"] - row["in_process_ms_median"], 2)
            out["results"][f"batch-{n}"] = row
            print(json.dumps(row), flush=True)
        query = texts[0][:300]
        row = {"texts": 1}
        for label, fn in (
            ("host", lambda: remote.embed_query(query)),
            ("in_process", lambda: local.embed_query(query)),
        ):
            times = timed(fn, args.repeats * 4)
            row[f"{label}_ms_median"] = round(statistics.median(times), 2)
        row["host_overhead_ms"] = round(row["host_ms_median"] - row["in_process_ms_median"], 2)
        out["results"]["query"] = row
        print(json.dumps(row), flush=True)
        (host,) = control.running_hosts()
        out["host_rss_mb"] = round(host["rssBytes"] / 2**20, 1) if host.get("rssBytes") else None
    finally:
        remote.close()
        control.stop_hosts()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{args.name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
