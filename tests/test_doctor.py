"""`exlsp doctor` on this machine: the table, and its verdict per backend."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from exlsp.completion.config import ModelConfig
from exlsp.server.doctor import run_doctor

NO_GPU = not torch.cuda.is_available()


def doctor(model: ModelConfig, **kw: bool) -> tuple[int, list[str]]:
    out = io.StringIO()
    rc = run_doctor(model, out, **kw)
    lines = out.getvalue().rstrip("\n").splitlines()
    assert lines[-1].startswith("next: "), lines[-1]
    return rc, lines[:-1]


def rows(lines: list[str]) -> dict[str, str]:
    """Label -> value of the table (continuation lines left out)."""
    table = {}
    for line in lines:
        if line.startswith("  ") and line[2] != " ":
            label, _, value = line[2:].partition("  ")
            table[label.strip()] = value.strip()
    return table


def exl2_dir(tmp_path: Path) -> Path:
    """A minimal EXL2-looking model directory: config.json and one packed layer."""
    from safetensors.torch import save_file

    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "max_position_embeddings": 32768,
        "quantization_config": {"quant_method": "exl2", "bits": 4.0, "head_bits": 6},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(1000, 64, dtype=torch.float16),
            "model.layers.0.mlp.down_proj.q_weight": torch.zeros(8, 64, dtype=torch.int32),
            "model.layers.0.mlp.down_proj.q_invperm": torch.zeros(256, dtype=torch.int32),
            "model.layers.0.mlp.down_proj.q_scale": torch.zeros(2, 64, dtype=torch.int32),
        },
        str(tmp_path / "output.safetensors"),
    )
    return tmp_path


def test_transformers_backend_runs_here(tiny_model: Path) -> None:
    rc, lines = doctor(ModelConfig(path=str(tiny_model), backend="transformers"))
    table = rows(lines)
    assert rc == 0, lines[-1]
    assert lines[-1].startswith("ok: the transformers backend serves")
    assert table["architecture"] == "Qwen2ForCausalLM (qwen2)"
    assert table["FIM template"] == "qwen2.5-coder (detected)"
    assert table["loads"].startswith("yes, in")
    assert table["parameters"] == table["parameters (loaded)"]
    for label in ("GPU" if NO_GPU else "GPU 0", "torch", "exllamav2", "flash-attn", "size on disk"):
        assert label in table
    if NO_GPU:
        assert table["GPU"].startswith("none")
        assert table["exllamav2 import"].startswith("not tried")
        if table["exllamav2"] != "not installed":
            assert table["exllamav2 import"] == "not tried: no GPU"


def test_table_is_aligned(tiny_model: Path) -> None:
    _, lines = doctor(ModelConfig(path=str(tiny_model)), load=False)
    body = [line for line in lines if line.startswith("  ")]
    starts = {
        len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in body if line[2] != " "
    }
    assert len(body) > 10
    assert len(starts) == 1


@pytest.mark.skipif(not NO_GPU, reason="checks the verdict on a machine without a GPU")
def test_exllamav2_backend_without_a_gpu_is_not_ready(tiny_model: Path) -> None:
    rc, lines = doctor(ModelConfig(path=str(tiny_model), backend="exllamav2"))
    assert rc != 0
    assert lines[-1].startswith("not ready: ")
    assert "CUDA GPU" in lines[-1]
    assert rows(lines)["loads"] == "not tried"


def test_exl2_model_facts_come_from_config_and_headers(tmp_path: Path) -> None:
    rc, lines = doctor(ModelConfig(path=str(exl2_dir(tmp_path)), backend="transformers"))
    table = rows(lines)
    assert table["weights"] == "EXL2 4.0 bpw (head 6 bit)"
    assert table["parameters"] == f"{1000 * 64 + 256 * 64:,}"
    assert table["context (model)"] == "32768 tokens"
    assert rc == 1
    assert "exllamav2 backend" in lines[-1]


def test_missing_or_broken_model_dir(tmp_path: Path) -> None:
    rc, lines = doctor(ModelConfig(path=str(tmp_path / "nowhere")))
    assert rc == 1 and "model directory not found" in lines[-1]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    rc, lines = doctor(ModelConfig(path=str(tmp_path), backend="transformers"))
    assert rc == 1
    assert lines[-1].startswith("not ready: the transformers backend cannot load")
    assert rows(lines)["loads"].startswith("no: ")


def test_unknown_backend_is_not_ready(tiny_model: Path) -> None:
    rc, lines = doctor(ModelConfig(path=str(tiny_model), backend="nonesuch"))
    assert rc == 1
    assert "nonesuch" in lines[-1]


def test_ends_with_the_pull_that_fits_when_no_model_is_set(tmp_path: Path) -> None:
    from exlsp.completion.models import find

    out = io.StringIO()
    run_doctor(ModelConfig(path=str(tmp_path / "missing"), backend="transformers"), out, load=False)
    last = out.getvalue().rstrip("\n").splitlines()[-1]
    assert last.startswith("next: exlsp pull "), last
    assert find(last.split()[3]) is not None  # a catalogue model
    assert "the largest catalogue model that fits" in last


def test_the_fallback_chain_and_the_assist_model_are_listed(tmp_path: Path) -> None:
    instruct = tmp_path / "instruct"
    instruct.mkdir()
    (instruct / "chat_template.jinja").write_text("{{ messages }}")
    model = ModelConfig(
        backend="transformers",
        path=str(tmp_path / "missing"),
        fallback=[
            {"backend": "openai", "baseUrl": "http://gpu-pool:8000/v1", "apiKey": "k-secret"},
            {"path": ""},
        ],
    )
    out = io.StringIO()
    assist = ModelConfig(backend="transformers", path=str(instruct))
    run_doctor(model, out, load=False, assist=assist)
    text = out.getvalue()
    table = rows(text.splitlines())
    assert table["fallback 1"] == "openai: http://gpu-pool:8000/v1"
    assert table["fallback 2"] == "transformers: the built-in model"
    assert table["assist model"] == f"transformers: {instruct}"
    assert "chat template: yes" in text and "k-secret" not in text
    out = io.StringIO()
    run_doctor(ModelConfig(backend="transformers"), out, load=False)
    assert "the completion model (assist.backend is empty)" in out.getvalue()
