"""Side-by-side GPU benchmark: exllamav2 raw, exlsp with and without KV reuse, transformers.

For the Qwen2.5-Coder 1.5B and 7B architectures (random weights, EXL2 4.0 bpw),
with prompts of at least 4,096 tokens (at least 1,024 of them snippet tokens)
and 32 generated tokens forced (no stop ids), one run measures:

a. raw exllamav2: prefill and decode tok/s of one stream (`model.forward`);
b. exlsp's exllamav2 backend replaying a typing session with KV reuse on,
c. ... and off (every keystroke prefills the whole prompt), both through the
   backend directly (exact prompt sizes) and through the language server over
   stdio (the typing replay of `benchmarks/latency.py`);
d. the transformers backend (FP16) on the same GPU and the same prompts;
plus the backend's loop vs exllamav2's dynamic generator (`exl2_dynamic`), n-gram drafting on
and off, and cancel latency (during decode and during a long prefill).

Results go to `benchmarks/results/gpu-<name>.json` (GPU, driver, torch and
exllamav2 versions, commit, date); each section is written as soon as it is
done, and a later run with `--only` merges into the same file.

On a lent GPU machine, `bash benchmarks/gpu/run.sh` (benchmarks/gpu_kit.py) runs
this benchmark as its last stage, after installing the carried wheels, building
exllamav2's extension, running the gpu-marked tests and writing the model; its
`--plan` prints every command. By default the EXL2 model comes from
`exl2_writer` (random packed weights, seconds); `--maker converter` runs
exllamav2's converter instead (`build_exl2`). `--no-index` runs the language
server with its workspace index off (the GPU image lacks the index's packages);
the prompt is then filled by a longer prefix window.

Random weights are valid for timing because the generated length is forced;
they make n-gram drafts rarely accepted, so the n-gram rows measure the cost
of drafting, and its gain needs a real model.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from exlsp.benchmarks.provenance import (
    PACKAGES,
    RESULTS_DIR,
    commit_info,
    machine_info,
    now,
)
from exlsp.completion.backends.base import GenerationJob
from exlsp.completion.config import ModelConfig
from exlsp.completion.decode import decode

logger = logging.getLogger(__name__)

FAMILY = "qwen2.5-coder"
GENERATED = 32
MIN_PROMPT = 4096
MIN_SNIPPETS = 1024
SECTIONS = ("raw", "replay", "modes", "ngram", "cancel", "transformers", "lsp")
# Where the transformers comparison runs (the CPU flow test moves it off the GPU).
HF_DEVICE, HF_DTYPE = "cuda", "float16"


# --- prompts -------------------------------------------------------------------------


def _source(module_name: str) -> str:
    module = __import__(module_name, fromlist=["_"])
    return inspect.getsource(module)


class TypingSession:
    """Prompts (token ids, cache-stable FIM layout) of a user typing in a large file:

    [snippets][<|fim_prefix|> prefix][<|fim_suffix|> suffix][<|fim_middle|> typed]
    """

    def __init__(
        self,
        tokenizer: Any,
        keystrokes: int,
        *,
        snippet_tokens: int = 1100,
        prefix_tokens: int = 2700,
        suffix_tokens: int = 400,
    ) -> None:
        fim = [tokenizer.token_to_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>")]
        fim.append(tokenizer.token_to_id("<|fim_middle|>"))
        sep = tokenizer.token_to_id("<|file_sep|>")
        if any(i is None for i in fim):
            raise ValueError("the model's tokenizer lacks Qwen2.5-Coder FIM tokens")
        snippets: list[int] = []
        for name in ("textwrap", "json.decoder", "shlex"):
            if len(snippets) >= snippet_tokens:
                break
            head = [sep] if sep is not None else []
            snippets += head + tokenizer.encode(f"{name.replace('.', '/')}.py\n" + _source(name))
        self.snippets = snippets[:snippet_tokens]
        lines = _source("argparse").splitlines(keepends=True)
        self.tokenizer = tokenizer
        self.fim = fim
        self.prefix_tokens = prefix_tokens
        self.suffix_tokens = suffix_tokens
        self.lines = lines
        self.prompts = self._type(keystrokes)

    def _type(self, keystrokes: int) -> list[list[int]]:
        tok = self.tokenizer
        start = len(self.lines) // 2
        while len(self.lines[start]) < 50:
            start += 1
        line_no, col = start, 0
        prefix_cache: dict[int, list[int]] = {}
        suffix_cache: dict[int, list[int]] = {}
        prompts = []
        for _ in range(keystrokes):
            col += 1
            if col >= len(self.lines[line_no]):
                line_no, col = line_no + 1, 0
            if line_no not in prefix_cache:
                ids = tok.encode("".join(self.lines[max(0, line_no - 400) : line_no]))
                prefix_cache[line_no] = ids[-self.prefix_tokens :]
                # The line is typed as new text: right of the cursor, only its line end.
                below = tok.encode("\n" + "".join(self.lines[line_no + 1 : line_no + 80]))
                suffix_cache[line_no] = below[: self.suffix_tokens]
            line = self.lines[line_no]
            prompts.append(
                [
                    *self.snippets,
                    self.fim[0],
                    *prefix_cache[line_no],
                    self.fim[1],
                    *suffix_cache[line_no],
                    self.fim[2],
                    *tok.encode(line[:col]),
                ]
            )
        return prompts


# --- measurements ----------------------------------------------------------------------


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 3),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
        "mean": round(statistics.fmean(ordered), 3),
        "max": round(ordered[-1], 3),
    }


def run_job(backend: Any, prompt: list[int], *, reuse: bool) -> tuple[list[int], dict[str, Any]]:
    job = GenerationJob(
        prompt=prompt, stop_ids=frozenset(), max_tokens=GENERATED, reuse_cache=reuse
    )
    t0 = time.perf_counter()
    tokens = list(decode(backend, job))
    total_ms = (time.perf_counter() - t0) * 1000
    s = job.stats
    return tokens, {
        "total_ms": total_ms,
        "ttft_ms": s.ttft_ms,
        "prefill_ms": s.prefill_ms,
        "decode_ms": s.decode_ms,
        "prompt": s.prompt_tokens,
        "reused": s.reused_tokens,
        "prefilled": s.prefilled_tokens,
        "generated": s.generated_tokens,
    }


def replay(backend: Any, prompts: list[list[int]], *, reuse: bool) -> dict[str, Any]:
    """One job per keystroke; per-keystroke latency and costs."""
    backend.reset_cache()
    run_job(backend, prompts[0], reuse=False)  # the session starts with a warm cache
    rows = []
    outputs = []
    for prompt in prompts:
        tokens, row = run_job(backend, prompt, reuse=reuse)
        rows.append(row)
        outputs.append(tokens)
    decode_tps = [
        (r["generated"] - 1) / (r["decode_ms"] / 1000) for r in rows if r["decode_ms"] > 0
    ]
    return {
        "keystrokes": len(prompts),
        "prompt_tokens": _summary([r["prompt"] for r in rows]),
        "prefilled_tokens": _summary([r["prefilled"] for r in rows]),
        "ttft_ms": _summary([r["ttft_ms"] or 0.0 for r in rows]),
        "total_ms": _summary([r["total_ms"] for r in rows]),
        "decode_tok_s": _summary(decode_tps),
        "generated": sum(r["generated"] for r in rows),
        "_outputs": outputs,
    }


def raw_exllamav2(backend: Any, prompt: list[int], repeats: int = 3) -> dict[str, Any]:
    """exllamav2 alone: prefill a fresh cache, then decode one token per forward."""
    import torch

    model, cache = backend.model, backend.cache
    ids = torch.tensor([prompt], dtype=torch.long)
    prefill, decode = [], []
    with torch.inference_mode():
        for r in range(repeats + 1):
            cache.current_seq_len = 0
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.forward(ids[:, :-1], cache, preprocess_only=True)
            logits = model.forward(ids[:, -1:], cache)
            tok = int(torch.argmax(logits[0, -1]).item())
            t1 = time.perf_counter()
            for _ in range(GENERATED):
                logits = model.forward(torch.tensor([[tok]], dtype=torch.long), cache)
                tok = int(torch.argmax(logits[0, -1]).item())
            t2 = time.perf_counter()
            if r:  # the first round warms up
                prefill.append(len(prompt) / (t1 - t0))
                decode.append(GENERATED / (t2 - t1))
    backend.reset_cache()
    return {
        "prompt_tokens": len(prompt),
        "prefill_tok_s": round(statistics.median(prefill), 1),
        "decode_tok_s": round(statistics.median(decode), 1),
    }


def backend_throughput(backend: Any, prompt: list[int], repeats: int = 3) -> dict[str, Any]:
    """The same through the backend's `stream` (fresh cache each time)."""
    prefill, decode = [], []
    for r in range(repeats + 1):
        _, row = run_job(backend, prompt, reuse=False)
        if r:
            prefill.append(row["prompt"] / (row["prefill_ms"] / 1000))
            decode.append((row["generated"] - 1) / (row["decode_ms"] / 1000))
    return {
        "prompt_tokens": len(prompt),
        "prefill_tok_s": round(statistics.median(prefill), 1),
        "decode_tok_s": round(statistics.median(decode), 1),
    }


