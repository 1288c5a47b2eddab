"""What the GPU backends (exllamav2, exllamav3) share: out-of-memory errors, CUDA
memory, and the steps of loading a model directory onto the GPU (its path, the
CUDA check, the load under out-of-memory watch, the VRAM it took, its ModelInfo)."""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from exlsp.completion.backends.base import ModelInfo
from exlsp.completion.config import ModelConfig

T = TypeVar("T")


class GpuOutOfMemoryError(RuntimeError):
    """The GPU ran out of memory (loading the model, or during a generation)."""


def is_out_of_memory(error: BaseException) -> bool:
    if type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return "out of memory" in text.lower() or "Insufficient VRAM" in text


def release_cuda(torch: Any) -> None:
    """Give the memory of freed tensors back to the GPU (after their last reference)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_summary(torch: Any) -> tuple[str, float, float]:
    """GPU name, free and total GiB of device 0."""
    free, total = torch.cuda.mem_get_info(0)
    return torch.cuda.get_device_name(0), free / 2**30, total / 2**30


def model_path(
    config: ModelConfig,
    model_dir: Path | str | None,
    backend: str,
    kind: str,
    error: type[Exception],
) -> Path:
    """The model directory to load (`model_dir`, else model.path), checked for a
    config.json; `kind` names the weights ("EXL2") in the error."""
    path = Path(model_dir or config.path).expanduser()
    if not str(model_dir or config.path):
        raise error(f"the {backend} backend needs model.path: an {kind} model directory")
    if not (path / "config.json").is_file():
        raise error(f"{path} is not a model directory (no config.json)")
    return path


def require_cuda(torch: Any, backend: str, error: type[Exception]) -> None:
    if not torch.cuda.is_available():
        raise error(
            f"the {backend} backend needs a CUDA GPU; torch {torch.__version__} "
            f"({'CUDA ' + str(torch.version.cuda) if torch.version.cuda else 'a CPU-only build'}) "
            "sees none. Use model.backend=transformers on this machine"
        )


def gpu_model_info(
    path: Path,
    model_cfg: Mapping[str, Any],
    backend: str,
    kind: str,
    context_length: int,
    parameters: int | None,
) -> ModelInfo:
    """The ModelInfo of a quantized model on CUDA; its dtype names the format
    (`kind`, "exl2") and the bits per weight of config.json's quantization_config."""
    quant = model_cfg.get("quantization_config")
    bits = quant.get("bits") if isinstance(quant, Mapping) else None
    return ModelInfo(
        path=str(path),
        backend=backend,
        architectures=tuple(model_cfg.get("architectures") or ()),
        model_type=str(model_cfg.get("model_type", "")),
        context_length=context_length,
        parameters=parameters,
        device="cuda",
        dtype=f"{kind}-{bits}bpw" if bits else kind,
    )


class GpuLoad:
    """One model load onto the GPU: the free memory before it, an out-of-memory error
    during it (-> `GpuOutOfMemoryError` that says what did not fit), the VRAM it took.

    The load steps set `model` as soon as the model object exists, so that a failed
    load can unload what it had placed."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self.gpu, self.free_gib, self.total_gib = cuda_summary(torch)
        self.started = time.perf_counter()
        self.model: Any = None

    def run(
        self,
        steps: Callable[[], T],
        *,
        path: Path,
        model_cfg: dict[str, Any],
        max_seq_len: int,
        cache_type: str,
        cache_label: str,
    ) -> T:
        """`steps()` with the libraries' prints on stderr (stdout may be the LSP
        stream); an out-of-memory error frees what was loaded and is raised as a
        `GpuOutOfMemoryError` naming the weights and the `cache_label` cache."""
        failure: str | None = None
        with contextlib.redirect_stdout(sys.stderr):
            try:
                return steps()
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                failure = str(e).splitlines()[0] if str(e) else type(e).__name__
        # The exception (its frames hold tensors) is gone: free everything, so that a
        # later load with smaller settings can succeed in this process.
        with contextlib.suppress(Exception):
            self.model.unload()
        self.model = None
        release_cuda(self._torch)
        # Imported here: the exllamav2 package imports this module.
        from exlsp.completion.backends.exllamav2.model_dir import kv_cache_bytes, weights_bytes

        need_w = weights_bytes(path) / 2**30
        need_c = kv_cache_bytes(model_cfg, max_seq_len, cache_type) / 2**30
        raise GpuOutOfMemoryError(
            f"not enough GPU memory for {path.name}: weights {need_w:.2f} GiB + {cache_type} "
            f"{cache_label}{need_c:.2f} GiB (maxSeqLen {max_seq_len}) > {self.free_gib:.2f} GiB "
            f"free of {self.total_gib:.2f} GiB on {self.gpu}; lower model.maxSeqLen or "
            f"cacheType ({failure})"
        )

    def vram_bytes(self) -> int:
        """The device memory the load took (free before minus free now)."""
        _, free_after, _ = cuda_summary(self._torch)
        return int((self.free_gib - free_after) * 2**30)

    def seconds(self) -> float:
        return time.perf_counter() - self.started
