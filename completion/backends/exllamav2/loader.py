"""Loading an EXL2 model directory onto the GPU(s) as an `ExLlamaV2Backend`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from exlsp.completion.backends.base import ModelInfo
from exlsp.completion.backends.exllamav2.backend import ExLlamaV2Backend
from exlsp.completion.backends.exllamav2.extension import ExLlamaV2LoadError, import_exllamav2
from exlsp.completion.backends.exllamav2.model_dir import (
    kv_cache_bytes,
    round_seq_len,
    safetensors_parameter_count,
    weights_bytes,
)
from exlsp.completion.backends.gpu import (
    GpuOutOfMemoryError,
    cuda_summary,
    is_out_of_memory,
    release_cuda,
)
from exlsp.completion.config import ModelConfig
from exlsp.completion.models import read_model_config
from exlsp.completion.tokenizer import HfTokenizer

log = logging.getLogger(__name__)

# Named the dynamic generator mode, which moved to benchmarks/exl2_dynamic.py.
RETIRED_GENERATION_ENV = "EXLSP_EXLLAMAV2_GENERATION"

CACHE_CLASSES = {
    "fp16": "ExLlamaV2Cache",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}


def load_exllamav2_backend(
    config: ModelConfig,
    model_dir: Path | str | None = None,
    *,
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
    retired = os.environ.get(RETIRED_GENERATION_ENV, "forward")
    if retired not in ("", "forward"):
        raise ExLlamaV2LoadError(
            f"{RETIRED_GENERATION_ENV}={retired}: the exllamav2 backend has one generation "
            "mode (forward); the dynamic generator is a benchmark "
            f"(benchmarks/exl2_dynamic.py). Unset {RETIRED_GENERATION_ENV}"
        )
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

    gpu, free_gib, total_gib = cuda_summary(torch)
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
        release_cuda(torch)
        need_w = weights_bytes(path) / 2**30
        need_c = kv_cache_bytes(model_cfg, max_seq_len, config.cacheType) / 2**30
        raise GpuOutOfMemoryError(
            f"not enough GPU memory for {path.name}: weights {need_w:.2f} GiB + {config.cacheType} "
            f"KV cache {need_c:.2f} GiB (maxSeqLen {max_seq_len}) > {free_gib:.2f} GiB free of "
            f"{total_gib:.2f} GiB on {gpu}; lower model.maxSeqLen or cacheType ({failure})"
        )

    _, free_after, _ = cuda_summary(torch)
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
    backend = ExLlamaV2Backend(
        model,
        cache,
        tokenizer,
        info,
        ngram_draft=config.ngramDraft,
        on_close=lambda: release_cuda(torch),
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
        "ngram draft %s)",
        path,
        gpu,
        time.perf_counter() - t0,
        backend.vram_bytes / 2**30,
        config.cacheType,
        max_seq_len,
        "on" if config.ngramDraft else "off",
    )
    return backend