def cancel_latency(backend: Any, prompt: list[int], trials: int = 5) -> dict[str, Any]:
    """Time from `cancel.set()` to the end of the stream, during decode and during prefill."""
    out: dict[str, Any] = {}
    for phase in ("decode", "prefill"):
        latencies = []
        for _ in range(trials):
            if phase == "decode":
                run_job(backend, prompt, reuse=False)  # cached: the job starts decoding at once
            job = GenerationJob(
                prompt=prompt, stop_ids=frozenset(), max_tokens=4096, reuse_cache=phase == "decode"
            )
            started = threading.Event()
            count = [0]

            def consume(
                job: GenerationJob = job,
                started: threading.Event = started,
                count: list[int] = count,
            ) -> None:
                for _ in decode(backend, job):
                    count[0] += 1
                    if count[0] == 10:
                        started.set()

            worker = threading.Thread(target=consume)
            worker.start()
            if phase == "decode":
                started.wait(60)
            else:
                time.sleep(0.002)
            t0 = time.perf_counter()
            job.cancel.set()
            worker.join(60)
            latencies.append((time.perf_counter() - t0) * 1000)
        out[f"{phase}_ms"] = _summary(latencies)
    backend.reset_cache()
    return out


def lsp_replay(
    model_dir: Path, backend: str, keystrokes: int, *, reuse: bool, index: bool = True
) -> dict[str, Any]:
    """The typing replay through the language server (benchmarks/latency.py)."""
    from exlsp.benchmarks.latency import run_replay

    workspace = Path(tempfile.mkdtemp(prefix="exlsp-bench-"))
    for name in ("textwrap", "shlex", "json.decoder"):  # files the index can retrieve from
        (workspace / f"{name.replace('.', '_')}.py").write_text(_source(name), encoding="utf-8")
    file = workspace / "argparse_copy.py"
    file.write_text(_source("argparse"), encoding="utf-8")
    init_options = {
        "model": {
            "path": str(model_dir),
            "backend": backend,
            "cacheType": "fp16",
            "maxSeqLen": 8192,
        },
        "completion": {
            "kvReuse": reuse,
            # Without the index there are no snippets: a longer prefix keeps 4k prompts.
            "prefixTokens": 2800 if index else 3900,
            "suffixTokens": 400,
            "snippetTokens": 1100,
            "maxTokens": GENERATED,
            "maxTokensSingleLine": GENERATED,
            "deadlineMs": 20000,
        },
        "index": {"enabled": index},
    }
    server_cmd = [sys.executable, "-m", "exlsp.server", "serve"]
    result = run_replay(
        server_cmd, file, keystrokes=keystrokes, rate_hz=10.0, init_options=init_options
    )
    return dict(result)


