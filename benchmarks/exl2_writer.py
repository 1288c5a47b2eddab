"""Write an EXL2 model directly: random packed weights in the layout exllamav2 0.3.2 loads.

For timing, the converter's measurement and quantization passes only decide
which bits go where; speed depends on the shapes, the bit widths and the group
layout. This writer skips both passes and writes, in seconds and without a GPU,
what `convert_exl2` would write for a uniform quantization: every decoder linear
at `bits` (4) in groups of 128 input rows, the LM head at `head_bits` (6, the
converter's default), embeddings and norms in FP16. (A converted 4.0 bpw model
mixes widths per layer around 4; uniform 4-bit runs the same kernels.)

What exllamav2 0.3.2 reads, from its sources (wheel `exllamav2-0.3.2`):

- `module.py` `ExLlamaV2Module.load_weight`: a linear `key` is EXL2 when
  `key.q_weight` exists; it loads `q_weight, q_invperm, q_scale, q_scale_max,
  q_groups, q_perm, bias` and sets `q_perm = argsort(q_invperm)`.
- `ext.py` `make_q_matrix`: `q_scale_max *= prescale / 256`; `q_perm`/`q_invperm`
  become int16; `q_group_map = make_group_map(q_groups, q_weight.shape[0])`.
- `exllamav2_ext/ext_qmatrix.cpp` `make_q_matrix`: dtypes q_weight int32,
  q_perm/q_invperm int16, q_scale int32, q_scale_max half, q_groups int16, bias
  half; shapes `q_weight.size(1) == q_scale.size(1) * 8`,
  `q_scale_max.size(0) == q_scale.size(0)`, `bias.size(0) == q_weight.size(1)`.
- `conversion/adaptivegptq.py` `AdaptiveGPTQ.pack`: q_invperm int32 [in],
  q_scale_max fp16 [groups], q_groups int16 [2 * groups] = (bits, first packed
  row) per group, q_scale int32 [groups, out / 8] (4-bit scales, 8 per int32
  along the columns, stored minus one), q_weight int32 [sum of rows * bits / 32,
  out]; columns padded to a multiple of 32.
- `exllamav2_ext/cuda/q_matrix.cu` `QMatrix`: a group covers
  `packed rows * 32 / bits` input rows (the last one: the rest); the shuffle
  walks 8, 6, 5, 4, 3, 2-bit rows in that order, 4/16/32/8/32/16 rows at a time,
  so groups are sorted by falling width.
- `conversion/compile.py`: the LM head is written as `lm_head.q_*` even with tied
  embeddings (`model.py` gives the head `alt_key` `model.embed_tokens` only as a
  fallback); `config.json` gains `quantization_config`
  `{quant_method: exl2, version, bits, head_bits, calibration}`.
- `config.py` `ExLlamaV2Config.prepare`: every expected key (`model.embed_tokens`,
  `model.norm`, each layer's norms, q/k/v/o and gate/up/down projections; `lm_head`
  unless tied) must exist as `<key>.q_weight` or `<key>.weight`; Qwen2 sets
  `attention_bias_qkv` (`architecture.py`), so q/k/v carry a bias and o does not,
  and `ExLlamaV2Linear.load` asserts the bias is there exactly when expected.

`check_exl2_tensors` re-derives these rules independently of the writer (so a
typo in one does not hide in the other) and also checks a converter's output.

    python -m exlsp.benchmarks.exl2_writer --size 1.5b --out DIR [--hf-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EXLLAMAV2_VERSION = "0.3.2"
GROUP_SIZE = 128
SCALE_MAX = 0.01  # weights of std ~0.02 from 4-bit codes with 4-bit scales
_ST_DTYPES = {"int32": ("I32", 4), "int16": ("I16", 2), "float16": ("F16", 2)}
_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")


class Exl2LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # int32, int16, float16
    shape: tuple[int, ...]
    bits: int = 0  # of a q_groups table

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ST_DTYPES[self.dtype][1]


@dataclass(frozen=True)
class LinearSpec:
    key: str
    in_features: int
    out_features: int
    bits: int
    bias: bool

    @property
    def groups(self) -> int:
        return -(-self.in_features // GROUP_SIZE)

    @property
    def packed_rows(self) -> int:
        return self.in_features * self.bits // 32

    @property
    def columns(self) -> int:
        return self.out_features + (-self.out_features % 32)

    def tensors(self) -> list[TensorSpec]:
        k = self.key
        specs = [
            TensorSpec(f"{k}.q_weight", "int32", (self.packed_rows, self.columns)),
            TensorSpec(f"{k}.q_invperm", "int32", (self.in_features,)),
            TensorSpec(f"{k}.q_scale", "int32", (self.groups, self.columns // 8)),
            TensorSpec(f"{k}.q_scale_max", "float16", (self.groups,)),
            TensorSpec(f"{k}.q_groups", "int16", (2 * self.groups,), self.bits),
        ]
        if self.bias:
            specs.append(TensorSpec(f"{k}.bias", "float16", (self.out_features,)))
        return specs


# --- the model's layout -----------------------------------------------------------------


def _dims(config: dict[str, Any]) -> dict[str, int]:
    arch = (config.get("architectures") or [""])[0]
    if arch not in ARCHITECTURES:
        raise Exl2LayoutError(f"architecture {arch!r}: the writer knows {', '.join(ARCHITECTURES)}")
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    return {
        "hidden": hidden,
        "layers": int(config["num_hidden_layers"]),
        "heads": heads,
        "kv_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or hidden // heads),
        "intermediate": int(config["intermediate_size"]),
        "vocab": int(config["vocab_size"]),
    }


def _qkv_bias(config: dict[str, Any]) -> bool:
    arch = (config.get("architectures") or [""])[0]
    return arch == "Qwen2ForCausalLM" or bool(config.get("attention_bias"))


def linear_specs(config: dict[str, Any], bits: int = 4, head_bits: int = 6) -> list[LinearSpec]:
    d = _dims(config)
    qkv_bias = _qkv_bias(config)
    q_out, kv_out = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    out: list[LinearSpec] = []
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        out += [
            LinearSpec(p + "self_attn.q_proj", d["hidden"], q_out, bits, qkv_bias),
            LinearSpec(p + "self_attn.k_proj", d["hidden"], kv_out, bits, qkv_bias),
            LinearSpec(p + "self_attn.v_proj", d["hidden"], kv_out, bits, qkv_bias),
            LinearSpec(p + "self_attn.o_proj", q_out, d["hidden"], bits, False),
            LinearSpec(p + "mlp.gate_proj", d["hidden"], d["intermediate"], bits, False),
            LinearSpec(p + "mlp.up_proj", d["hidden"], d["intermediate"], bits, False),
            LinearSpec(p + "mlp.down_proj", d["intermediate"], d["hidden"], bits, False),
        ]
    out.append(LinearSpec("lm_head", d["hidden"], d["vocab"], head_bits, False))
    for spec in out:
        if spec.in_features % GROUP_SIZE or (spec.in_features * spec.bits) % 32:
            raise Exl2LayoutError(f"{spec.key}: {spec.in_features} input features do not pack")
    return out


def tensor_specs(config: dict[str, Any], bits: int = 4, head_bits: int = 6) -> list[TensorSpec]:
    """Every tensor of the EXL2 model, in file order."""
    d = _dims(config)
    specs = [TensorSpec("model.embed_tokens.weight", "float16", (d["vocab"], d["hidden"]))]
    linears = {s.key: s for s in linear_specs(config, bits, head_bits)}
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        specs.append(TensorSpec(p + "input_layernorm.weight", "float16", (d["hidden"],)))
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
        ):
            specs += linears[p + name].tensors()
        specs.append(TensorSpec(p + "post_attention_layernorm.weight", "float16", (d["hidden"],)))
        for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            specs += linears[p + name].tensors()
    specs.append(TensorSpec("model.norm.weight", "float16", (d["hidden"],)))
    specs += linears["lm_head"].tensors()
    return specs


# --- the loader's rules, derived separately ----------------------------------------------


def check_exl2_tensors(
    config: dict[str, Any], tensors: dict[str, tuple[str, Sequence[int]]]
) -> list[str]:
    """What exllamav2 0.3.2's loader would reject in `tensors` ({name: (dtype, shape)},
    dtypes as torch names: int32, int16, float16, bfloat16, float32); empty when none."""
    problems: list[str] = []
    d = _dims(config)
    qkv_bias = _qkv_bias(config)
    tied = bool(config.get("tie_word_embeddings"))

    def has(key: str) -> bool:
        return f"{key}.q_weight" in tensors or f"{key}.weight" in tensors

    expected = ["model.embed_tokens", "model.norm"] + ([] if tied else ["lm_head"])
    for i in range(d["layers"]):
        for k in (
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.down_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            expected.append(f"model.layers.{i}.{k}")
    problems += [f"{key}: missing (config.py prepare)" for key in expected if not has(key)]

    q_out, kv_out = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    shapes = {
        "self_attn.q_proj": (d["hidden"], q_out, qkv_bias),
        "self_attn.k_proj": (d["hidden"], kv_out, qkv_bias),
        "self_attn.v_proj": (d["hidden"], kv_out, qkv_bias),
        "self_attn.o_proj": (q_out, d["hidden"], False),
        "mlp.gate_proj": (d["hidden"], d["intermediate"], False),
        "mlp.up_proj": (d["hidden"], d["intermediate"], False),
        "mlp.down_proj": (d["intermediate"], d["hidden"], False),
    }
    bases = sorted(n.removesuffix(".q_weight") for n in tensors if n.endswith(".q_weight"))
    for base in bases:
        suffix = base.split(".", 3)[-1] if base.startswith("model.layers.") else base
        if base == "lm_head":
            in_f, out_f, bias = d["hidden"], d["vocab"], False
        elif suffix in shapes:
            in_f, out_f, bias = shapes[suffix]
        else:
            problems.append(f"{base}: an EXL2 tensor the model does not have")
            continue
        problems += _check_linear(base, tensors, in_f, out_f, bias)
    for name, (dtype, shape) in tensors.items():
        if name.endswith(".weight") and not name.endswith("q_weight"):
            if dtype not in ("float16", "bfloat16", "float32"):
                problems.append(f"{name}: dtype {dtype}, a float is needed")
            if name == "model.embed_tokens.weight" and tuple(shape) != (d["vocab"], d["hidden"]):
                problems.append(f"{name}: shape {tuple(shape)} != {(d['vocab'], d['hidden'])}")
            if name.endswith("norm.weight") and tuple(shape) != (d["hidden"],):
                problems.append(f"{name}: shape {tuple(shape)} != {(d['hidden'],)}")
    return problems


def _check_linear(
    base: str,
    tensors: dict[str, tuple[str, Sequence[int]]],
    in_f: int,
    out_f: int,
    bias: bool,
) -> list[str]:
    problems: list[str] = []
    want = {
        "q_weight": "int32",
        "q_invperm": "int32",  # the converter stores int32; ext.py casts to int16
        "q_scale": "int32",
        "q_scale_max": "float16",
        "q_groups": "int16",
    }
    got: dict[str, tuple[int, ...]] = {}
    for part, dtype in want.items():
        entry = tensors.get(f"{base}.{part}")
        if entry is None:
            problems.append(f"{base}.{part}: missing")
            continue
        if entry[0] != dtype and not (part == "q_invperm" and entry[0] == "int16"):
            problems.append(f"{base}.{part}: dtype {entry[0]} != {dtype}")
        got[part] = tuple(int(x) for x in entry[1])
    has_bias = f"{base}.bias" in tensors
    if has_bias != bias:
        problems.append(f"{base}: bias {'present' if has_bias else 'missing'} (linear.py load)")
    if has_bias:
        bdtype, bshape = tensors[f"{base}.bias"]
        if bdtype != "float16":
            problems.append(f"{base}.bias: dtype {bdtype} != float16 (ext_qmatrix.cpp)")
        if "q_weight" in got and tuple(bshape) != (got["q_weight"][1],):
            problems.append(f"{base}.bias: shape {tuple(bshape)} != ({got['q_weight'][1]},)")
    if len(got) < len(want):
        return problems
    qw, qs, qsm, qg, inv = (
        got[p] for p in ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
    )
    if len(qw) != 2 or len(qs) != 2:
        return [*problems, f"{base}: q_weight/q_scale must be 2-D"]
    if qw[1] != qs[1] * 8:
        problems.append(f"{base}: q_weight columns {qw[1]} != 8 * q_scale columns {qs[1]}")
    if qw[1] < out_f or qw[1] % 32 or qw[1] - out_f >= 32:
        problems.append(f"{base}: {qw[1]} columns for {out_f} outputs (padded to 32)")
    if qsm != (qs[0],):
        problems.append(f"{base}: q_scale_max {qsm} != ({qs[0]},)")
    if qg != (2 * qs[0],):
        problems.append(f"{base}: q_groups {qg} != ({2 * qs[0]},)")
    if inv != (in_f,):
        problems.append(f"{base}: q_invperm {inv} != ({in_f},) input features")
    return problems


def check_group_values(q_groups: Sequence[int], packed_rows: int, in_features: int) -> list[str]:
    """The group table against the packed rows (q_matrix.cu's walk)."""
    problems = []
    pairs = [(int(q_groups[i]), int(q_groups[i + 1])) for i in range(0, len(q_groups), 2)]
    rows = 0
    order = [8, 6, 5, 4, 3, 2]
    last_rank = 0
    for i, (bits, start) in enumerate(pairs):
        if bits not in order:
            problems.append(f"group {i}: {bits} bits")
            continue
        if order.index(bits) < last_rank:
            problems.append(f"group {i}: {bits} bits after narrower groups")
        last_rank = order.index(bits)
        end = pairs[i + 1][1] if i + 1 < len(pairs) else packed_rows
        if end <= start or ((end - start) * 32) % bits:
            problems.append(f"group {i}: packed rows {start}..{end} for {bits} bits")
            continue
        rows += (end - start) * 32 // bits
    if pairs and pairs[0][1] != 0:
        problems.append("the first group does not start at packed row 0")
    if rows != in_features:
        problems.append(f"groups cover {rows} input rows, not {in_features}")
    return problems


# --- safetensors ---------------------------------------------------------------------


_ST_NAMES = {"I32": "int32", "I16": "int16", "F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def read_tensor_table(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} over the directory's safetensors headers."""
    from exlsp.completion.backends.exllamav2 import read_safetensors_header

    table: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        for name, meta in read_safetensors_header(file).items():
            if name == "__metadata__" or not isinstance(meta, dict):
                continue
            table[name] = (_ST_NAMES.get(meta["dtype"], meta["dtype"]), tuple(meta["shape"]))
    return table


def read_tensor(path: Path, name: str) -> Any:
    """One tensor of a safetensors file as a numpy array (small tensors: group tables)."""
    import numpy as np

    from exlsp.completion.backends.exllamav2 import read_safetensors_header

    header = read_safetensors_header(path)
    meta = header[name]
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        start, end = meta["data_offsets"]
        f.seek(8 + size + start)
        raw = f.read(end - start)
    np_dtype = {"I32": np.int32, "I16": np.int16, "F16": np.float16}[meta["dtype"]]
    return np.frombuffer(raw, dtype=np_dtype).reshape(meta["shape"])


def _tensor_data(spec: TensorSpec, rng: Any) -> Iterator[bytes]:
    """The bytes of one tensor, in chunks of at most ~64 MB."""
    import numpy as np

    name, n = spec.name, math.prod(spec.shape)
    if name.endswith(".q_groups"):
        groups = spec.shape[0] // 2
        rows = GROUP_SIZE * spec.bits // 32
        table = [(spec.bits, i * rows) for i in range(groups)]
        yield np.array(table, dtype=np.int16).reshape(-1).tobytes()
    elif name.endswith(".q_invperm"):
        yield rng.permutation(n).astype(np.int32).tobytes()
    elif name.endswith(".q_scale_max"):
        yield np.full(n, SCALE_MAX, dtype=np.float16).tobytes()
    elif name.endswith(".bias"):
        yield np.zeros(n, dtype=np.float16).tobytes()
    elif name.endswith((".q_weight", ".q_scale")):
        left = n * 4
        while left > 0:
            step = min(left, 1 << 26)
            yield rng.bytes(step)
            left -= step
    elif name.endswith("norm.weight"):
        yield np.ones(n, dtype=np.float16).tobytes()
    else:  # embeddings: normal(0, 0.02)
        rows, cols = spec.shape
        per = max(1, (1 << 24) // cols)
        for start in range(0, rows, per):
            chunk = rng.standard_normal((min(per, rows - start), cols), dtype=np.float32)
            yield (chunk * 0.02).astype(np.float16).tobytes()


def write_safetensors(
    path: Path, specs: Sequence[TensorSpec], rng: Any, *, header_only: bool = False
) -> int:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _ST_DTYPES[spec.dtype][0],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in [] if header_only else specs:
            written = 0
            for chunk in _tensor_data(spec, rng):
                f.write(chunk)
                written += len(chunk)
            if written != spec.nbytes:
                raise Exl2LayoutError(f"{spec.name}: wrote {written} bytes, not {spec.nbytes}")
    tmp.replace(path)
    return offset


def bits_per_weight(specs: Iterable[LinearSpec]) -> float:
    """Stored bits per weight of the quantized linears (as the converter counts them)."""
    weights = bits = 0
    for s in specs:
        weights += s.in_features * s.out_features
        bits += s.in_features * s.columns * s.bits  # q_weight
        bits += s.groups * (16 + 32) + s.groups * s.columns * 4  # q_scale_max, q_groups, q_scale
        bits += s.in_features * 32  # q_invperm
    return bits / weights


def write_exl2(
    out_dir: str | Path,
    config: dict[str, Any],
    *,
    bits: int = 4,
    head_bits: int = 6,
    seed: int = 0,
    files_from: Path | None = None,
    header_only: bool = False,
) -> Path:
    """Write the EXL2 model of `config` (a Hugging Face config.json dict) to `out_dir`;
    tokenizer and generation files are copied from `files_from`."""
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    specs = tensor_specs(config, bits, head_bits)
    problems = check_exl2_tensors(config, {s.name: (s.dtype, s.shape) for s in specs})
    if problems:
        raise Exl2LayoutError("; ".join(problems[:5]))
    size = write_safetensors(
        out / "output.safetensors", specs, np.random.default_rng(seed), header_only=header_only
    )
    exl_config = dict(config)
    params = exl_config.get("rope_parameters")
    if "rope_theta" not in exl_config and isinstance(params, dict) and "rope_theta" in params:
        exl_config["rope_theta"] = params["rope_theta"]  # exllamav2 reads the flat key
    bpw = bits_per_weight(linear_specs(config, bits, head_bits)[:-1])
    exl_config["quantization_config"] = {
        "quant_method": "exl2",
        "version": EXLLAMAV2_VERSION,
        "bits": float(bits),
        "head_bits": head_bits,
        "calibration": {"rows": 0, "length": 0, "dataset": "(none: exlsp exl2_writer)"},
    }
    (out / "config.json").write_text(json.dumps(exl_config, indent=2) + "\n", encoding="utf-8")
    if files_from is not None:
        for name in _COPIED_FILES:
            if (files_from / name).is_file():
                shutil.copyfile(files_from / name, out / name)
    record = {
        "writer": "exlsp exl2_writer (random packed weights, no calibration)",
        "bits": bits,
        "head_bits": head_bits,
        "group_size": GROUP_SIZE,
        "seed": seed,
        "bits_per_weight_stored": round(bpw, 3),
        "size_bytes": size,
        "write_s": round(time.perf_counter() - t0, 1),
    }
    (out / "exlsp-exl2.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s (%.2f GB, %.2f bpw) in %.1f s", out, size / 1e9, bpw, record["write_s"])
    return out


def check_exl2_dir(model_dir: Path) -> list[str]:
    """The loader's rules over a model directory (ours or the converter's): the tensor
    table, and each linear's group table read from the file."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    table = read_tensor_table(model_dir)
    problems = check_exl2_tensors(config, table)
    files = {
        name: f
        for f in sorted(model_dir.glob("*.safetensors"))
        for name in read_tensor_table_file(f)
    }
    for name in table:
        if name.endswith(".q_groups"):
            base = name.removesuffix(".q_groups")
            groups = read_tensor(files[name], name)
            inv = table.get(base + ".q_invperm")
            packed = table.get(base + ".q_weight")
            if inv and packed:
                problems += [
                    f"{base}: {p}"
                    for p in check_group_values(list(groups), packed[1][0], inv[1][0])
                ]
    return problems


def exllamav2_source_check(model_dir: Path, source: Path) -> list[str]:
    """exllamav2's own Python on the CPU, its CUDA extension stubbed out: `ExLlamaV2Config`
    reads the directory (config.json, safetensors headers, the expected-keys check of
    `prepare`), `ExLlamaV2(config)` lays out the modules, and each linear's key,
    features and bias are compared with the tensors. `source` is an exllamav2 wheel or
    the folder holding the `exllamav2` package. Run it in its own process: it leaves
    a stubbed `exllamav2` in `sys.modules`."""
    import importlib
    import tempfile
    import types
    import zipfile

    import torch

    if source.suffix == ".whl":
        root = Path(tempfile.mkdtemp(prefix="exllamav2-src-"))
        with zipfile.ZipFile(source) as z:
            z.extractall(root, [n for n in z.namelist() if n.startswith("exllamav2/")])
        source = root
    pkg = types.ModuleType("exllamav2")
    pkg.__path__ = [str(source / "exllamav2")]
    ext = types.ModuleType("exllamav2.ext")

    class _NoExtension:
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    ext.exllamav2_ext = _NoExtension()  # type: ignore[attr-defined]
    ext.none_tensor = torch.empty((1, 1), device="meta")  # type: ignore[attr-defined]
    sys.modules["exllamav2"] = pkg
    sys.modules["exllamav2.ext"] = ext
    pkg.ext = ext  # type: ignore[attr-defined]
    try:
        config_mod = importlib.import_module("exllamav2.config")
        model_mod = importlib.import_module("exllamav2.model")
        linear_mod = importlib.import_module("exllamav2.linear")
        config = config_mod.ExLlamaV2Config(str(model_dir))  # runs prepare()
        config.arch_compat_overrides(quiet=True)
        model = model_mod.ExLlamaV2(config)
    except Exception as e:
        return [f"exllamav2 rejects {model_dir}: {type(e).__name__}: {e}"]
    table = read_tensor_table(model_dir)
    problems: list[str] = []
    linears = [m for m in model.modules_dict.values() if isinstance(m, linear_mod.ExLlamaV2Linear)]
    if not linears:
        problems.append("exllamav2 laid out no linear layers")
    for lin in linears:
        key = lin.key if f"{lin.key}.q_weight" in config.tensor_file_map else lin.alt_key
        if key is None or f"{key}.q_weight" not in config.tensor_file_map:
            problems.append(f"{lin.key}: not EXL2 (load_weight would not find {lin.key}.q_weight)")
            continue
        q_weight = table[f"{key}.q_weight"][1]
        inv = table.get(f"{key}.q_invperm", ("", ()))[1]
        if tuple(inv) != (lin.in_features,):
            problems.append(f"{key}: q_invperm {tuple(inv)}, exllamav2 has {lin.in_features} in")
        if q_weight[1] != lin.out_features:
            problems.append(f"{key}: {q_weight[1]} columns, exllamav2 has {lin.out_features} out")
        if (f"{key}.bias" in table) != bool(lin.has_bias):
            problems.append(
                f"{key}: bias {f'{key}.bias' in table}, exllamav2 expects {lin.has_bias}"
            )
    return problems


def read_tensor_table_file(path: Path) -> list[str]:
    from exlsp.completion.backends.exllamav2 import read_safetensors_header

    return [n for n in read_safetensors_header(path) if n != "__metadata__"]


def ensure_exl2_direct(
    family: str, size: str, out_dir: str | Path, bits: float = 4.0, *, hf_dir: Path | None = None
) -> Path:
    """The writer's counterpart of `build_exl2.build_exl2`: builds the random-weight HF
    model (kept for the transformers comparison, and the source of config and tokenizer)
    and writes the EXL2 model next to it; reuses both when they are already there."""
    from exlsp.benchmarks.exl_convert import ensure_hf_model

    out = Path(out_dir).resolve()
    hf = Path(hf_dir).resolve() if hf_dir else out.with_name(out.name + "-hf")
    ensure_hf_model(hf, family, size, 0)
    if (out / "exlsp-exl2.json").is_file() and (out / "output.safetensors").is_file():
        return out
    config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    return write_exl2(out, config, bits=round(bits), files_from=hf)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exlsp.benchmarks.exl2_writer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--family", default="qwen2.5-coder")
    parser.add_argument("--size", default="1.5b")
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument(
        "--out", type=Path, help="the EXL2 model folder (needed unless --source-check)"
    )
    parser.add_argument("--hf-dir", type=Path, default=None)
    parser.add_argument("--check", action="store_true", help="only check an existing directory")
    parser.add_argument(
        "--source-check",
        type=Path,
        metavar="WHEEL",
        help="lay out --size (headers only, in a temporary folder) and read it with "
        "exllamav2's own Python from this wheel, its CUDA extension stubbed",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.source_check:
        import tempfile

        from exlsp.benchmarks.gpu_kit import writer_config

        with tempfile.TemporaryDirectory(prefix="exl2-layout-") as tmp:
            folder = write_exl2(Path(tmp) / args.size, writer_config(args.size), header_only=True)
            problems = exllamav2_source_check(folder, args.source_check)
        for p in problems:
            print(p)
        print(f"{args.size}: {len(problems)} problems with exllamav2's own loader code")
        return 1 if problems else 0
    if args.out is None:
        parser.error("--out is needed")
    if args.check:
        problems = check_exl2_dir(args.out)
        for p in problems:
            print(p)
        return 1 if problems else 0
    path = ensure_exl2_direct(args.family, args.size, args.out, args.bits, hf_dir=args.hf_dir)
    problems = check_exl2_dir(path)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
