"""The model catalogue and its memory sizing (pure arithmetic: no GPU, no download)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from exlsp.completion import models
from exlsp.completion.fim import TEMPLATES
from exlsp.server.cli import main

DATA = Path(__file__).parent / "data" / "published_vram.json"
REQUIRED = {
    "qwen2.5-coder-0.5b",
    "qwen2.5-coder-1.5b",
    "qwen2.5-coder-3b",
    "qwen2.5-coder-7b",
    "qwen2.5-coder-14b",
    "starcoder2-3b",
    "starcoder2-7b",
    "starcoder2-15b",
    "deepseek-coder-1.3b",
    "deepseek-coder-6.7b",
    "codegemma-2b",
    "codegemma-7b",
    "codestral-22b",
}
FIELDS = {
    "parameters",
    "context",
    "licence",
    "layers",
    "attentionHeads",
    "kvHeads",
    "headDim",
    "hiddenSize",
    "vocabSize",
    "tiedEmbeddings",
    "gguf",
    "exl2",
}


def test_every_entry_has_sources_and_consistent_facts() -> None:
    raw = json.loads(models.DATA.read_text())["models"]
    assert {m["name"] for m in raw} >= REQUIRED
    for m in raw:
        entry = models.find(m["name"])
        assert entry is not None
        assert entry.sources, m["name"]
        # The model's own card and config.json are among the sources.
        assert any(s.startswith(f"https://huggingface.co/{m['repo']}") for s in entry.sources)
        assert any("config.json" in s for s in entry.sources), m["name"]
        assert set(entry.unverified) <= FIELDS, m["name"]
        assert entry.fim_template in TEMPLATES, m["name"]
        assert (
            entry.kv_heads <= entry.attention_heads and entry.attention_heads % entry.kv_heads == 0
        )
        # head_dim = hidden_size / num_attention_heads, except where config.json sets
        # head_dim itself (Gemma 7B: 16 heads of 256 over a hidden size of 3072).
        if entry.fim_template != "codegemma":
            assert entry.head_dim * entry.attention_heads == entry.hidden_size, m["name"]
        for exl2 in entry.exl2:
            assert exl2.branches and set(exl2.head_bits) == set(exl2.branches)
            assert any(exl2.repo in s for s in entry.sources), exl2.repo
            for branch, bpw in exl2.branches.items():
                assert re.fullmatch(r"\d+_\d+", branch) and float(branch.replace("_", ".")) == bpw


def _variant(name: str, branch: str, head_bits: float | None = None) -> models.Variant:
    entry = models.find(name)
    assert entry is not None
    for v in models.variants(entry, "exllamav2"):
        if v.revision == branch:
            return v
    # An EXL2 size of another repository of the same architecture (test data only).
    bpw = float(branch.replace("_", "."))
    assert head_bits is not None
    return models.Variant(entry, "exllamav2", "-", branch, bpw, head_bits, exl2=True)


@pytest.mark.parametrize("case", json.loads(DATA.read_text())["cases"], ids=lambda c: c["model"])
def test_estimate_matches_the_hand_computation_and_the_published_size(case: dict) -> None:
    # By hand, bytes (P parameters, V×H the output head, bpw and head bits of the branch;
    # KV = layers × 2 × KV heads × head dim × 2 bytes (fp16) × 4096 tokens):
    # starcoder2-15b 6_5: 15.96e9 × 6.5/8 = 12,967,500,000 + 49152×6144 × (8−6.5)/8 = 56,623,104
    #   = 13,024,123,104; KV 40×2×4×128×2 × 4096 = 335,544,320; + 512 MiB = 13,896,538,336
    #   (published 13.9 GB).
    # codestral-22b 6_5: 22.25e9 × 6.5/8 = 18,078,125,000 + 32768×6144 × 1.5/8 = 37,748,736
    #   = 18,115,873,736; KV 56×2×8×128×2 × 4096 = 939,524,096; + 536,870,912 = 19,592,268,744
    #   (published 19.4 GB).
    # starcoder2-7b 4_25: 7.17e9 × 4.25/8 = 3,809,062,500 + 49152×4608 × (6−4.25)/8 = 49,545,216
    #   = 3,858,607,716; KV 32×2×4×128×2 × 4096 = 268,435,456; + 536,870,912 = 4,663,914,084
    #   (published 5.1 GB).
    # qwen2.5-coder-7b 6_5 (head 8): 7.61e9 × 6.5/8 = 6,183,125,000 + 152064×3584 × 1.5/8
    #   = 102,187,008 → 6,285,312,008; KV 28×2×4×128×2 × 4096 = 234,881,024; + 536,870,912
    #   = 7,057,063,944 (published 7.2 GB).
    v = _variant(case["model"], case["branch"], case.get("headBits"))
    est = models.estimate(v, max_seq_len=case["maxSeqLen"], cache_type="fp16", second_cache=False)
    hand = case["handBytes"]
    assert (est.weights, est.kv_cache, est.working, est.total) == (
        hand["weights"],
        hand["kvCache"],
        hand["working"],
        hand["total"],
    )
    published = case["publishedGB"] * 1e9
    assert abs(est.total - published) <= 0.10 * published, (est.total, published)


def test_cache_types_and_the_second_cache() -> None:
    v = _variant("starcoder2-15b", "6_5")
    fp16 = models.estimate(v, max_seq_len=8192, cache_type="fp16")
    q4 = models.estimate(v, max_seq_len=8192, cache_type="q4")
    # 40 layers × 2 × 4 KV heads × 128 × 8192 tokens = 335,544,320 elements.
    assert fp16.kv_cache == 335_544_320 * 2
    # q4: half a byte and an fp16 scale per 32 values, plus one layer's fp16 K and V scratch
    # (4 KV heads × 128 × 8192 tokens × 2 × 2 bytes = 16,777,216).
    assert q4.kv_cache == round(335_544_320 * (0.5 + 2 / 32)) + 16_777_216
    assert fp16.second_cache == fp16.kv_cache
    # The transformers backend on a CPU keeps float32 K and V.
    fp32 = models.estimate(v, max_seq_len=8192, cache_type="fp32")
    assert fp32.kv_cache == 2 * fp16.kv_cache
    # The cache never outgrows the model's context (16,384 for StarCoder2).
    long = models.estimate(v, max_seq_len=65536, cache_type="fp16", second_cache=False)
    assert long.kv_cache == 335_544_320 * 2 * 2


def test_recommendation_is_the_largest_that_fits_with_room_to_spare() -> None:
    def pick(free_gib: float) -> str | None:
        fits = models.size_all(
            int(free_gib * 2**30), "exllamav2", max_seq_len=8192, cache_type="q8"
        )
        best = models.recommend(fits)
        return f"{best.variant.model.name}@{best.variant.revision}" if best else None

    # 24 GiB: Codestral at 6.5 bpw (19.2 GiB <= 0.9 × 24 = 21.6), not at 8 bpw (23.1 GiB).
    assert pick(24) == "codestral-22b@6_5"
    # 12 GiB (10.8 usable): StarCoder2-15B at 5.0 bpw (10.5 GiB); 4.25 bpw of Codestral
    # (13.4 GiB) does not fit, and its 3.0 bpw (10.2 GiB) is under 4 bpw.
    assert pick(12) == "starcoder2-15b@5_0"
    # Nothing fits in 1 GiB.
    assert pick(1) is None
    fits = models.size_all(24 * 2**30, "exllamav2", max_seq_len=8192, cache_type="q8")
    for f in fits:
        assert f.fits == (f.estimate.total <= 0.9 * 24 * 2**30)


def test_models_command_marks_what_fits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--free-gib", "24", "--backend", "exllamav2"]) == 0
    out = capsys.readouterr().out
    assert "recommended: exlsp pull codestral-22b --bits 6.5" in out
    row = next(line for line in out.splitlines() if "Codestral-22B-v0.1-exl2@6_5" in line)
    assert row.rstrip().endswith("yes  <- recommended")
    row = next(line for line in out.splitlines() if "Codestral-22B-v0.1-exl2@8_0" in line)
    assert row.rstrip().endswith("no")
    assert main(["models", "--free-gib", "24", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in data["models"]} >= REQUIRED
    assert all(m["sources"] for m in data["models"])
