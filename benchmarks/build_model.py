"""Build small code models of the real families for tests, benchmarks and first run.

A build is a complete Hugging Face model directory (`config.json`,
`model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
`generation_config.json`) plus `exlsp-build.json` with the build parameters.

- The tokenizer is a byte-level BPE trained on the local Python standard library
  and carries the family's real special tokens (FIM markers, BOS/EOS), each one
  added token, so prompt templates and stop sets behave as with the real model.
- The weights are random, seeded per tensor and written to safetensors one tensor
  at a time, so a `7b` build needs memory for one tensor, not for the model.
- `train_steps > 0` trains a `tiny` model for a few hundred deterministic AdamW
  steps on fill-in-the-middle and left-to-right samples of the same corpus, so it
  emits code-like tokens rather than only special tokens.

Same arguments on the same machine give byte-identical `model.safetensors`.
`ensure_model` keeps builds in a cache directory, built once per parameter set
under a file lock and moved into place atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import struct
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exlsp.completion.builtin_model import (  # the built-in model's facts, re-exported
    BUILDER_VERSION,
    DEFAULT_MODEL,
    cache_dir,
    model_dir_name,
)

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)


TOKENIZER_VOCAB_SIZE = 4096
CORPUS_MAX_BYTES = 3_000_000
_CORPUS_MAX_FILE_BYTES = 200_000
# Standard-library folders that are tests, data tables or GUI demos rather than
# ordinary Python code.
_CORPUS_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "encodings",
        "lib2to3",
        "pydoc_data",
        "turtledemo",
        "ensurepip",
        "tkinter",
    }
)

_INIT_STD = 0.02
_TRAIN_SEQ_LEN = 256
_TRAIN_BATCH = 8
_TRAIN_LR = 3e-3
_TRAIN_WARMUP = 20
_FIM_FRACTION = 0.7


_QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Family:
    """A model family: its architecture and its real special tokens."""

    name: str
    architecture: str
    model_type: str
    special_tokens: tuple[str, ...]  # in id order
    eos: str
    bos: str | None  # prepended to every sequence when set
    pad: str | None  # None: the EOS doubles as padding
    fim_prefix: str
    fim_suffix: str
    fim_middle: str | None  # None: the middle follows the prefix directly
    fim_end: str  # the token that closes a middle in training data
    suffix_first: bool  # the suffix segment comes before the prefix segment
    rope_theta: float
    tiny_tied_embeddings: bool
    # The real tokenizer's split rule and normalizer where the HF tokenizer class
    # of the model type rebuilds them (transformers 5 does so for qwen2);
    # None: GPT-2's byte-level split.
    pretokenize_regex: str | None = None
    nfc: bool = False
    extra_config: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        used = [self.eos, self.bos, self.pad, self.fim_prefix, self.fim_suffix]
        used += [self.fim_middle, self.fim_end]
        missing = [t for t in used if t is not None and t not in self.special_tokens]
        if missing:
            raise ValueError(f"{self.name}: {missing} not among its special tokens")


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="qwen2.5-coder",
            architecture="Qwen2ForCausalLM",
            model_type="qwen2",
            special_tokens=(
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<|fim_prefix|>",
                "<|fim_middle|>",
                "<|fim_suffix|>",
                "<|fim_pad|>",
                "<|repo_name|>",
                "<|file_sep|>",
            ),
            eos="<|endoftext|>",
            bos=None,
            pad="<|endoftext|>",
            fim_prefix="<|fim_prefix|>",
            fim_suffix="<|fim_suffix|>",
            fim_middle="<|fim_middle|>",
            fim_end="<|endoftext|>",
            suffix_first=False,
            rope_theta=1_000_000.0,
            tiny_tied_embeddings=True,
            pretokenize_regex=_QWEN_PRETOKENIZE_REGEX,
            nfc=True,
        ),
        Family(
            name="starcoder2",
            architecture="Starcoder2ForCausalLM",
            model_type="starcoder2",
            special_tokens=(
                "<|endoftext|>",
                "<fim_prefix>",
                "<fim_middle>",
                "<fim_suffix>",
                "<fim_pad>",
                "<repo_name>",
                "<file_sep>",
            ),
            eos="<|endoftext|>",
            bos=None,
            pad=None,
            fim_prefix="<fim_prefix>",
            fim_suffix="<fim_suffix>",
            fim_middle="<fim_middle>",
            fim_end="<|endoftext|>",
            suffix_first=False,
            rope_theta=100_000.0,
            tiny_tied_embeddings=True,
        ),
        Family(
            name="deepseek-coder",
            architecture="LlamaForCausalLM",
            model_type="llama",
            special_tokens=(
                "<｜begin▁of▁sentence｜>",
                "<｜end▁of▁sentence｜>",
                "<｜fim▁hole｜>",
                "<｜fim▁begin｜>",
                "<｜fim▁end｜>",
                "<|EOT|>",
            ),
            eos="<｜end▁of▁sentence｜>",
            bos="<｜begin▁of▁sentence｜>",
            pad=None,
            fim_prefix="<｜fim▁begin｜>",
            fim_suffix="<｜fim▁hole｜>",
            fim_middle="<｜fim▁end｜>",
            fim_end="<｜end▁of▁sentence｜>",
            suffix_first=False,
            rope_theta=100_000.0,
            tiny_tied_embeddings=False,
        ),
        Family(
            name="codellama",
            architecture="LlamaForCausalLM",
            model_type="llama",
            special_tokens=("<s>", "</s>", "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"),
            eos="</s>",
            bos="<s>",
            pad=None,
            fim_prefix="▁<PRE>",
            fim_suffix="▁<SUF>",
            fim_middle="▁<MID>",
            fim_end="▁<EOT>",
            suffix_first=False,
            rope_theta=1_000_000.0,
            tiny_tied_embeddings=False,
        ),
        Family(
            name="codestral",
            architecture="MistralForCausalLM",
            model_type="mistral",
            special_tokens=("<s>", "</s>", "[PREFIX]", "[SUFFIX]", "[MIDDLE]"),
            eos="</s>",
            bos="<s>",
            pad=None,
            fim_prefix="[PREFIX]",
            fim_suffix="[SUFFIX]",
            fim_middle=None,
            fim_end="</s>",
            suffix_first=True,
            rope_theta=1_000_000.0,
            tiny_tied_embeddings=False,
            extra_config=(("sliding_window", None),),
        ),
        Family(
            name="codegemma",
            architecture="GemmaForCausalLM",
            model_type="gemma",
            special_tokens=(
                "<pad>",
                "<eos>",
                "<bos>",
                "<|fim_prefix|>",
                "<|fim_middle|>",
                "<|fim_suffix|>",
                "<|file_separator|>",
            ),
            eos="<eos>",
            bos="<bos>",
            pad="<pad>",
            fim_prefix="<|fim_prefix|>",
            fim_suffix="<|fim_suffix|>",
            fim_middle="<|fim_middle|>",
            fim_end="<|file_separator|>",
            suffix_first=False,
            rope_theta=10_000.0,
            tiny_tied_embeddings=True,
        ),
    )
}


@dataclass(frozen=True)
class ModelSize:
    """Shape of a model; `None` fields take the family's value."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    default_dtype: str
    rope_theta: float | None = None
    tie_word_embeddings: bool | None = None
    families: tuple[str, ...] | None = None  # None: every family


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=TOKENIZER_VOCAB_SIZE,
        max_position_embeddings=8192,
        default_dtype="float32",
    ),
    # The real Qwen2.5-Coder shapes, for GPU timing. The tokenizer stays the
    # small trained one; the extra embedding rows are never produced by it.
    "1.5b": ModelSize(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        max_position_embeddings=32768,
        default_dtype="bfloat16",
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        families=("qwen2.5-coder",),
    ),
    "7b": ModelSize(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        max_position_embeddings=32768,
        default_dtype="bfloat16",
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        families=("qwen2.5-coder",),
    ),
}


