"""Facts about an EXL2 model directory and its KV cache, read without exllamav2."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SEQ_LEN_MULTIPLE = 256  # the dynamic generator's page size; Q caches align to it too
# Bytes per cached key + value element (the Q caches add one FP16 scale per 32).
_CACHE_BYTES_PER_KV_PAIR = {"fp16": 4.0, "q8": 2.0 + 4 / 32, "q6": 1.5 + 4 / 32, "q4": 1.0 + 4 / 32}


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