# --- the run ---------------------------------------------------------------------------


class Results:
    """The JSON file, merged with what an earlier run wrote, saved after every section."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                self.data = json.loads(path.read_text(encoding="utf-8"))
        self.data.setdefault("sizes", {})

    def put(self, size: str, section: str, value: Any) -> None:
        self.data["sizes"].setdefault(size, {})[section] = value
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n", "utf-8")


def _guarded(results: Results, size: str, section: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as e:
        logger.exception("%s / %s failed", size, section)
        value = {"error": f"{type(e).__name__}: {e}"}
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if not k.startswith("_")}
        value["seconds"] = round(time.perf_counter() - t0, 1)
    results.put(size, section, value)
    return value


def _drop_private(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def bench_size(size: str, args: argparse.Namespace, results: Results) -> None:
    from exlsp.benchmarks import exl2_dynamic
    from exlsp.benchmarks.build_exl2 import build_exl2
    from exlsp.benchmarks.exl2_writer import ensure_exl2_direct
    from exlsp.completion.backends.exllamav2 import load_exllamav2_backend

    only = set(args.only or SECTIONS)
    models = Path(args.models_dir)
    exl2_dir = models / f"{FAMILY}-{size}-exl2-{args.bits}"
    hf_dir = models / f"{FAMILY}-{size}-hf"
    make = ensure_exl2_direct if args.maker == "writer" else build_exl2
    exl2_dir = make(FAMILY, size, exl2_dir, args.bits, hf_dir=hf_dir)
    config = ModelConfig(
        path=str(exl2_dir), backend="exllamav2", cacheType=args.cache_type, maxSeqLen=8192
    )
    backend = load_exllamav2_backend(config)
    session = TypingSession(backend.tokenizer, args.keystrokes)
    prompts = session.prompts
    long_prompt = prompts[-1]
    assert len(long_prompt) >= MIN_PROMPT and len(session.snippets) >= MIN_SNIPPETS
    results.put(
        size,
        "model",
        {
            "exl2_dir": str(exl2_dir),
            "bits": args.bits,
            "cache_type": args.cache_type,
            "vram_gib": round((backend.vram_bytes or 0) / 2**30, 2),
            "prompt_tokens": len(long_prompt),
            "snippet_tokens": len(session.snippets),
            "generated_tokens": GENERATED,
        },
    )
    reference: list[list[int]] = []
    try:
        if "raw" in only:
            _guarded(results, size, "a_raw_exllamav2", lambda: raw_exllamav2(backend, long_prompt))
            _guarded(
                results,
                size,
                "a_backend_exllamav2",
                lambda: backend_throughput(backend, long_prompt),
            )
        if "replay" in only:
            on = replay(backend, prompts, reuse=True)
            reference = on["_outputs"]
            _guarded(results, size, "b_replay_reuse_on", lambda: on)
            _guarded(
                results, size, "c_replay_reuse_off", lambda: replay(backend, prompts, reuse=False)
            )
        if "cancel" in only:
            _guarded(results, size, "cancel_latency", lambda: cancel_latency(backend, long_prompt))
    finally:
        backend.close()
    if "transformers" in only:
        hf_prompts = prompts[: args.hf_keystrokes]

        def transformers() -> dict[str, Any]:
            from exlsp.completion.backends.transformers_backend import TransformersBackend

            hf = TransformersBackend(
                ModelConfig(path=str(hf_dir), device=HF_DEVICE, dtype=HF_DTYPE), hf_dir
            )
            try:
                return {
                    "throughput": backend_throughput(hf, long_prompt),
                    "replay_reuse_on": _drop_private(replay(hf, hf_prompts, reuse=True)),
                    "replay_reuse_off": _drop_private(replay(hf, hf_prompts, reuse=False)),
                }
            finally:
                hf.close()
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

        _guarded(results, size, "d_transformers_fp16", transformers)
    if "lsp" in only:
        for reuse in (True, False):

            def lsp(reuse: bool = reuse) -> dict[str, Any]:
                return lsp_replay(
                    exl2_dir, "exllamav2", args.keystrokes, reuse=reuse, index=not args.no_index
                )

            _guarded(results, size, f"lsp_replay_reuse_{'on' if reuse else 'off'}", lsp)
    if "ngram" in only:

        def ngram() -> dict[str, Any]:
            drafted = load_exllamav2_backend(ModelConfig(**{**config.__dict__, "ngramDraft": True}))
            try:
                r = replay(drafted, prompts, reuse=True)
                r["draft_proposed"] = drafted.draft_proposed
                r["draft_accepted"] = drafted.draft_accepted
                if reference:
                    same = sum(a == b for a, b in zip(r["_outputs"], reference, strict=True))
                    r["same_tokens_as_plain"] = f"{same}/{len(reference)}"
                return r
            finally:
                drafted.close()

        _guarded(results, size, "ngram_draft_on", ngram)
    if "modes" in only:

        def dynamic() -> dict[str, Any]:
            dyn = exl2_dynamic.load_exl2_dynamic(config)
            try:
                r = replay(dyn, prompts, reuse=True)
                r["throughput"] = backend_throughput(dyn, long_prompt)
                if reference:
                    same = sum(a == b for a, b in zip(r["_outputs"], reference, strict=True))
                    r["same_tokens_as_forward"] = f"{same}/{len(reference)}"
                return r
            finally:
                dyn.close()

        _guarded(results, size, "mode_dynamic_reuse_on", dynamic)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def print_table(data: dict[str, Any], out: Any = sys.stdout) -> None:
    rows = [
        ("raw exllamav2 prefill tok/s", ("a_raw_exllamav2", "prefill_tok_s")),
        ("raw exllamav2 decode tok/s", ("a_raw_exllamav2", "decode_tok_s")),
        ("backend prefill tok/s", ("a_backend_exllamav2", "prefill_tok_s")),
        ("backend decode tok/s", ("a_backend_exllamav2", "decode_tok_s")),
        (
            "typing, reuse on: prefilled tokens (median)",
            ("b_replay_reuse_on", "prefilled_tokens", "median"),
        ),
        ("typing, reuse on: ttft ms (median)", ("b_replay_reuse_on", "ttft_ms", "median")),
        ("typing, reuse off: ttft ms (median)", ("c_replay_reuse_off", "ttft_ms", "median")),
        ("typing, reuse on: 32 tokens ms (median)", ("b_replay_reuse_on", "total_ms", "median")),
        ("typing, reuse off: 32 tokens ms (median)", ("c_replay_reuse_off", "total_ms", "median")),
        (
            "dynamic mode, reuse on: ttft ms (median)",
            ("mode_dynamic_reuse_on", "ttft_ms", "median"),
        ),
        ("dynamic mode: decode tok/s", ("mode_dynamic_reuse_on", "throughput", "decode_tok_s")),
        ("n-gram on: 32 tokens ms (median)", ("ngram_draft_on", "total_ms", "median")),
        ("transformers fp16 prefill tok/s", ("d_transformers_fp16", "throughput", "prefill_tok_s")),
        ("transformers fp16 decode tok/s", ("d_transformers_fp16", "throughput", "decode_tok_s")),
        (
            "transformers, reuse on: ttft ms (median)",
            ("d_transformers_fp16", "replay_reuse_on", "ttft_ms", "median"),
        ),
        ("cancel during decode ms (max)", ("cancel_latency", "decode_ms", "max")),
        ("cancel during prefill ms (max)", ("cancel_latency", "prefill_ms", "max")),
    ]
    sizes = list(data.get("sizes", {}))
    width = max(len(r[0]) for r in rows)
    out.write(f"{'':<{width}}  " + "  ".join(f"{s:>10}" for s in sizes) + "\n")
    for label, keys in rows:
        cells = []
        for s in sizes:
            v = _get(data["sizes"][s], *keys)
            cells.append(f"{v:>10.1f}" if isinstance(v, int | float) else f"{'-':>10}")
        out.write(f"{label:<{width}}  " + "  ".join(cells) + "\n")
    for s in sizes:
        d = data["sizes"][s]
        on = _get(d, "b_replay_reuse_on", "ttft_ms", "median")
        off = _get(d, "c_replay_reuse_off", "ttft_ms", "median")
        exl = _get(d, "a_backend_exllamav2", "decode_tok_s")
        hf = _get(d, "d_transformers_fp16", "throughput", "decode_tok_s")
        if on and off:
            out.write(f"{s}: KV reuse makes the first token {off / on:.1f}x sooner\n")
        if exl and hf:
            out.write(f"{s}: exllamav2 decodes {exl / hf:.1f}x faster than transformers fp16\n")


def _cuda_ok() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exlsp.benchmarks.gpu_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--sizes", nargs="+", default=["1.5b", "7b"])
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument("--cache-type", default="fp16", choices=["fp16", "q8", "q6", "q4"])
    parser.add_argument("--keystrokes", type=int, default=50)
    parser.add_argument(
        "--hf-keystrokes", type=int, default=20, help="keystrokes of the transformers replays"
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS)
    parser.add_argument(
        "--maker",
        choices=["writer", "converter"],
        default="writer",
        help="EXL2 model by exl2_writer (seconds) or exllamav2's converter (minutes)",
    )
    parser.add_argument("--no-index", action="store_true", help="LSP replay with the index off")
    parser.add_argument("--name", help="results file name: gpu-<name>.json (default: the GPU)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not _cuda_ok():
        print("gpu_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    info = machine_info((*PACKAGES, "flash-attn"))
    info["date"] = now()
    info["commit"] = commit_info()
    name = args.name or re.sub(r"[^a-z0-9]+", "-", str(info.get("gpu", "gpu")).lower()).strip("-")
    results = Results(args.results_dir / f"gpu-{name}.json")
    results.data["machine"] = info
    results.data["settings"] = {
        "generated_tokens": GENERATED,
        "keystrokes": args.keystrokes,
        "bits": args.bits,
        "cache_type": args.cache_type,
        "min_prompt_tokens": MIN_PROMPT,
    }
    results.save()
    for size in args.sizes:
        bench_size(size, args, results)
    print_table(results.data)
    print(results.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
