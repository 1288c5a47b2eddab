"""The GPU backend: EXL2 weights resident on a CUDA GPU, driven by exllamav2 0.3.2.

Two generation modes share the KV cache contract of the reference backend
(keep one sequence's cache between jobs, reuse its longest common prefix with
the new prompt, prefill at least the last prompt token, decode greedily):

``forward`` (the default) is a small greedy loop over ``model.forward(ids, cache)``.
The cache is one sequence; rewinding it is setting ``cache.current_seq_len`` to the
common-prefix length, because every attention call reads keys/values
``[0, past_len)`` and writes ``[past_len, past_len + q_len)`` (for the Q4/Q6/Q8
caches too: their writes re-quantize from the aligned block start). Why this over
the dynamic generator, from reading exllamav2 0.3.2's sources:

- reuse is the same token-level longest common prefix (the unpaged dynamic
  generator compares the job with its single page up to ``kv_position_revert``),
  so the generator brings no reuse the loop lacks; its paged mode needs
  flash-attn and reuses only whole 256-token pages plus one partial page;
- per token the generator copies the full-vocabulary logits to a pinned float32
  host buffer, samples on the CPU, decodes text, hashes pages and holds back
  tokens that end in a partial UTF-8 character (held tokens arrive late, or only
  in the final result's ``held`` entry); the loop does one on-GPU argmax and one
  8-byte copy, which matters for a 1.5B model whose decode step is ~2-3 ms;
- cancellation: ``iterate()`` prefills a whole chunk (up to ``max_input_len``)
  before it returns, while ``model.forward`` takes an ``abort_event`` it checks
  between layers, so a stale keystroke or the deadline stops a long prefill at
  once; the chunks already done stay in the cache for the next job;
- with n-gram drafting the generator stops ``num_draft_tokens`` short of
  ``max_new_tokens``, and a failed ``iterate()`` leaves its page table in an
  unknown state; the loop's only state is ``(current_seq_len, token list)``;
- it needs no ``ExLlamaV2Tokenizer`` (prompts are ``HfTokenizer`` ids for every
  backend) and no flash-attn (without it exllamav2 uses torch SDPA).

``dynamic`` drives ``ExLlamaV2DynamicGenerator(paged=False)`` with greedy settings
and the job's stop ids, kept selectable (``generation="dynamic"`` or the
``EXLSP_EXLLAMAV2_GENERATION`` environment variable) so that
``benchmarks/gpu_bench.py`` can measure both on a GPU.

On a GPU, reuse is exact up to floating-point rounding: a prompt prefilled in
one chunk and the same prompt prefilled as cached prefix + new tokens run
kernels of different shapes (and a Q cache stores the prefix quantized, while a
chunk attends to its own keys in FP16), so greedy tokens can differ where the
top two logits nearly tie. The unit tests check exactness on a deterministic
fake; the GPU test checks agreement up to such ties.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from exlsp.completion.backends.base import GenerationJob, ModelInfo, common_prefix_length
from exlsp.completion.config import ModelConfig
from exlsp.completion.tokenizer import HfTokenizer, Tokenizer

log = logging.getLogger(__name__)

EXTENSION_NAME = "exllamav2_ext"
# A torch JIT build holds `<build dir>/lock` for its whole duration and removes it at
# the end; a killed build leaves it behind and every later import waits on it forever.
STALE_LOCK_AGE_S = 300.0
SEQ_LEN_MULTIPLE = 256  # the dynamic generator's page size; Q caches align to it too
GENERATION_MODES = ("forward", "dynamic")
GENERATION_ENV = "EXLSP_EXLLAMAV2_GENERATION"

CACHE_CLASSES = {
    "fp16": "ExLlamaV2Cache",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}
# Bytes per cached key + value element (the Q caches add one FP16 scale per 32).
_CACHE_BYTES_PER_KV_PAIR = {"fp16": 4.0, "q8": 2.0 + 4 / 32, "q6": 1.5 + 4 / 32, "q4": 1.0 + 4 / 32}


class ExLlamaV2LoadError(RuntimeError):
    """The exllamav2 backend cannot start; the message says why and what to do."""


class StaleExtensionLockError(ExLlamaV2LoadError):
    def __init__(self, lock: Path, age_s: float) -> None:
        self.lock = lock
        super().__init__(
            f"exllamav2's CUDA extension build is locked by {lock}, left {age_s / 60:.0f} min ago "
            "by an interrupted build (no build is running): importing exllamav2 would wait "
            f"forever. Delete it and start again: rm '{lock}'"
        )


class GpuOutOfMemoryError(RuntimeError):
    """The GPU ran out of memory (loading the model, or during a generation)."""


# --- the torch extensions build lock -------------------------------------------


def extension_build_dir(torch_module: Any | None = None) -> Path:
    """Where torch's JIT loader builds (and locks) exllamav2's extension.

    Mirrors `torch.utils.cpp_extension._get_build_directory`: `$TORCH_EXTENSIONS_DIR/<name>`,
    else `<user cache>/torch_extensions/py<maj><min>_<cuXYZ|rocmXYZ|cpu>/<name>`.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / EXTENSION_NAME
    if torch_module is None:
        import torch

        torch_module = torch
    version: Any = torch_module.version
    if getattr(version, "hip", None):
        accel = "rocm" + str(version.hip).replace(".", "")
    elif getattr(version, "cuda", None):
        accel = "cu" + str(version.cuda).replace(".", "")
    else:
        accel = "cpu"
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    base = Path(os.path.realpath(os.path.join(cache_home, "torch_extensions")))
    return base / f"{tag}_{accel}" / EXTENSION_NAME


