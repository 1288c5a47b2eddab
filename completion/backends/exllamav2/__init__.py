"""The exllamav2 backend: EXL2 weights on a CUDA GPU (see backend.py)."""

from exlsp.completion.backends.exllamav2.backend import ExLlamaV2Backend, NgramDraft
from exlsp.completion.backends.exllamav2.extension import (
    ExLlamaV2LoadError,
    StaleExtensionLockError,
    extension_build_dir,
    find_stale_extension_lock,
    import_exllamav2,
)
from exlsp.completion.backends.exllamav2.loader import load_exllamav2_backend
from exlsp.completion.backends.exllamav2.model_dir import (
    kv_cache_bytes,
    read_safetensors_header,
    round_seq_len,
    safetensors_parameter_count,
    weights_bytes,
)

__all__ = [
    "ExLlamaV2Backend",
    "ExLlamaV2LoadError",
    "NgramDraft",
    "StaleExtensionLockError",
    "extension_build_dir",
    "find_stale_extension_lock",
    "import_exllamav2",
    "kv_cache_bytes",
    "load_exllamav2_backend",
    "read_safetensors_header",
    "round_seq_len",
    "safetensors_parameter_count",
    "weights_bytes",
]
