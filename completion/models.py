"""The catalogue of fill-in-the-middle base code models and how much memory each needs.

The facts live in `models.json` next to this module, each entry with its
sources. Sizing is plain arithmetic on those facts, so it is tested without a
GPU; only `available_memory` looks at the machine (torch is imported there, late).

An estimate is

    weights  = parameters × bpw / 8  +  vocab × hidden × (head bits − bpw) / 8
    KV cache = layers × 2 × KV heads × head dim × bytes per value × maxSeqLen
               (fp16 2 bytes; q8, q6, q4 1, 0.75, 0.5 + an fp16 scale per 32 values,
               and exllamav2's fp16 scratch K/V of one layer; see `kv_cache_bytes`)
    total    = weights + KV cache × (1 + second cache) + WORKING_BYTES

where the second cache is the one hover and code actions get (README: "Use a
real model"), and a model fits when `total <= free × (1 - HEADROOM)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("models.json")

# CUDA context, activations, the sampler's logits and exllamav2's scratch buffers:
# a constant, not a measurement per model. 512 MiB puts the estimate within a few
# per cent of the published EXL2 sizes the tests check.
WORKING_BYTES = 512 * 2**20
# Room to spare: recommend only what fits in 90 % of the free memory.
HEADROOM = 0.10
# Below this many bits per weight a model is recommended only when nothing better fits.
MIN_GOOD_BPW = 4.0

# Families whose architecture exllamav3 1.6.5 loads (exllamav3/architecture/: qwen2.py,
# llama.py for DeepSeek-Coder v1 and CodeLlama, mistral.py for Codestral); StarCoder2
# and Gemma 1 (CodeGemma) have none there.
EXL3_FAMILIES = frozenset({"qwen2.5-coder", "deepseek-coder", "codellama", "codestral"})
# Sizes to convert to with exllamav3's converter where no EXL3 repository is listed
# (`python -m exllamav3.conversion.convert_model -i IN -o OUT -w WORK -b BITS`), and
# its default output-head bits (conversion/convert_model.py `--head_bits`, default 6).
EXL3_CONVERT_BITS = (8.0, 6.0, 5.0, 4.0, 3.0)
EXL3_HEAD_BITS = 6.0


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; {} where it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """A model folder's `config.json` ({} where it is missing or broken).

    The one reader of it (tokenizer, FIM template, exllamav2, doctor, pull)."""
    return read_json_object(model_dir / "config.json")


@dataclass(frozen=True)
class Exl2Repo:
    repo: str
    branches: dict[str, float]  # branch name -> bits per weight
    head_bits: dict[str, float]  # branch name -> bits of the output head


@dataclass(frozen=True)
class CatalogueModel:
    name: str
    repo: str
    fim_template: str
    parameters: int
    context: int
    licence: str
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    exl2: tuple[Exl2Repo, ...]
    gguf: tuple[str, ...]
    sources: tuple[str, ...]
    unverified: tuple[str, ...] = ()
    # EXL3 repositories (exllamav3), as `exl2` lists EXL2 ones; none listed: converted locally.
    exl3: tuple[Exl2Repo, ...] = ()
    # The instruction-tuned model of the same architecture, for hover and refactors
    # (`exlsp pull --assist`); None where its makers publish none.
    instruct: str | None = None

    def config(self) -> dict[str, Any]:
        """The config.json fields the KV sizing reads."""
        return {
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.attention_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
        }

    def kv_cache_bytes(self, tokens: int, cache_type: str) -> int:
        # One formula for the catalogue and the exllamav2 backend's own out-of-memory report.
        from exlsp.completion.backends.exllamav2 import kv_cache_bytes

        if cache_type == "fp32":
            return 2 * kv_cache_bytes(self.config(), tokens, "fp16")
        return kv_cache_bytes(self.config(), tokens, cache_type)

    @property
    def head_parameters(self) -> int:
        return self.vocab_size * self.hidden_size


@dataclass(frozen=True)
class Variant:
    """One downloadable form of a catalogue model for one backend."""

    model: CatalogueModel
    backend: str  # "exllamav2", "exllamav3" or "transformers"
    repo: str
    revision: str
    bpw: float
    head_bits: float
    exl2: bool = False
    exl3: bool = False  # an EXL3 size: from `repo@revision`, or converted from `repo`

    @property
    def kind(self) -> str:
        if self.exl2:
            return f"EXL2 {self.bpw:g} bpw"
        if self.exl3:
            return f"EXL3 {self.bpw:g} bpw"
        return f"{'16-bit' if self.bpw == 16 else 'fp32'} safetensors"

    @property
    def converted(self) -> bool:
        """An EXL3 size to convert locally from the safetensors repository."""
        return self.exl3 and self.revision == "convert"

    @property
    def source(self) -> str:
        if self.converted:
            return f"{self.repo} (convert)"
        return f"{self.repo}@{self.revision}" if self.exl2 or self.exl3 else self.repo


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    second_cache: int
    working: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.second_cache + self.working


@dataclass
class Fit:
    variant: Variant
    estimate: Estimate
    fits: bool


def _entry(raw: dict[str, Any]) -> CatalogueModel:
    return CatalogueModel(
        name=raw["name"],
        repo=raw["repo"],
        fim_template=raw["fimTemplate"],
        parameters=int(raw["parameters"]),
        context=int(raw["context"]),
        licence=raw["licence"],
        layers=int(raw["layers"]),
        attention_heads=int(raw["attentionHeads"]),
        kv_heads=int(raw["kvHeads"]),
        head_dim=int(raw["headDim"]),
        hidden_size=int(raw["hiddenSize"]),
        vocab_size=int(raw["vocabSize"]),
        tied_embeddings=bool(raw["tiedEmbeddings"]),
        exl2=tuple(
            Exl2Repo(
                e["repo"],
                {k: float(v) for k, v in e["branches"].items()},
                {k: float(v) for k, v in e["headBits"].items()},
            )
            for e in raw.get("exl2", [])
        ),
        gguf=tuple(raw.get("gguf", [])),
        exl3=tuple(
            Exl2Repo(
                e["repo"],
                {k: float(v) for k, v in e["branches"].items()},
                {k: float(v) for k, v in e["headBits"].items()},
            )
            for e in raw.get("exl3", [])
        ),
        sources=tuple(raw["sources"]),
        unverified=tuple(raw.get("unverified", [])),
        instruct=raw.get("instruct"),
    )


@cache
def catalogue() -> tuple[CatalogueModel, ...]:
    data = json.loads(DATA.read_text(encoding="utf-8"))
    return tuple(_entry(m) for m in data["models"])


def find(name: str) -> CatalogueModel | None:
    """A catalogue entry by name (case-insensitive) or by its repository id."""
    key = name.lower()
    for m in catalogue():
        if key in (m.name, m.repo.lower()):
            return m
    return None


def variants(model: CatalogueModel, backend: str, *, cpu: bool = False) -> list[Variant]:
    """The forms of `model` that `backend` can load, highest bits first."""
    if backend == "exllamav2":
        # exllamav2 also loads the unquantized safetensors (16 bits per weight).
        out = [Variant(model, backend, model.repo, "main", 16.0, 16.0)]
        out += [
            Variant(model, backend, e.repo, branch, bpw, e.head_bits.get(branch, bpw), exl2=True)
            for e in model.exl2
            for branch, bpw in e.branches.items()
        ]
        return sorted(out, key=lambda v: -v.bpw)
    if backend == "exllamav3":
        if model.fim_template not in EXL3_FAMILIES:
            return []
        out = [
            Variant(model, backend, e.repo, branch, bpw, e.head_bits.get(branch, bpw), exl3=True)
            for e in model.exl3
            for branch, bpw in e.branches.items()
        ]
        published = {v.bpw for v in out}
        out += [
            Variant(model, backend, model.repo, "convert", bpw, EXL3_HEAD_BITS, exl3=True)
            for bpw in EXL3_CONVERT_BITS
            if bpw not in published
        ]
        return sorted(out, key=lambda v: -v.bpw)
    if backend == "transformers":
        bits = 32.0 if cpu else 16.0  # model.dtype "auto": float32 on a CPU, bfloat16 on CUDA
        return [Variant(model, backend, model.repo, "main", bits, bits)]
    return []


def estimate(
    variant: Variant,
    *,
    max_seq_len: int,
    cache_type: str,
    second_cache: bool = True,
    working: int = WORKING_BYTES,
) -> Estimate:
    m = variant.model
    weights = (
        m.parameters * variant.bpw / 8 + m.head_parameters * (variant.head_bits - variant.bpw) / 8
    )
    if variant.exl3:
        # exllamav3 keeps the embedding table in system memory and stores a separate
        # output head (untied) at its own bits (conversion/quant_config.py update_config).
        body = m.parameters - m.head_parameters * (1 if m.tied_embeddings else 2)
        weights = body * variant.bpw / 8 + m.head_parameters * variant.head_bits / 8
        # One paged cache serves every job (hover and code actions too).
        second_cache = False
    kv = m.kv_cache_bytes(min(max_seq_len, m.context), cache_type)
    return Estimate(
        weights=round(weights),
        kv_cache=kv,
        second_cache=kv if second_cache else 0,
        working=working,
    )


def fits(est: Estimate, free: int, headroom: float = HEADROOM) -> bool:
    return est.total <= free * (1 - headroom)


def size_all(
    free: int,
    backend: str,
    *,
    max_seq_len: int,
    cache_type: str,
    second_cache: bool = True,
    cpu: bool = False,
) -> list[Fit]:
    """Every catalogue variant for `backend` with its estimate and whether it fits `free`."""
    if backend == "transformers" and cpu:
        cache_type = "fp32"
    elif backend == "transformers":
        cache_type = "fp16"  # the transformers backend does not quantize its cache
    out = []
    for model in catalogue():
        for v in variants(model, backend, cpu=cpu):
            est = estimate(
                v, max_seq_len=max_seq_len, cache_type=cache_type, second_cache=second_cache
            )
            out.append(Fit(v, est, fits(est, free)))
    return out


def recommend(fits_list: list[Fit]) -> Fit | None:
    """The largest model that fits, at the most bits that fit.

    Models are compared by parameters; a variant under `MIN_GOOD_BPW` wins only
    when no model fits at `MIN_GOOD_BPW` or more.
    """
    ok = [f for f in fits_list if f.fits]
    good = [f for f in ok if f.variant.bpw >= MIN_GOOD_BPW] or ok
    if not good:
        return None
    return max(good, key=lambda f: (f.variant.model.parameters, f.variant.bpw))


def available_memory(device: str = "auto") -> tuple[int, str]:
    """(free bytes, where): free VRAM of the first CUDA GPU, else available RAM."""
    if device != "cpu":
        try:
            import torch

            if torch.cuda.is_available():
                index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
                free, _total = torch.cuda.mem_get_info(index)
                return int(free), f"GPU {index} ({torch.cuda.get_device_name(index)})"
        except Exception:  # no torch, no driver: fall back to RAM
            pass
    return _available_ram(), "RAM"


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 0