def _lock_holder_alive(lock: Path) -> bool | None:
    """Whether a live process holds `lock` open (torch's baton keeps its fd open).

    None when that cannot be told (no /proc, or nothing readable in it).
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    target = os.path.realpath(lock)
    readable = False
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue
        readable = True
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return True
            except OSError:
                continue
    return False if readable else None


def _newest_mtime(directory: Path) -> float:
    newest = 0.0
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def find_stale_extension_lock(
    build_dir: Path | None = None,
    *,
    max_age_s: float = STALE_LOCK_AGE_S,
    now: float | None = None,
    holder_alive: Callable[[Path], bool | None] = _lock_holder_alive,
) -> tuple[Path, float] | None:
    """The build lock and its age, when it is stale: older than `max_age_s`, held open
    by no live process, and with no file in the build dir written for `max_age_s`."""
    build_dir = build_dir if build_dir is not None else extension_build_dir()
    lock = build_dir / "lock"
    try:
        mtime = lock.stat().st_mtime
    except OSError:
        return None
    now = time.time() if now is None else now
    age = now - mtime
    if age < max_age_s:
        return None
    if holder_alive(lock):
        return None
    if now - _newest_mtime(build_dir) < max_age_s:
        return None  # a build elsewhere (another container sharing the cache) is writing
    return lock, age


def _extension_is_built(build_dir: Path) -> bool:
    with contextlib.suppress(OSError):
        return any(p.suffix == ".so" for p in build_dir.iterdir())
    return False


def import_exllamav2(torch_module: Any | None = None) -> ModuleType:
    """Import exllamav2 (which JIT-builds its CUDA extension the first time).

    A stale build lock raises `StaleExtensionLockError` instead of hanging.
    exllamav2 prints to stdout while it builds; stdout may be the LSP channel,
    so the import runs with `sys.stdout` pointed at stderr.
    """
    if "exllamav2" in sys.modules:
        return sys.modules["exllamav2"]
    build_dir = extension_build_dir(torch_module)
    stale = find_stale_extension_lock(build_dir)
    if stale is not None:
        raise StaleExtensionLockError(*stale)
    if _extension_is_built(build_dir):
        log.info("loading exllamav2 (CUDA extension built in %s)", build_dir)
    else:
        log.warning(
            "compiling exllamav2 CUDA extension (first run, can take minutes) in %s", build_dir
        )
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            module = importlib.import_module("exllamav2")
    except ImportError as e:
        raise ExLlamaV2LoadError(
            f"cannot import exllamav2 ({e}); install it with `pip install exllamav2==0.3.2` "
            "(and `tokenizers`); its CUDA extension needs nvcc matching torch's CUDA, "
            "ninja and a C++ compiler"
        ) from e
    log.info("imported exllamav2 in %.1f s", time.perf_counter() - t0)
    return module


# --- model directory facts (no exllamav2 needed) ---------------------------------


def read_model_config(model_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor names, dtypes, shapes)."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 1024 * 1024:
            raise ValueError(f"{path}: safetensors header of {size} bytes")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: bad safetensors header")
    return header


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def safetensors_parameter_count(model_dir: Path) -> int | None:
    """Parameters of the model's weights, from the safetensors headers only.

    An EXL2 linear layer is stored packed (`q_weight`, `q_scale`, `q_groups`, ...);
    its original size is `len(q_invperm)` (input features) x `q_weight.shape[1]`.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for file in files:
        for name, meta in read_safetensors_header(file).items():
            if name != "__metadata__" and isinstance(meta, dict):
                shapes[name] = list(meta.get("shape") or [])
    total = 0
    packed_aux = (".q_scale", ".q_scale_max", ".q_groups", ".q_perm", ".q_invperm", ".q_group_map")
    for name, shape in shapes.items():
        if name.endswith(".q_weight"):
            base = name.removesuffix(".q_weight")
            rows = shapes.get(base + ".q_invperm") or shapes.get(base + ".q_perm")
            in_features = rows[0] if rows else shape[0] * 32 // 4
            total += in_features * (shape[1] if len(shape) > 1 else 1)
        elif not name.endswith(packed_aux):
            total += _numel(shape)
    return total


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def kv_cache_bytes(model_cfg: dict[str, Any], max_seq_len: int, cache_type: str) -> int:
    """Approximate VRAM of an exllamav2 cache (Q caches also keep FP16 scratch K/V)."""
    text_cfg = (
        model_cfg.get("text_config") if isinstance(model_cfg.get("text_config"), dict) else None
    )
    cfg = text_cfg or model_cfg
    layers = int(cfg.get("num_hidden_layers") or 0)
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or (int(cfg.get("hidden_size") or 0) // max(heads, 1)))
    per_pos = kv_heads * head_dim
    total = layers * max_seq_len * per_pos * _CACHE_BYTES_PER_KV_PAIR.get(cache_type, 4.0)
    if cache_type != "fp16":
        total += 2 * max_seq_len * per_pos * 2
    return int(total)


def round_seq_len(n: int) -> int:
    """`n` rounded up to a multiple of 256 (at least 256)."""
    return max(SEQ_LEN_MULTIPLE, -(-int(n) // SEQ_LEN_MULTIPLE) * SEQ_LEN_MULTIPLE)


def is_out_of_memory(error: BaseException) -> bool:
    if type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return "out of memory" in text.lower() or "Insufficient VRAM" in text


# --- generation helpers -------------------------------------------------------------


class _StopSignal:
    """Duck-typed `abort_event` for `model.forward`: set once the job is cancelled or
    past its deadline, so a long prefill stops between two layers."""

    def __init__(self, job: GenerationJob) -> None:
        self._job = job

    def is_set(self) -> bool:
        return self._job.should_stop() is not None


class NgramDraft:
    """Prompt-lookup drafting: after the most recent earlier occurrence of the last
    `n` tokens (n from `max_ngram` down to `min_ngram`), propose what followed it.

    FIM completions often copy identifiers and whole lines from the prompt; the
    model then verifies the proposal in one forward pass.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, max_tokens: int = 4) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_tokens = max_tokens

    def propose(self, seq: Any, length: int, limit: int | None = None) -> list[int]:
        """Draft tokens to follow `seq[:length]` (`seq`: a 1-D numpy integer array)."""
        limit = self.max_tokens if limit is None else min(limit, self.max_tokens)
        if limit <= 0:
            return []
        import numpy as np

        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if length <= n:
                continue
            tail = seq[length - n : length]
            # Starts i <= length - n - 1: the match ends before the tail itself does,
            # so at least one token follows it.
            idx = np.flatnonzero(seq[: length - n] == tail[0])
            for j in range(1, n):
                if idx.size == 0:
                    break
                idx = idx[seq[idx + j] == tail[j]]
            if idx.size:
                start = int(idx[-1]) + n
                return [int(t) for t in seq[start : min(start + limit, length)]]
        return []


@dataclass
class DynamicGeneratorApi:
    """What the `dynamic` mode needs from exllamav2 (fakes replace it in unit tests)."""

    make_generator: Callable[[], Any]  # -> ExLlamaV2DynamicGenerator(paged=False)
    make_job: Callable[[list[int], int, list[int]], Any]  # (ids, max_new_tokens, stop ids)
    num_draft_tokens: int = 0


# --- the backend ----------------------------------------------------------------


class ExLlamaV2Backend:
    """One sequence's KV cache on the GPU; driven from one worker thread."""

    name = "exllamav2"

    def __init__(
        self,
        model: Any,
        cache: Any,
        tokenizer: Tokenizer,
        info: ModelInfo,
        *,
        generation: str = "forward",
        ngram_draft: bool = False,
        ngram: NgramDraft | None = None,
        dynamic: DynamicGeneratorApi | None = None,
        on_close: Callable[[], None] | None = None,
        cache_factory: Callable[[], Any] | None = None,
    ) -> None:
        import numpy
        import torch

        if generation not in GENERATION_MODES:
            raise ValueError(f"generation must be one of {GENERATION_MODES}, not {generation!r}")
        if generation == "dynamic" and dynamic is None:
            raise ValueError("generation='dynamic' needs the dynamic generator api")
        self._torch = torch
        self._np = numpy
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        self.info = info
        self.generation = generation
        self.ngram_draft = ngram_draft
        self._ngram = (ngram or NgramDraft()) if ngram_draft else None
        self._dynamic = dynamic
        self._generator: Any = None
        self._on_close = on_close
        self._cached: list[int] = []  # tokens whose K/V are in the cache, in order
        # Background work (hover, code actions) gets a cache of its own, made at its
        # first job, so that it never evicts the completion's prompt; the slot not in
        # use is parked here with its token list.
        self._cache_factory = cache_factory
        self._slot = "main"
        self._parked: dict[str, tuple[Any, list[int]]] = {}
        self.max_slots = 4  # caches kept, the current one included (a model host's `hostSlots`)
        self.vram_bytes: int | None = None  # set by the loader
        # n-gram drafting, over the backend's life (for benchmarks)
        self.draft_proposed = 0
        self.draft_accepted = 0

    @property
    def max_seq_len(self) -> int:
        return int(self.cache.max_seq_len)

    # -- KV cache ------------------------------------------------------------

    def reset_cache(self) -> None:
        self._cached = []
        if self.cache is not None:
            self.cache.current_seq_len = 0
        if self._generator is not None:
            self._generator.reset_page_table()

    def _keep(self, n: int) -> None:
        del self._cached[n:]
        self.cache.current_seq_len = n

    def _use_slot(self, slot: str) -> None:
        """Switch to `slot`'s cache (forward mode), making it at its first use.

        Where a second cache cannot be had (no factory, the dynamic generator, or
        no GPU memory for it), every slot shares the one cache, as before.
        """
        if slot == self._slot or self.generation != "forward":
            return
        if slot not in self._parked and self._parked and len(self._parked) + 2 > self.max_slots:
            # All slots taken (a model host's editors): the least recently used cache serves.
            self._parked[slot] = (self._parked.pop(next(iter(self._parked)))[0], [])
        if slot not in self._parked:
            if self._cache_factory is None:
                return
            try:
                cache = self._cache_factory()
            except Exception as e:
                self._cache_factory = None
                if not is_out_of_memory(e):
                    raise
                self._release_memory()
                log.warning(
                    "exllamav2: no GPU memory for a second KV cache; background work "
                    "(hover, code actions) shares the completion cache (%s)",
                    str(e).splitlines()[0] if str(e) else type(e).__name__,
                )
                return
            self._parked[slot] = (cache, [])
        self._parked[self._slot] = (self.cache, self._cached)
        self.cache, self._cached = self._parked.pop(slot)
        self._slot = slot

    def _forward(self, ids: list[int], *, last_only: bool, abort: Any) -> Any:
        """Run `ids` after the cached tokens; the logits, or None if aborted.

        Whatever was processed before an abort (whole prefill chunks) stays cached.
        """
        torch = self._torch
        before = self.cache.current_seq_len
        input_ids = torch.tensor([ids], dtype=torch.long)
        try:
            logits = self.model.forward(
                input_ids, self.cache, last_id_only=last_only, abort_event=abort
            )
        finally:
            done = self.cache.current_seq_len - before
            self._cached.extend(ids[: max(done, 0)])
        return logits

    def _recover(self, job: GenerationJob, error: BaseException) -> GpuOutOfMemoryError | None:
        """Reset after a failed step. For an out-of-memory error, the error to raise
        once the original exception (whose frames hold GPU tensors) is released."""
        job.stats.stop_reason = "error"
        self._generator = None  # rebuilt on next use (dynamic mode)
        self.reset_cache()
        if not is_out_of_memory(error):
            return None
        return GpuOutOfMemoryError(
            f"GPU out of memory while generating ({len(job.prompt)} prompt tokens, "
            f"KV cache of {self.max_seq_len} tokens); the KV cache was reset, "
            "the next request starts from an empty cache"
        )

    def _release_memory(self) -> None:
        gc.collect()
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()

    # -- generation ----------------------------------------------------------

    def stream(self, job: GenerationJob) -> Iterator[int]:
        if self.generation == "dynamic":
            return self._stream_dynamic(job)
        return self._stream_forward(job)

    def _fit(self, job: GenerationJob, reserve: int) -> tuple[list[int], int]:
        prompt = list(job.prompt)
        if not prompt:
            raise ValueError("empty prompt")
        max_tokens = max(0, min(job.max_tokens, self.max_seq_len - 1 - reserve))
        room = self.max_seq_len - max_tokens - reserve
        if len(prompt) > room:
            # Keep the end of the prompt (the cursor side); the engine's budgets
            # normally prevent this.
            prompt = prompt[-room:]
        return prompt, max_tokens

    def _stream_forward(self, job: GenerationJob) -> Iterator[int]:
        torch = self._torch
        stats = job.stats
        draft = self._ngram
        reserve = draft.max_tokens if draft else 0
        self._use_slot(job.slot)
        prompt, max_tokens = self._fit(job, reserve)
        if not job.reuse_cache:
            self.reset_cache()
        t0 = time.perf_counter()
        stats.prompt_tokens = len(prompt)
        reason = job.should_stop()
        if reason:
            stats.stop_reason = reason
            return
        abort = _StopSignal(job)
        oom: GpuOutOfMemoryError | None = None
        try:
            # At least the last prompt token is prefilled: its logits give the first token.
            keep = min(common_prefix_length(self._cached, prompt), len(prompt) - 1)
            self._keep(keep)
            stats.reused_tokens = keep
            logits = self._forward(prompt[keep:], last_only=True, abort=abort)
            stats.prefilled_tokens = len(self._cached) - keep
            if logits is None:
                stats.stop_reason = job.should_stop() or "cancelled"
                return
            pending = [int(torch.argmax(logits[0, -1]).item())]
            stats.prefill_ms = (time.perf_counter() - t0) * 1000
            if max_tokens <= 0:
                stats.stop_reason = "max_tokens"
                return
            seq = None
            if draft is not None:
                seq = self._np.zeros(len(prompt) + max_tokens + reserve + 1, dtype=self._np.int64)
                seq[: len(prompt)] = prompt
            length = len(prompt)
            generated = 0
            # `pending`: greedy tokens not yet in the cache (the first one never is).
            while True:
                for token in pending:
                    if token in job.stop_ids:
                        stats.stop_reason = "eos"
                        return
                    generated += 1
                    stats.generated_tokens = generated
                    if stats.ttft_ms is None:
                        stats.ttft_ms = (time.perf_counter() - t0) * 1000
                    if seq is not None:
                        seq[length] = token
                    length += 1
                    yield token
                    if generated >= max_tokens:
                        stats.stop_reason = "max_tokens"
                        return
                    reason = job.should_stop()
                    if reason:
                        stats.stop_reason = reason
                        return
                nxt = pending[-1]
                room = self.max_seq_len - len(self._cached) - 1
                if room < 0:
                    stats.stop_reason = "context_full"
                    return
                proposal: list[int] = []
                if draft is not None and seq is not None:
                    proposal = draft.propose(seq, length, min(room, max_tokens - generated - 1))
                logits = self._forward([nxt, *proposal], last_only=False, abort=abort)
                if logits is None:
                    stats.stop_reason = job.should_stop() or "cancelled"
                    return
                if not proposal:
                    pending = [int(torch.argmax(logits[0, -1]).item())]
                    continue
                greedy = [int(t) for t in torch.argmax(logits[0], dim=-1).tolist()]
                accepted = 0
                while accepted < len(proposal) and proposal[accepted] == greedy[accepted]:
                    accepted += 1
                # Cached: nxt + the accepted drafts; the rejected drafts are dropped.
                self._keep(len(self._cached) - (len(proposal) - accepted))
                pending = greedy[: accepted + 1]
                self.draft_proposed += len(proposal)
                self.draft_accepted += accepted
        except GeneratorExit:
            stats.stop_reason = stats.stop_reason or "closed"
            raise
        except Exception as e:
            oom = self._recover(job, e)
            if oom is None:
                raise
        finally:
            if stats.prefill_ms:
                stats.decode_ms = (time.perf_counter() - t0) * 1000 - stats.prefill_ms
        # Only reached after an out-of-memory error, now released with its frames.
        self._release_memory()
        raise oom

    def _stream_dynamic(self, job: GenerationJob) -> Iterator[int]:
        assert self._dynamic is not None
        stats = job.stats
        api = self._dynamic
        prompt, max_tokens = self._fit(job, api.num_draft_tokens)
        if self._generator is None:
            self._generator = api.make_generator()
        gen = self._generator
        if not job.reuse_cache:
            self.reset_cache()
        t0 = time.perf_counter()
        stats.prompt_tokens = len(prompt)
        reason = job.should_stop()
        if reason:
            stats.stop_reason = reason
            return
        # The generator ends n-gram jobs `num_draft_tokens` early: ask for more, cut here.
        djob = api.make_job(prompt, max_tokens + api.num_draft_tokens, sorted(job.stop_ids))
        gen.enqueue(djob)
        generated = 0
        finished = False
        oom: GpuOutOfMemoryError | None = None
        try:
            while not finished:
                reason = job.should_stop()
                if reason:
                    stats.stop_reason = reason
                    return
                for r in gen.iterate():
                    if r.get("job") is not djob or r.get("stage") != "streaming":
                        continue
                    if not stats.prefill_ms:
                        stats.reused_tokens = int(getattr(djob, "cached_tokens", 0))
                        stats.prefilled_tokens = len(prompt) - stats.reused_tokens
                        stats.prefill_ms = (time.perf_counter() - t0) * 1000
                    ids: list[int] = []
                    if r.get("token_ids") is not None:
                        ids += [int(t) for t in r["token_ids"].flatten().tolist()]
                    held = r.get("held") or {}
                    if r.get("eos") and held.get("token_ids") is not None:
                        ids += [int(t) for t in held["token_ids"].flatten().tolist()]
                    for token in ids:
                        if token in job.stop_ids:
                            stats.stop_reason = "eos"
                            finished = True
                            break
                        generated += 1
                        stats.generated_tokens = generated
                        if stats.ttft_ms is None:
                            stats.ttft_ms = (time.perf_counter() - t0) * 1000
                        yield token
                        if generated >= max_tokens:
                            stats.stop_reason = "max_tokens"
                            return
                        reason = job.should_stop()
                        if reason:
                            stats.stop_reason = reason
                            return
                    if r.get("eos") and not finished:
                        finished = True
                        eos_reason = r.get("eos_reason")
                        stats.stop_reason = (
                            "max_tokens" if eos_reason == "max_new_tokens" else "eos"
                        )
        except GeneratorExit:
            stats.stop_reason = stats.stop_reason or "closed"
            raise
        except Exception as e:
            oom = self._recover(job, e)
            if oom is None:
                raise
        finally:
            if self._generator is gen and not getattr(djob, "is_finished", finished):
                with contextlib.suppress(Exception):
                    gen.cancel(djob)  # keeps what was cached (unpaged: page backup)
            if stats.prefill_ms:
                stats.decode_ms = (time.perf_counter() - t0) * 1000 - stats.prefill_ms
        if oom is not None:
            self._release_memory()
            raise oom

    def close(self) -> None:
        self._generator = None
        self._cached = []
        self._parked.clear()
        if self.model is not None:
            with contextlib.suppress(Exception):
                self.model.unload()
        self.model = None
        self.cache = None
        if self._on_close is not None:
            self._on_close()


# --- loading ----------------------------------------------------------------------


def _cuda_summary(torch: Any) -> tuple[str, float, float]:
    """GPU name, free and total GiB of device 0."""
    free, total = torch.cuda.mem_get_info(0)
    return torch.cuda.get_device_name(0), free / 2**30, total / 2**30


def _release_cuda(torch: Any) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_exllamav2_backend(
    config: ModelConfig,
    model_dir: Path | str | None = None,
    *,
    generation: str | None = None,
    warmup: bool = True,
) -> ExLlamaV2Backend:
    """Load an EXL2 model directory onto the GPU(s) with a KV cache of `config.maxSeqLen`."""
    path = Path(model_dir or config.path).expanduser()
    if not str(model_dir or config.path):
        raise ExLlamaV2LoadError("the exllamav2 backend needs model.path: an EXL2 model directory")
    if not (path / "config.json").is_file():
        raise ExLlamaV2LoadError(f"{path} is not a model directory (no config.json)")
    if config.cacheType not in CACHE_CLASSES:
        raise ExLlamaV2LoadError(
            f"model.cacheType {config.cacheType!r}: use one of {', '.join(CACHE_CLASSES)}"
        )
    generation = generation or os.environ.get(GENERATION_ENV) or "forward"
    if generation not in GENERATION_MODES:
        raise ExLlamaV2LoadError(f"generation mode {generation!r}: use one of {GENERATION_MODES}")
    if config.device == "cpu":
        raise ExLlamaV2LoadError("the exllamav2 backend runs on CUDA GPUs only (model.device=cpu)")

    import torch

    if not torch.cuda.is_available():
        raise ExLlamaV2LoadError(
            f"the exllamav2 backend needs a CUDA GPU; torch {torch.__version__} "
            f"({'CUDA ' + str(torch.version.cuda) if torch.version.cuda else 'a CPU-only build'}) "
            "sees none. Use model.backend=transformers on this machine"
        )
    if config.device not in ("auto", "cuda", "cuda:0"):
        log.warning(
            "exllamav2 fills GPUs from cuda:0 on; pick GPUs with CUDA_VISIBLE_DEVICES "
            "(model.device=%s ignored)",
            config.device,
        )
    exl = import_exllamav2(torch)
    tokenizer = HfTokenizer(path)
    model_cfg = read_model_config(path)
    max_seq_len = round_seq_len(config.maxSeqLen)

    gpu, free_gib, total_gib = _cuda_summary(torch)
    model: Any = None
    cache: Any = None
    failure: str | None = None
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # exllamav2 prints; stdout may be LSP
        try:
            exl_config = exl.ExLlamaV2Config(str(path))
            exl_config.arch_compat_overrides(quiet=True)
            exl_config.max_seq_len = max_seq_len
            exl_config.max_input_len = min(exl_config.max_input_len, max_seq_len)
            model = exl.ExLlamaV2(exl_config)
            cache = getattr(exl, CACHE_CLASSES[config.cacheType])(
                model, max_seq_len=max_seq_len, lazy=True
            )
            model.load_autosplit(cache, progress=False)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            failure = str(e).splitlines()[0] if str(e) else type(e).__name__
    if failure is not None:
        # The exception (and its frames holding tensors) is gone: free everything, so a
        # later load with smaller settings can succeed in this process.
        with contextlib.suppress(Exception):
            model.unload()
        model = cache = None
        _release_cuda(torch)
        need_w = weights_bytes(path) / 2**30
        need_c = kv_cache_bytes(model_cfg, max_seq_len, config.cacheType) / 2**30
        raise GpuOutOfMemoryError(
            f"not enough GPU memory for {path.name}: weights {need_w:.2f} GiB + {config.cacheType} "
            f"KV cache {need_c:.2f} GiB (maxSeqLen {max_seq_len}) > {free_gib:.2f} GiB free of "
            f"{total_gib:.2f} GiB on {gpu}; lower model.maxSeqLen or cacheType ({failure})"
        )

    _, free_after, _ = _cuda_summary(torch)
    quant = model_cfg.get("quantization_config")
    bits = quant.get("bits") if isinstance(quant, dict) else None
    info = ModelInfo(
        path=str(path),
        backend="exllamav2",
        architectures=tuple(model_cfg.get("architectures") or ()),
        model_type=str(model_cfg.get("model_type", "")),
        context_length=max_seq_len,
        parameters=safetensors_parameter_count(path),
        device="cuda",
        dtype=f"exl2-{bits}bpw" if bits else "exl2",
    )
    dynamic = None
    if generation == "dynamic":
        dynamic = _dynamic_api(exl, model, cache, exl_config, config.ngramDraft)
    backend = ExLlamaV2Backend(
        model,
        cache,
        tokenizer,
        info,
        generation=generation,
        ngram_draft=config.ngramDraft,
        dynamic=dynamic,
        on_close=lambda: _release_cuda(torch),
        # Made after the model is loaded: it lands on the devices of the model's layers.
        cache_factory=lambda: getattr(exl, CACHE_CLASSES[config.cacheType])(
            model, max_seq_len=max_seq_len
        ),
    )
    backend.vram_bytes = int((free_gib - free_after) * 2**30)
    if warmup:
        # First forward passes autotune kernels and capture graphs: pay that now, not
        # on the user's first keystroke.
        with torch.inference_mode():
            backend._forward([0] * 8, last_only=True, abort=None)
            backend._forward([0], last_only=True, abort=None)
        backend.reset_cache()
    log.info(
        "exllamav2: loaded %s on %s in %.1f s (%.2f GiB VRAM, %s cache of %d tokens, "
        "generation=%s, ngram draft %s)",
        path,
        gpu,
        time.perf_counter() - t0,
        backend.vram_bytes / 2**30,
        config.cacheType,
        max_seq_len,
        generation,
        "on" if config.ngramDraft else "off",
    )
    return backend


def _dynamic_api(
    exl: Any, model: Any, cache: Any, exl_config: Any, ngram: bool
) -> DynamicGeneratorApi:
    from exllamav2.generator import (
        ExLlamaV2DynamicGenerator,
        ExLlamaV2DynamicJob,
        ExLlamaV2Sampler,
    )

    tokenizer = exl.ExLlamaV2Tokenizer(exl_config)
    num_draft = 4 if ngram else 0
    settings = ExLlamaV2Sampler.Settings.greedy()

    def make_generator() -> Any:
        # max_batch_size=1: the default sizes a pinned logits buffer for 256 sequences.
        return ExLlamaV2DynamicGenerator(
            model,
            cache,
            tokenizer,
            paged=False,
            max_batch_size=1,
            use_ngram_draft=ngram,
            num_draft_tokens=max(num_draft, 1),
            filter_background_eval=False,
            max_sampling_threads=1,
        )

    def make_job(ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> Any:
        import torch

        return ExLlamaV2DynamicJob(
            input_ids=torch.tensor([ids], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            gen_settings=settings,
            stop_conditions=stop_ids,
            decode_special_tokens=True,
        )

    return DynamicGeneratorApi(make_generator, make_job, num_draft)
