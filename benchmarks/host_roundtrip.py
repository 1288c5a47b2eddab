"""The model host's own cost per request: a job's round trip through it, against in-process.

The `instant` backend (no generation) behind a `BackendWorker` in this process
and behind a model host (a process of its own, started here in a private
runtime folder and stopped at the end): the same 1200-token prompt with its last
token changing, one job at a time, submit to end. Rounds alternate the two.
Unlike `latency.py`'s `host-instant` variant, no LSP server, prompt building or
prefetch runs beside it, so what is left is the socket, the framing and the
host's thread hop.

    python -m exlsp.benchmarks.host_roundtrip --name host-roundtrip-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

from exlsp.benchmarks import provenance
from exlsp.completion.backends.base import GenerationJob
from exlsp.completion.backends.instant import InstantBackend
from exlsp.completion.builtin_model import SHIPPED_MODEL_DIR
from exlsp.completion.config import ModelConfig
from exlsp.completion.worker import BackendWorker


async def _round(worker: Any, jobs: int) -> list[float]:
    prompt = list(range(1000, 2200))
    times = []
    for i in range(jobs):
        prompt[-1] = 3000 + i % 50
        job = GenerationJob(
            prompt=list(prompt),
            stop_ids=frozenset({1}),
            max_tokens=16,
            deadline=time.monotonic() + 2,
        )
        t0 = time.perf_counter()
        async for _ in worker.submit(job).tokens():
            pass
        times.append((time.perf_counter() - t0) * 1000)
    return times[jobs // 10 :]  # the first jobs warm the caches and the connection


async def _measure(rounds: int, jobs: int) -> dict[str, Any]:
    from exlsp.completion.host import control
    from exlsp.completion.host.client import HostWorker

    model = ModelConfig(backend="instant", path=str(SHIPPED_MODEL_DIR), device="cpu")
    local = BackendWorker("roundtrip")
    await local.load(lambda: InstantBackend(SHIPPED_MODEL_DIR))
    host = HostWorker(model)
    await host.load()
    out: dict[str, list[float]] = {"in_process": [], "host": []}
    try:
        for _ in range(rounds):
            out["in_process"] += await _round(local, jobs)
            out["host"] += await _round(host, jobs)
    finally:
        local.close()
        host.close()
        control.stop_hosts()
    p50 = {k: statistics.median(v) for k, v in out.items()}
    return {
        "jobs_per_round": jobs,
        "rounds": rounds,
        "in_process_ms": provenance.dist(out["in_process"], 4),
        "host_ms": provenance.dist(out["host"], 4),
        "host_adds_p50_ms": round(p50["host"] - p50["in_process"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--name", default="", help="write benchmarks/results/NAME.json")
    args = parser.parse_args(argv)
    saved = {k: os.environ.get(k) for k in ("EXLSP_RUNTIME_DIR", "EXLSP_MODEL_HOST")}
    try:
        with tempfile.TemporaryDirectory() as runtime:
            os.environ["EXLSP_RUNTIME_DIR"] = runtime  # a host of its own, never the user's
            os.environ.pop("EXLSP_MODEL_HOST", None)
            result = asyncio.run(_measure(args.rounds, args.jobs))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    print(
        f"p50: in-process {result['in_process_ms']['p50']} ms, through the host "
        f"{result['host_ms']['p50']} ms: the host adds {result['host_adds_p50_ms']} ms"
    )
    if args.name:
        payload = {
            "benchmark": "host_roundtrip",
            "date": provenance.now(),
            "commit": provenance.commit_info(),
            "machine": provenance.machine_info(),
            "command": f"python -m exlsp.benchmarks.host_roundtrip --rounds {args.rounds} "
            f"--jobs {args.jobs} --name {args.name}",
            **result,
        }
        print(provenance.write_results(provenance.RESULTS_DIR / f"{args.name}.json", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
