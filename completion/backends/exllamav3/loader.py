"""Loading an EXL3 model directory onto the GPU as an `ExLlamaV3Backend`, and the
generator settings that model.* asks for (see backend.py for the design)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from exlsp.completion.backends.base import GenerationJob
from exlsp.completion.backends.exllamav2.model_dir import round_seq_len
from exlsp.completion.backends.exllamav3.backend import (
    NGRAM_DRAFT_TOKENS,
    PAGE_SIZE,
    ExLlamaV3Backend,
    GeneratorSettings,
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

# model.cacheType -> the quantized cache's bits (keys, values); fp16: CacheLayer_fp16.
CACHE_BITS: dict[str, int | None] = {"fp16": None, "q8": 8, "q6": 6, "q4": 4}
# exllamav3 1.6.5's architectures whose caps set "recurrent_states" (linear attention,
# Mamba, or sliding-window rings kept as states): the files under
# exllamav3/architecture/ with `"recurrent_states": True`. Reuse snaps to pages there.
RECURRENT_ARCHITECTURES = frozenset(
    {
        "AfmoeForCausalLM",
        "BailingMoeV3ForCausalLM",
        "DeepseekV4ForCausalLM",
        "Gemma4ForConditionalGeneration",
        "Gemma4UnifiedForConditionalGeneration",
        "Glm5NextForConditionalGeneration",
        "GptOssForCausalLM",
        "KimiLinearForCausalLM",
        "LagunaForCausalLM",
        "Lfm2ForCausalLM",
        "Lfm2MoeForCausalLM",
        "MiMoV2ForCausalLM",
        "MuseGlimmerForConditionalGeneration",
        "NemotronHForCausalLM",
        "OlmoHybridForCausalLM",
        "Qwen3NextForCausalLM",
        "Qwen3_5ForConditionalGeneration",
        "Qwen4ExpForConditionalGeneration",
        "Step3p5ForCausalLM",
    }
)


class ExLlamaV3LoadError(RuntimeError):
    """The exllamav3 backend cannot start; the message says why and what to do."""


def is_exl3_model(model_cfg: Mapping[str, Any]) -> bool:
    """Whether a config.json is an EXL3 model (exllamav3's converter writes
    `quantization_config: {"quant_method": "exl3", "bits": ...}`, conversion/compile.py)."""
    quant = model_cfg.get("quantization_config")
    return isinstance(quant, Mapping) and quant.get("quant_method") == "exl3"


def is_recurrent_architecture(model_cfg: Mapping[str, Any]) -> bool:
    archs = model_cfg.get("architectures") or ()
    return any(str(a) in RECURRENT_ARCHITECTURES for a in archs)


def page_cache_dir() -> Path:
    """The disk tier's root: `<exlsp cache dir>/exl3-pages` (exllamav3 keeps one
    subdirectory per model and cache configuration under it)."""
    from exlsp.benchmarks.build_model import cache_dir

    return cache_dir() / "exl3-pages"


def import_exllamav3() -> Any:
    """Import exllamav3 (its extension compiles on first use), printing to stderr."""
    with contextlib.redirect_stdout(sys.stderr):  # stdout may be the LSP stream
        import exllamav3

    return exllamav3


def generator_settings(config: ModelConfig) -> GeneratorSettings:
    """The generator settings of `config` (model.prefillChunk, pageCacheRamMiB,
    pageCacheDiskMiB, pageCacheDir, ngramDraft), checked."""
    chunk = max(PAGE_SIZE, (int(config.prefillChunk) // PAGE_SIZE) * PAGE_SIZE)
    ram = max(0, int(config.pageCacheRamMiB)) * 2**20
    disk = max(0, int(config.pageCacheDiskMiB)) * 2**20
    if disk and not ram:
        raise ExLlamaV3LoadError(
            "model.pageCacheDiskMiB needs model.pageCacheRamMiB > 0: exllamav3's disk tier "
            "writes through its pinned-RAM tier"
        )
    directory = None
    if disk:
        directory = str(
            Path(config.pageCacheDir).expanduser() if config.pageCacheDir else page_cache_dir()
        )
    return GeneratorSettings(
        max_chunk_size=chunk,
        cpu_cache_bytes=ram,
        disk_cache_dir=directory,
        disk_cache_bytes=disk,
        ngram_draft=config.ngramDraft,
    )


def load_exllamav3_backend(
    config: ModelConfig,
    model_dir: Path | str | None = None,
    *,
    warmup: bool = True,
    api: Any = None,
) -> ExLlamaV3Backend:
    """Load an EXL3 model directory onto the GPU with a paged cache of `config.maxSeqLen`."""
    path = model_path(config, model_dir, "exllamav3", "EXL3", ExLlamaV3LoadError)
    model_cfg = read_model_config(path)
    if not is_exl3_model(model_cfg):
        raise ExLlamaV3LoadError(
            f"{path} is not an EXL3 model (config.json has no quantization_config with "
            'quant_method "exl3"); EXL2 models use model.backend=exllamav2'
        )
    if config.cacheType not in CACHE_BITS:
        raise ExLlamaV3LoadError(
            f"model.cacheType {config.cacheType!r}: use one of {', '.join(CACHE_BITS)}"
        )
    if config.device == "cpu":
        raise ExLlamaV3LoadError("the exllamav3 backend runs on CUDA GPUs only (model.device=cpu)")
    settings = generator_settings(config)

    import torch

    require_cuda(torch, "exllamav3", ExLlamaV3LoadError)
    exl = api if api is not None else import_exllamav3()
    tokenizer = HfTokenizer(path)
    max_seq_len = round_seq_len(config.maxSeqLen)
    if config.contextLength:
        max_seq_len = min(max_seq_len, round_seq_len(config.contextLength))
    bits = CACHE_BITS[config.cacheType]

    load = GpuLoad(torch)

    def steps() -> tuple[Any, Any, Any]:
        exl_config = exl.Config.from_directory(str(path))
        load.model = exl.Model.from_config(exl_config)
        cache_kw: dict[str, Any] = {"max_num_tokens": max_seq_len}
        if bits is not None:
            cache_kw.update(layer_type=exl.CacheLayer_quant, k_bits=bits, v_bits=bits)
        if settings.ngram_draft:
            cache_kw["max_history"] = NGRAM_DRAFT_TOKENS  # recurrent models' rewind room
        # The cache is made before load(): the loader allocates its tensors.
        cache = exl.Cache(load.model, **cache_kw)
        load.model.load(device="cuda:0" if config.device in ("auto", "cuda") else config.device)
        return load.model, cache, exl.Tokenizer.from_config(exl_config)

    model, cache, exl_tokenizer = load.run(
        steps,
        path=path,
        model_cfg=model_cfg,
        max_seq_len=max_seq_len,
        cache_type=config.cacheType,
        cache_label="paged cache ~",
    )
    caps = getattr(model, "caps", None) or {}
    recurrent = bool(caps.get("recurrent_states")) or is_recurrent_architecture(model_cfg)
    info = gpu_model_info(path, model_cfg, "exllamav3", "exl3", max_seq_len, None)
    backend = ExLlamaV3Backend(
        exl,
        model,
        cache,
        exl_tokenizer,
        tokenizer,
        info,
        settings=settings,
        recurrent=recurrent,
        on_close=lambda: release_cuda(torch),
    )
    backend.vram_bytes = load.vram_bytes()
    if warmup:
        # The first passes autotune kernels: pay that now, not on the first keystroke.
        from exlsp.completion.decode import decode

        for _ in decode(backend, GenerationJob(prompt=[0] * 8, stop_ids=frozenset(), max_tokens=2)):
            pass
    log.info(
        "exllamav3: loaded %s on %s in %.1f s (%.2f GiB VRAM, %s paged cache of %d tokens, "
        "prefill chunk %d, RAM tier %d MiB, disk tier %s, ngram draft %s%s)",
        path,
        load.gpu,
        load.seconds(),
        backend.vram_bytes / 2**30,
        config.cacheType,
        max_seq_len,
        settings.max_chunk_size,
        settings.cpu_cache_bytes // 2**20,
        settings.disk_cache_dir or "off",
        "on" if settings.ngram_draft else "off",
        "; hybrid/recurrent: reuse snaps to 256-token pages" if recurrent else "",
    )
    return backend
