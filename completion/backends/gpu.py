"""What the GPU backends (exllamav2, exllamav3) share: out-of-memory errors and CUDA memory."""

from __future__ import annotations

import gc
from typing import Any


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
