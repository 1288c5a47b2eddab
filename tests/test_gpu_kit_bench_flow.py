"""The GPU benchmark's flow on the CPU: `gpu_bench.main` as the kit calls it, with the
transformers backend on the tiny model standing in for exllamav2, so a mistake in the
benchmark's Python shows here rather than in the minutes of a lent GPU machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exlsp.benchmarks import gpu_bench
from exlsp.completion.config import ModelConfig

pytestmark = pytest.mark.slow


def test_the_benchmark_runs_every_section_and_writes_them_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exlsp.benchmarks import exl2_dynamic
    from exlsp.completion.backends import exllamav2
    from exlsp.completion.backends.transformers_backend import TransformersBackend

    models = tmp_path / "models"
    hf_dir = models / "qwen2.5-coder-tiny-hf"

    def fake_load(config: ModelConfig, *args: Any, **kwargs: Any) -> TransformersBackend:
        b = TransformersBackend(ModelConfig(path=str(hf_dir), device="cpu", threads=1), hf_dir)
        b.vram_bytes = 0  # type: ignore[attr-defined]
        b.draft_proposed = b.draft_accepted = 0  # type: ignore[attr-defined]
        return b

    real_lsp_replay = gpu_bench.lsp_replay

    def lsp_on_cpu(model_dir: Path, backend: str, keystrokes: int, **kw: Any) -> Any:
        return real_lsp_replay(hf_dir, "transformers", keystrokes, **kw)

    monkeypatch.setattr(exllamav2, "load_exllamav2_backend", fake_load)
    monkeypatch.setattr(exl2_dynamic, "load_exl2_dynamic", fake_load)
    monkeypatch.setattr(gpu_bench, "lsp_replay", lsp_on_cpu)
    monkeypatch.setattr(gpu_bench, "HF_DEVICE", "cpu")
    monkeypatch.setattr(gpu_bench, "HF_DTYPE", "float32")
    monkeypatch.setattr(gpu_bench, "_cuda_ok", lambda: True)
    monkeypatch.setattr(gpu_bench, "machine_info", lambda packages: {"gpu": "CPU stand-in"})
    monkeypatch.setattr(gpu_bench, "GENERATED", 4)
    # As the kit's bench stage runs it (benchmarks/gpu_kit.py `_bench_argv`).
    argv = ["--models-dir", str(models), "--sizes", "tiny", "--maker", "writer", "--no-index"]
    argv += ["--name", "bench", "--results-dir", str(tmp_path), "--keystrokes", "4"]
    argv += ["--hf-keystrokes", "2"]
    assert gpu_bench.main(argv) == 0

    data = json.loads((tmp_path / "gpu-bench.json").read_text())
    sections = data["sizes"]["tiny"]
    order = list(sections)
    assert order.index("d_transformers_fp16") < order.index("ngram_draft_on")
    assert order.index("lsp_replay_reuse_off") < order.index("mode_dynamic_reuse_on")
    # The fake has no exllamav2 cache: only the raw loop fails, and is recorded as such.
    assert "error" in sections["a_raw_exllamav2"]
    for name in (
        "a_backend_exllamav2",
        "b_replay_reuse_on",
        "c_replay_reuse_off",
        "cancel_latency",
        "d_transformers_fp16",
        "lsp_replay_reuse_on",
        "lsp_replay_reuse_off",
        "ngram_draft_on",
        "mode_dynamic_reuse_on",
    ):
        assert "error" not in sections[name], (name, sections[name])
    on, off = sections["b_replay_reuse_on"], sections["c_replay_reuse_off"]
    assert on["prefilled_tokens"]["median"] < off["prefilled_tokens"]["median"]
    assert "p95" in on["total_ms"]
    assert sections["d_transformers_fp16"]["replay_reuse_on"]["keystrokes"] == 2
    assert sections["model"]["prompt_tokens"] >= gpu_bench.MIN_PROMPT
