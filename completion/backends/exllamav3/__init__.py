"""The EXL3 backend: exllamav3's paged generator, resident on a CUDA GPU.

See `backend.py` for the design (why the backend drives exllamav3's
`Generator`/`Job` rather than a forward loop of its own) and `loader.py` for
loading a model directory and the generator settings. Nothing here imports
exllamav3 or torch at module level: the CPU tests run on a fake of its surface.
"""

from __future__ import annotations

from exlsp.completion.backends.exllamav3.backend import (
    PAGE_SIZE,
    ExLlamaV3Backend,
    GeneratorSettings,
)
from exlsp.completion.backends.exllamav3.loader import (
    RECURRENT_ARCHITECTURES,
    ExLlamaV3LoadError,
    is_exl3_model,
    is_recurrent_architecture,
    load_exllamav3_backend,
    page_cache_dir,
)

__all__ = [
    "PAGE_SIZE",
    "RECURRENT_ARCHITECTURES",
    "ExLlamaV3Backend",
    "ExLlamaV3LoadError",
    "GeneratorSettings",
    "is_exl3_model",
    "is_recurrent_architecture",
    "load_exllamav3_backend",
    "page_cache_dir",
]
