"""Write a Qwen2-architecture model directory (as `build_model` makes them) as one GGUF file.

llama.cpp's server loads GGUF; this lets the tests and a local trial of the
``openai`` backend serve the same tiny model the ``transformers`` backend runs,
with the same tokenizer, so their outputs can be compared token for token.

The weights are copied as float32 (no quantization: the point is equality, not
size). The tokenizer goes in as llama.cpp's byte-level BPE (``gpt2`` model,
``qwen2`` pre-tokenizer, which is the split rule `build_model` trains the Qwen
tokenizer with), its special tokens as control tokens.

    python -m exlsp.benchmarks.build_gguf MODEL_DIR OUT.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exlsp.benchmarks.build_model import _file_lock, cache_dir

# Bump when a change alters the bytes of a conversion: part of the cache file name.
CONVERTER_VERSION = "1"


class UnsupportedModel(ValueError):
    pass


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise UnsupportedModel(f"{path} is not a JSON object")
    return data


def _vocab(tokenizer: dict[str, Any]) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order, their GGUF token types, and the BPE merges."""
    import gguf

    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModel("only byte-level BPE tokenizers are supported")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    control: set[int] = set()
    for added in tokenizer.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        if added.get("special"):
            control.add(int(added["id"]))
    size = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [
        int(gguf.TokenType.CONTROL)
        if i in control
        else int(gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL)
        for i in range(size)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges


def convert_qwen2(model_dir: Path, out: Path) -> Path:
    """Write `model_dir` (config.json, model.safetensors, tokenizer files) to `out`."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = _read_json(model_dir / "config.json")
    if config.get("model_type") != "qwen2":
        raise UnsupportedModel(f"model_type {config.get('model_type')!r}: only qwen2 is supported")
    tokenizer = _read_json(model_dir / "tokenizer.json")
    tok_config = _read_json(model_dir / "tokenizer_config.json")
    tokens, types, merges = _vocab(tokenizer)
    if len(tokens) > int(config["vocab_size"]):
        raise UnsupportedModel("the tokenizer has more tokens than the model's vocabulary")
    # The embedding has vocab_size rows; ids the tokenizer never produces stay padding.
    tokens += [f"[PAD{i}]" for i in range(len(tokens), int(config["vocab_size"]))]
    types += [int(gguf.TokenType.UNUSED)] * (len(tokens) - len(types))

    n_layers = int(config["num_hidden_layers"])
    rope = config.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(model_dir.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config["num_key_value_heads"]))
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    vocab = {t: i for i, t in enumerate(tokens)}
    eos = tok_config.get("eos_token")
    if isinstance(eos, str) and eos in vocab:
        writer.add_eos_token_id(vocab[eos])
    pad = tok_config.get("pad_token")
    if isinstance(pad, str) and pad in vocab:
        writer.add_pad_token_id(vocab[pad])
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)
    tensors = load_file(str(model_dir / "model.safetensors"))
    tied = bool(config.get("tie_word_embeddings"))
    for name in sorted(tensors):
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads the output matrix from the embedding when absent
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UnsupportedModel(f"no GGUF name for tensor {name}")
        writer.add_tensor(target, np.ascontiguousarray(tensors[name], dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def ensure_gguf(model_dir: Path) -> Path:
    """The cached GGUF of `model_dir` (a build of `build_model`), converted on first use."""
    target_dir = cache_dir() / "gguf"
    target = target_dir / f"{model_dir.name}-c{CONVERTER_VERSION}.gguf"
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(target_dir / f".{target.name}.lock"):
        if target.is_file():
            return target
        fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=f".{target.name}.")
        os.close(fd)
        try:
            convert_qwen2(model_dir, Path(tmp))
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exlsp.benchmarks.build_gguf", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    tmp = args.out.with_name(args.out.name + ".tmp")
    convert_qwen2(args.model_dir, tmp)
    shutil.move(tmp, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
