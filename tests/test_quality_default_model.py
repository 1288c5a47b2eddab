"""The shipped default model, its training script, and budgets that fit a short context."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from exlsp.benchmarks import train_default_model as tdm
from exlsp.completion.builtin_model import shipped_model_dir
from exlsp.completion.config import CompletionConfig, EngineConfig, ModelConfig
from exlsp.completion.service import CompletionService, fit_budgets, resolve_model_dir
from exlsp.completion.types import CompletionRequest, DocumentView

ROOT = Path(__file__).resolve().parent.parent


def test_the_default_model_ships_in_the_package() -> None:
    path = shipped_model_dir()
    assert path is not None and path == ROOT / "completion" / "default_model"
    assert resolve_model_dir(ModelConfig()) == path
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    weights = path / "model.safetensors"
    assert weights.stat().st_size < 30 * 2**20
    build = json.loads((path / "exlsp-build.json").read_text())
    assert 1_000_000 <= build["parameters"] <= 50_000_000
    assert build["tokens"] > 0 and build["steps"] == build["config"]["steps"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"exlsp\.completion" = \[[^\]]*"default_model/\*"', pyproject)


def test_the_training_corpus_is_permissively_licensed() -> None:
    path = shipped_model_dir()
    assert path is not None
    corpus = json.loads((path / "corpus.json").read_text())
    used = [s for s in corpus["sources"] if s["files"] > 0]
    assert used and all(tdm.is_permissive(s["licence"]) for s in used)
    assert sum(s["bytes"] for s in used) == corpus["bytes"]
    assert all(s["dropped_benchmark"] >= 0 for s in used)


@pytest.mark.parametrize(
    ("licence", "ok"),
    [
        ("MIT", True),
        ("BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", True),
        ("Apache-2.0 OR BSD-2-Clause", True),
        ("PSF-2.0", True),
        ("MPL-2.0 AND MIT", False),
        ("Mozilla Public License 2.0 (MPL 2.0)", False),
        ("GPL-3.0-or-later", False),
        ("LGPL-2.1", False),
        ("", False),
    ],
)
def test_licence_filter(licence: str, ok: bool) -> None:
    assert tdm.is_permissive(licence) is ok


def test_budgets_fit_a_short_context() -> None:
    config = CompletionConfig()
    assert fit_budgets(config, 8192) == config
    fitted = fit_budgets(config, 512)
    total = fitted.prefixTokens + fitted.suffixTokens + fitted.middleTokens + fitted.snippetTokens
    assert total + fitted.maxTokens <= 512
    assert fitted.prefixTokens > fitted.suffixTokens > 0 and fitted.snippetTokens > 0


def test_the_readme_example_gets_a_suggestion_from_the_shipped_model() -> None:
    # The README's first command: `exlsp complete tests/data/example.py:14:11`.
    lines = (ROOT / "tests" / "data" / "example.py").read_text().splitlines(keepends=True)
    assert lines[13].rstrip() == "    return"
    doc = DocumentView("file:///example.py", lines, 13, 10, "python", "example.py")

    async def run() -> str:
        service = CompletionService(EngineConfig(model=ModelConfig(threads=1)))
        await service.start()
        assert service.state == "ready", service.error
        try:
            assert service.engine is not None
            assert service.engine.config.prefixTokens + 128 <= service.context_length
            result = await service.complete(CompletionRequest(doc))
        finally:
            service.close()
        return result.suggestions[0].text if result.suggestions else ""

    assert asyncio.run(run()).strip()


def _small(steps: int, **changes: object) -> tdm.TrainConfig:
    config = tdm.TrainConfig(
        vocab_size=512,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        seq_len=128,
        batch_rows=2,
        steps=steps,
        decay_fraction=0.0,
        warmup_steps=2,
        stdlib_bytes=150_000,
        max_bytes_per_source=10_000,
        stdlib_tests_bytes=0,
        tokenizer_sample_bytes=100_000,
        eval_every=2,
        checkpoint_every=2,
    )
    return replace(config, **changes)


@pytest.mark.slow
def test_training_is_reproducible_and_resumable(tmp_path: Path) -> None:
    import torch

    straight = tmp_path / "straight"
    tdm.train(_small(4), straight)
    resumed = tmp_path / "resumed"
    tdm.train(_small(2), resumed)
    tdm.train(_small(4), resumed)  # continues from the step-2 checkpoint
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4 and a["tokens"] == b["tokens"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    log = [json.loads(line) for line in (straight / "train-log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] + 1.0 and "eval_middle_loss" in log[-1]

    out = tdm.export(_small(4), straight, tmp_path / "model")
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    from exlsp.completion.backends.transformers_backend import TransformersBackend
    from exlsp.completion.fim import resolve_template

    backend = TransformersBackend(ModelConfig(device="cpu", threads=1), out)
    fim = resolve_template("auto", backend.tokenizer, out)
    assert fim.template.family == "qwen2.5-coder"
    assert backend.info.context_length == 128


def test_samples_follow_the_engine_layout() -> None:
    from tokenizers import Tokenizer

    files = [
        tdm.SourceFile("pkg", "pkg/a.py", "pkg", "def helper(x):\n    return x + 1\n" * 40),
        tdm.SourceFile("pkg", "pkg/b.py", "pkg", "import a\n\nvalue = helper(2)\n" * 40),
    ]
    from exlsp.benchmarks.build_model import FAMILIES, train_tokenizer

    tokenizer = train_tokenizer(FAMILIES["qwen2.5-coder"], 300, [f.text for f in files])
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    maker = tdm.SampleMaker(tokenizer, files, 256, tdm.SampleMix())
    rows, used = maker.batch(0, 0, 4)
    assert rows == maker.batch(0, 0, 4)[0], "a batch depends only on (seed, step)"
    assert rows != maker.batch(0, 1, 4)[0]
    t = maker.t
    for row, n in zip(rows, used, strict=True):
        assert len(row) == 256 and 0 < n <= 256
    import random

    rng = random.Random(1)
    for _ in range(20):
        sample = maker.fim_sample(rng, 200, engine=True)
        if sample is None:
            continue
        assert sample[-1] == t.eos and sample.count(t.middle) == 1
        psm = sample.index(t.prefix) < sample.index(t.suffix) < sample.index(t.middle)
        spm = sample.index(t.prefix) + 1 == sample.index(t.suffix)
        assert psm or spm
