"""Loading an EXL2 model directory onto the GPU(s) as an `ExLlamaV2Backend`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from exlsp.completion.backends.exllamav2.backend import ExLlamaV2Backend
from exlsp.completion.backends.exllamav2.extension import ExLlamaV2LoadError, import_exllamav2
from exlsp.completion.backends.exllamav2.model_dir import (
    round_seq_len,
    safetensors_parameter_count,
)
from exlsp.completion.backends.gpu import (
    GpuLoad,
    gpu_model_info,
    model_path,
    release_cuda,
    require_cuda,
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
    path = model_path(config, model_dir, "exllamav2", "EXL2", ExLlamaV2LoadError)
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

    require_cuda(torch, "exllamav2", ExLlamaV2LoadError)
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

    load = GpuLoad(torch)

    def steps() -> tuple[Any, Any]:
        exl_config = exl.ExLlamaV2Config(str(path))
        exl_config.arch_compat_overrides(quiet=True)
        exl_config.max_seq_len = max_seq_len
        exl_config.max_input_len = min(exl_config.max_input_len, max_seq_len)
        load.model = exl.ExLlamaV2(exl_config)
        cache = getattr(exl, CACHE_CLASSES[config.cacheType])(
            load.model, max_seq_len=max_seq_len, lazy=True
        )
        load.model.load_autosplit(cache, progress=False)
        return load.model, cache

    model, cache = load.run(
        steps,
        path=path,
        model_cfg=model_cfg,
        max_seq_len=max_seq_len,
        cache_type=config.cacheType,
        cache_label="KV cache ",
    )
    info = gpu_model_info(
        path, model_cfg, "exllamav2", "exl2", max_seq_len, safetensors_parameter_count(path)
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
    backend.vram_bytes = load.vram_bytes()
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
        load.gpu,
        load.seconds(),
        backend.vram_bytes / 2**30,
        config.cacheType,
        max_seq_len,
        "on" if config.ngramDraft else "off",
    )
    return backend
