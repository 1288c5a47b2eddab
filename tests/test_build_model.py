"""The tiny-model builder: every family loads, tokenizes and runs; builds are
deterministic; the default (trained) model writes code after a FIM prompt."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from exlsp.benchmarks import build_model as bm
from exlsp.completion.tokenizer import HfTokenizer

FAMILY_NAMES = sorted(bm.FAMILIES)
CODE = "def add(a, b):\n    return a + b  # sum\n\n\nclass Point:\n    x: int = 0\n"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache for this module: builds start from nothing, tokenizers included."""
    return tmp_path_factory.mktemp("exlsp-cache")


@pytest.fixture
def cache(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EXLSP_CACHE_DIR", str(cache_root))
    return cache_root


@pytest.fixture(scope="module")
def tiny_dirs(cache_root: Path) -> dict[str, Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXLSP_CACHE_DIR", str(cache_root))
        return {name: bm.ensure_model(name, "tiny") for name in FAMILY_NAMES}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_build_loads_and_runs(family: str, tiny_dirs: dict[str, Path]) -> None:
    fam = bm.FAMILIES[family]
    path = tiny_dirs[family]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [fam.architecture]
    assert config["model_type"] == fam.model_type
    assert config["max_position_embeddings"] >= 4096
    assert json.loads((path / "tokenizer_config.json").read_text())["model_max_length"] >= 4096
    build = json.loads((path / "exlsp-build.json").read_text())
    assert build["builder_version"] == bm.BUILDER_VERSION
    assert (build["family"], build["size"], build["seed"], build["train_steps"]) == (
        family,
        "tiny",
        0,
        0,
    )

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == fam.architecture
    tok = HfTokenizer(path)
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(CODE)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_special_tokens(family: str, tiny_dirs: dict[str, Path]) -> None:
    fam = bm.FAMILIES[family]
    path = tiny_dirs[family]
    tok = HfTokenizer(path)
    raw = RustTokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.special_tokens == frozenset(fam.special_tokens)
    fim = [fam.fim_prefix, fam.fim_suffix, fam.fim_middle, fam.fim_end]
    for token in [t for t in fim if t is not None] + list(fam.special_tokens):
        i = tok.token_to_id(token)
        assert i is not None, token
        # With special matching on, the marker text is exactly that one id.
        assert raw.encode(token, add_special_tokens=False).ids == [i], token
    assert tok.token_to_id(fam.eos) in tok.eos_ids
    if fam.bos is None:
        assert tok.bos_id is None
    else:
        assert tok.bos_id == tok.token_to_id(fam.bos)
        assert tok.bos_id not in tok.eos_ids

    hf = AutoTokenizer.from_pretrained(path)
    assert hf.eos_token == fam.eos
    assert hf(CODE, add_special_tokens=False)["input_ids"] == tok.encode(CODE)
    with_specials = hf(CODE)["input_ids"]
    assert (with_specials[0] == tok.bos_id) == (fam.bos is not None)
    assert tok.decode(tok.encode(CODE)) == CODE


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_marker_text_in_a_file_stays_text(family: str, tiny_dirs: dict[str, Path]) -> None:
    fam = bm.FAMILIES[family]
    tok = HfTokenizer(tiny_dirs[family])
    special_ids = {tok.token_to_id(t) for t in fam.special_tokens}
    for token in fam.special_tokens:
        text = f"x = '{token}'\n"
        ids = tok.encode(text)
        assert not special_ids & set(ids), token
        assert tok.decode(ids) == text


def test_long_prompt_fits(tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs["qwen2.5-coder"]
    tok = HfTokenizer(path)
    ids = (tok.encode(CODE) * 200)[:2100]
    assert len(ids) == 2100
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert torch.isfinite(logits[0, -1]).all()


def test_same_seed_same_bytes_other_seed_differs(cache: Path, tmp_path: Path) -> None:
    a = bm.build_model(tmp_path / "a", family="codellama", seed=3)
    b = bm.build_model(tmp_path / "b", family="codellama", seed=3)
    c = bm.build_model(tmp_path / "c", family="codellama", seed=4)
    weights = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_training_is_deterministic(cache: Path, tmp_path: Path) -> None:
    a = bm.build_model(tmp_path / "a", family="deepseek-coder", seed=1, train_steps=2)
    b = bm.build_model(tmp_path / "b", family="deepseek-coder", seed=1, train_steps=2)
    untrained = bm.build_model(tmp_path / "c", family="deepseek-coder", seed=1)
    weights = [(p / "model.safetensors").read_bytes() for p in (a, b, untrained)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    assert json.loads((a / "exlsp-build.json").read_text())["final_loss"] > 0


def test_ensure_model_builds_once_under_concurrency(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_build = bm.build_model

    def counting_build(out_dir: Path, **kwargs: Any) -> Path:
        calls.append(str(out_dir))
        return real_build(out_dir, **kwargs)

    monkeypatch.setattr(bm, "build_model", counting_build)
    results: list[Path] = []

    def worker() -> None:
        results.append(bm.ensure_model("starcoder2", "tiny", seed=7))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = cache / "models" / f"starcoder2-tiny-s7-t0-v{bm.BUILDER_VERSION}"
    assert results == [expected] * 3
    assert len(calls) == 1
    assert (expected / "model.safetensors").is_file()
    assert not list((cache / "models").glob(".tmp-*"))


def test_real_sized_shapes_match_qwen_coder(cache: Path) -> None:
    # Laid out on the meta device only: nothing is allocated.
    counts = {}
    for size in ("1.5b", "7b"):
        shapes = bm.parameter_shapes(bm.model_config("qwen2.5-coder", size))
        counts[size] = sum(math.prod(s) for _, s in shapes)
    assert 1.53e9 < counts["1.5b"] < 1.55e9
    assert 7.6e9 < counts["7b"] < 7.63e9
    with pytest.raises(ValueError):
        bm.ensure_model("codellama", "7b")


def test_cli_writes_a_model(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    assert bm.main(["--family", "codestral", "--train-steps", "0", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "exlsp-build.json",
    ):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_default_model_writes_code_after_a_fim_prompt(trained_model: Path) -> None:
    # `trained_model` (conftest) is the server's default build, shared with the other
    # tests through the test cache: the model that must produce a suggestion.
    path = trained_model
    assert path.name == bm.model_dir_name(**bm.DEFAULT_MODEL)
    tok = HfTokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()

    def tid(token: str) -> int:
        i = tok.token_to_id(token)
        assert i is not None
        return i

    prefix = "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        "
    suffix = "\n\n    def __repr__(self):\n        return f'Point({self.x})'\n"
    ids = [tid("<|fim_prefix|>"), *tok.encode(prefix), tid("<|fim_suffix|>")]
    ids += [*tok.encode(suffix), tid("<|fim_middle|>")]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    new = out[0, len(ids) :].tolist()
    special = {tid(t) for t in bm.FAMILIES["qwen2.5-coder"].special_tokens}
    plain: list[int] = []
    for i in new:
        if i in special:
            break
        plain.append(i)
    assert len(plain) >= 3, new
    assert tok.decode(plain).strip(), tok.decode(plain)