_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


# ---------------------------------------------------------------------------
# cache directory and locking


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (a no-op where fcntl is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: the atomic rename still prevents torn reads
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------
# corpus and tokenizer


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_texts(max_bytes: int = CORPUS_MAX_BYTES) -> list[str]:
    """Python sources of the standard library, up to `max_bytes`, in a fixed order.

    Files are ordered by a hash of their relative path: a deterministic shuffle,
    so the capped corpus spans many packages instead of the first few names.
    """
    root = _stdlib_dir()
    rel_paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _CORPUS_SKIP_DIRS)
        base = Path(dirpath)
        rel_paths += [
            (base / f).relative_to(root).as_posix() for f in filenames if f.endswith(".py")
        ]
    rel_paths.sort(key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    texts: list[str] = []
    total = 0
    for rel in rel_paths:
        try:
            data = (root / rel).read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip() or len(data) > _CORPUS_MAX_FILE_BYTES:
            continue
        texts.append(text)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 100_000:
        raise RuntimeError(f"too little Python source under {root} to train a tokenizer")
    return texts


def _corpus_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()[:16]


def train_tokenizer(family: Family, vocab_size: int, texts: Sequence[str]) -> Tokenizer:
    """A byte-level BPE over `texts` whose first ids are the family's special tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    if family.nfc:
        tokenizer.normalizer = normalizers.NFC()
    if family.pretokenize_regex is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(family.pretokenize_regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[
            AddedToken(t, special=True, normalized=False) for t in family.special_tokens
        ],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    byte_level = processors.ByteLevel(trim_offsets=False)
    if family.bos is not None:
        bos_id = tokenizer.token_to_id(family.bos)
        template = processors.TemplateProcessing(
            single=f"{family.bos} $A",
            pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, bos_id)],
        )
        tokenizer.post_processor = processors.Sequence([byte_level, template])
    else:
        tokenizer.post_processor = byte_level
    return tokenizer


def ensure_tokenizer(family: str, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Path:
    """The cached `tokenizer.json` for `family`, trained on first use."""
    fam = FAMILIES[family]
    path = cache_dir() / "tokenizers" / f"{family}-v{vocab_size}-b{BUILDER_VERSION}.json"
    if path.is_file():
        return path
    with _file_lock(path.with_suffix(".lock")):
        if path.is_file():
            return path
        started = time.perf_counter()
        texts = corpus_texts()
        tokenizer = train_tokenizer(fam, vocab_size, texts)
        _write_atomic(path, tokenizer.to_str(pretty=True).encode("utf-8"))
        logger.info(
            "trained %s tokenizer (vocab %d, %d files, %.1f MB) in %.1f s",
            family,
            vocab_size,
            len(texts),
            sum(len(t) for t in texts) / 1e6,
            time.perf_counter() - started,
        )
    return path


# ---------------------------------------------------------------------------
# weights


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _init_tensor(
    name: str, shape: Sequence[int], dtype: torch.dtype, seed: int, gemma_norms: bool
) -> torch.Tensor:
    """Deterministic init of one parameter: normal(0, 0.02) for matrices, biases
    zero, norm weights one (zero for Gemma, whose RMSNorm scales by 1 + weight)."""
    import torch

    if len(shape) == 1:
        one = name.endswith(".weight") and not gemma_norms
        return (torch.ones if one else torch.zeros)(*shape, dtype=dtype)
    generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
    out = torch.empty(*shape, dtype=dtype)
    rows_per_chunk = max(1, (1 << 24) // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows_per_chunk):
        stop = min(shape[0], start + rows_per_chunk)
        chunk = torch.empty(stop - start, *shape[1:], dtype=torch.float32)
        chunk.normal_(0.0, _INIT_STD, generator=generator)
        out[start:stop] = chunk.to(dtype)
    return out


def _write_safetensors(
    path: Path,
    specs: Sequence[tuple[str, tuple[int, ...]]],
    dtype_name: str,
    tensor_for: Callable[[str], torch.Tensor],
) -> None:
    """Write a safetensors file one tensor at a time (`tensor_for(name)` makes each)."""
    import torch

    itemsize = torch.empty(0, dtype=getattr(torch, dtype_name)).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        size = math.prod(shape) * itemsize
        header[name] = {
            "dtype": _DTYPES[dtype_name],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, shape in specs:
            tensor = tensor_for(name)
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {shape}")
            data = tensor.detach().to("cpu", getattr(torch, dtype_name)).contiguous()
            handle.write(data.reshape(-1).view(torch.uint8).numpy().data)


def _model_config(fam: Family, spec: ModelSize, tokenizer: Tokenizer, dtype_name: str) -> Any:
    from transformers import AutoConfig

    def tid(token: str | None) -> int | None:
        return None if token is None else tokenizer.token_to_id(token)

    eos_id = tid(fam.eos)
    bos_id = tid(fam.bos)
    head_dim = spec.hidden_size // spec.num_attention_heads
    kwargs: dict[str, Any] = dict(
        architectures=[fam.architecture],
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": spec.rope_theta if spec.rope_theta is not None else fam.rope_theta,
        },
        tie_word_embeddings=(
            spec.tie_word_embeddings
            if spec.tie_word_embeddings is not None
            else fam.tiny_tied_embeddings
        ),
        bos_token_id=bos_id if bos_id is not None else eos_id,
        eos_token_id=eos_id,
        pad_token_id=tid(fam.pad) if fam.pad is not None else eos_id,
        dtype=dtype_name,
        **dict(fam.extra_config),
    )
    if fam.model_type == "gemma":
        kwargs["head_dim"] = head_dim
    return AutoConfig.for_model(fam.model_type, **kwargs)


def model_config(
    family: str = "qwen2.5-coder", size: str = "tiny", dtype: str | None = None
) -> Any:
    """The `transformers` config a build of `family`/`size` gets (trains the
    family's tokenizer into the cache if it is not there yet)."""
    from tokenizers import Tokenizer

    fam, spec = _resolve(family, size)
    tokenizer = Tokenizer.from_file(str(ensure_tokenizer(family)))
    return _model_config(fam, spec, tokenizer, _dtype_name(spec, dtype))


def parameter_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the stored parameters (a tied LM head is not stored);
    the model is laid out on the meta device, so this is cheap at any size."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=True)]


# ---------------------------------------------------------------------------
# training


@contextlib.contextmanager
def _deterministic_torch(threads: int, seed: int) -> Iterator[None]:
    """Seeded, deterministic kernels and a pinned thread count (the order of float
    sums depends on it); the caller's RNG state and settings come back after."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


class _SampleMaker:
    """Fixed-length training sequences of token ids, FIM and left-to-right."""

    def __init__(self, fam: Family, tokenizer: Tokenizer, texts: Sequence[str], seed: int) -> None:
        self.fam = fam
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.texts = [t for t in texts if len(t) > 400]

        def tid(token: str) -> int:
            i = tokenizer.token_to_id(token)
            if i is None:
                raise ValueError(f"{token!r} missing from the tokenizer")
            return int(i)

        self.tid = tid
        self.eos = tid(fam.eos)
        self.pad = tid(fam.pad) if fam.pad is not None else self.eos
        self.lead = [tid(fam.bos)] if fam.bos is not None else []
        stream: list[int] = []
        for enc in tokenizer.encode_batch(list(self.texts), add_special_tokens=False):
            stream += [*self.lead, *enc.ids, self.eos]
        self.stream = stream
        self.chars_per_token = sum(len(t) for t in self.texts) / max(1, len(stream))
        # Window starts: line starts that leave at least a few lines after them.
        self.line_starts = [
            [0, *(i + 1 for i, c in enumerate(t) if c == "\n" and i < len(t) - 300)]
            for t in self.texts
        ]

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids) if text else []

    def left_to_right(self, length: int) -> tuple[list[int], int]:
        start = self.rng.randrange(0, len(self.stream) - length)
        return self.stream[start : start + length], length

    def fim(self, length: int) -> tuple[list[int], int]:
        fam, rng = self.fam, self.rng
        doc = rng.randrange(len(self.texts))
        text, starts = self.texts[doc], self.line_starts[doc]
        window_chars = int(length * self.chars_per_token * 1.3)
        start = starts[rng.randrange(len(starts))]
        window = text[start : start + window_chars]
        # The middle starts at a line start or inside a line (the editor's cursor)
        # and runs for one to a few lines.
        lo = len(window) // 5
        m0 = rng.randrange(lo, max(lo + 1, len(window) * 3 // 4))
        if rng.random() < 0.5:
            m0 = window.rfind("\n", 0, m0) + 1
        m1 = m0
        for _ in range(rng.choice((1, 1, 2, 3, 4))):
            nl = window.find("\n", m1 + 1)
            m1 = nl if nl != -1 else len(window)
        prefix, middle, suffix = window[:m0], window[m0:m1], window[m1:]
        p_ids, m_ids, s_ids = self._encode(prefix), self._encode(middle), self._encode(suffix)
        # A middle too long to fit is cut and then has no end token: the sample
        # still teaches continuation, never an end in the middle of a line.
        ended = len(m_ids) <= length // 3
        m_ids = m_ids[: length // 3]
        n_markers = len(self.lead) + 2 + (fam.fim_middle is not None) + ended
        budget = max(0, length - n_markers - len(m_ids))
        s_keep = min(len(s_ids), max(budget // 3, budget - len(p_ids)))
        p_keep = min(len(p_ids), budget - s_keep)
        p_ids = p_ids[len(p_ids) - p_keep :]
        s_ids = s_ids[:s_keep]
        pre = [self.tid(fam.fim_prefix), *p_ids]
        suf = [self.tid(fam.fim_suffix), *s_ids]
        head = [*self.lead, *(suf + pre if fam.suffix_first else pre + suf)]
        if fam.fim_middle is not None:
            head.append(self.tid(fam.fim_middle))
        seq = [*head, *m_ids, *([self.tid(fam.fim_end)] if ended else [])]
        used = len(seq)
        return seq + [self.pad] * (length - used), used

    def batch(self, size: int, length: int) -> tuple[list[list[int]], list[int]]:
        rows: list[list[int]] = []
        used: list[int] = []
        for _ in range(size):
            make = self.fim if self.rng.random() < _FIM_FRACTION else self.left_to_right
            ids, n = make(length)
            rows.append(ids)
            used.append(n)
        return rows, used


def _train(
    model: Any, fam: Family, tokenizer: Tokenizer, texts: Sequence[str], steps: int, seed: int
) -> float:
    """AdamW on FIM + left-to-right samples; returns the mean loss of the last steps."""
    import torch

    maker = _SampleMaker(fam, tokenizer, texts, seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=_TRAIN_LR, betas=(0.9, 0.95), weight_decay=0.01
    )

    def lr_at(step: int) -> float:
        if step < _TRAIN_WARMUP:
            return (step + 1) / _TRAIN_WARMUP
        progress = (step - _TRAIN_WARMUP) / max(1, steps - _TRAIN_WARMUP)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    recent: list[float] = []
    for step in range(steps):
        rows, used = maker.batch(_TRAIN_BATCH, _TRAIN_SEQ_LEN)
        input_ids = torch.tensor(rows, dtype=torch.long)
        labels = input_ids.clone()
        for r, n in enumerate(used):
            labels[r, n:] = -100
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        value = loss.item()
        recent = [*recent[-19:], value]
        if step % 50 == 0 or step == steps - 1:
            logger.debug("step %d/%d loss %.3f", step + 1, steps, value)
    model.eval()
    return sum(recent) / max(1, len(recent))


# ---------------------------------------------------------------------------
# building


def _resolve(family: str, size: str) -> tuple[Family, ModelSize]:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    spec = SIZES[size]
    if spec.families is not None and family not in spec.families:
        raise ValueError(f"size {size!r} exists only for {', '.join(spec.families)}")
    return FAMILIES[family], spec


def _dtype_name(spec: ModelSize, dtype: str | None) -> str:
    name = dtype or spec.default_dtype
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(_DTYPES)}")
    return name


def build_model(
    out_dir: str | Path,
    family: str = "qwen2.5-coder",
    size: str = "tiny",
    seed: int = 0,
    train_steps: int = 0,
    dtype: str | None = None,
) -> Path:
    """Write a complete model directory to `out_dir` and return its path.

    `dtype` is one of float32, bfloat16, float16; by default float32 for `tiny`
    and bfloat16 for the real-sized shapes.
    """
    fam, spec = _resolve(family, size)
    dtype_name = _dtype_name(spec, dtype)
    if train_steps < 0:
        raise ValueError("train_steps must be >= 0")
    if train_steps and size != "tiny":
        raise ValueError("training is only supported for the tiny size")

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total_started = time.perf_counter()

    started = time.perf_counter()
    tok_path = ensure_tokenizer(family, TOKENIZER_VOCAB_SIZE)
    tokenizer = Tokenizer.from_file(str(tok_path))
    logger.info("tokenizer ready in %.1f s", time.perf_counter() - started)
    shutil.copyfile(tok_path, out / "tokenizer.json")

    config = _model_config(fam, spec, tokenizer, dtype_name)
    specs = parameter_shapes(config)
    gemma_norms = fam.model_type == "gemma"
    n_params = sum(math.prod(s) for _, s in specs)

    started = time.perf_counter()
    weights = out / "model.safetensors"
    final_loss: float | None = None
    corpus: str | None = None
    if train_steps == 0:
        shapes = dict(specs)

        def make(name: str) -> torch.Tensor:
            return _init_tensor(name, shapes[name], getattr(torch, dtype_name), seed, gemma_norms)

        _write_safetensors(weights, specs, dtype_name, make)
        logger.info(
            "initialised %s %s (%.1fM parameters, %s) in %.1f s",
            family,
            size,
            n_params / 1e6,
            dtype_name,
            time.perf_counter() - started,
        )
    else:
        texts = corpus_texts()
        corpus = _corpus_digest(texts)
        with _deterministic_torch(threads=1, seed=seed):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            params = dict(model.named_parameters(remove_duplicate=True))
            with torch.no_grad():
                for name, shape in specs:
                    params[name].copy_(_init_tensor(name, shape, torch.float32, seed, gemma_norms))
            final_loss = _train(model, fam, tokenizer, texts, train_steps, seed)
        logger.info(
            "trained %s %s for %d steps in %.1f s (loss over the last steps %.2f)",
            family,
            size,
            train_steps,
            time.perf_counter() - started,
            final_loss,
        )
        _write_safetensors(weights, specs, dtype_name, params.__getitem__)

    config.save_pretrained(out)
    gen = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    gen.save_pretrained(out)
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": fam.bos,
        "eos_token": fam.eos,
        "pad_token": fam.pad if fam.pad is not None else fam.eos,
        "unk_token": None,
        "add_bos_token": fam.bos is not None,
        "add_eos_token": False,
        "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    build_info = {
        "builder_version": BUILDER_VERSION,
        "family": family,
        "size": size,
        "seed": seed,
        "train_steps": train_steps,
        "dtype": dtype_name,
        "parameters": n_params,
        "shape": asdict(spec),
        "tokenizer_vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "final_loss": None if final_loss is None else round(final_loss, 4),
        "corpus_sha256": corpus,
        "tokenizer_sha256": hashlib.sha256(tok_path.read_bytes()).hexdigest(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    (out / "exlsp-build.json").write_text(json.dumps(build_info, indent=2) + "\n", "utf-8")
    logger.info("built %s in %.1f s", out, time.perf_counter() - total_started)
    return out


def ensure_model(
    family: str = "qwen2.5-coder", size: str = "tiny", seed: int = 0, train_steps: int = 0
) -> Path:
    """The cached build for these parameters, built (once, under a lock) if missing."""
    _resolve(family, size)
    models_dir = cache_dir() / "models"
    name = model_dir_name(family, size, seed, train_steps)
    target = models_dir / name
    if target.is_dir():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_dir / f".{name}.lock"):
        if target.is_dir():
            return target
        # Holding the lock, any temp dir of this name is left from a crashed build.
        for stale in models_dir.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".tmp-{name}-"))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache may be shared
            build_model(tmp, family=family, size=size, seed=seed, train_steps=train_steps)
            os.replace(tmp, target)
            logger.info("cached %s", target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if target.is_dir():  # another process without the lock won the race
                return target
            raise
    return target


def default_model_dir() -> Path:
    """The model the server uses when none is configured (built on first use)."""
    return ensure_model(**DEFAULT_MODEL)


# ---------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exlsp.benchmarks.build_model", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--family", default=DEFAULT_MODEL["family"], choices=sorted(FAMILIES))
    parser.add_argument("--size", default=DEFAULT_MODEL["size"], choices=list(SIZES))
    parser.add_argument("--seed", type=int, default=DEFAULT_MODEL["seed"])
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help=f"default: {DEFAULT_MODEL['train_steps']} for tiny, 0 for the real-sized shapes",
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: the exlsp cache")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.verbose:
        logger.setLevel(logging.DEBUG)  # training losses; other libraries stay at INFO
    if args.train_steps is None:
        args.train_steps = DEFAULT_MODEL["train_steps"] if args.size == "tiny" else 0
    try:
        if args.out is None:
            if args.dtype is not None:
                parser.error("--dtype needs --out (cached builds use the size's dtype)")
            path = ensure_model(args.family, args.size, args.seed, args.train_steps)
        else:
            path = build_model(
                args.out, args.family, args.size, args.seed, args.train_steps, args.dtype
            )
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
