"""The catalogue's sizing against this machine's real GPU (skipped cleanly without one)."""

from __future__ import annotations

import pytest

from exlsp.completion import models

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]


def test_free_memory_is_the_gpus_and_the_recommendation_fits_in_it() -> None:
    free, where = models.available_memory("auto")
    free_now, total = torch.cuda.mem_get_info(0)
    assert where == f"GPU 0 ({torch.cuda.get_device_name(0)})"
    assert 0 < free <= total and abs(free - free_now) < 2**30
    best = models.recommend(models.size_all(free, "exllamav2", max_seq_len=8192, cache_type="q8"))
    assert best is not None
    assert best.estimate.total <= (1 - models.HEADROOM) * free
    print(
        f"\n{where}: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB; recommended "
        f"{best.variant.model.name} {best.variant.kind} ({best.estimate.total / 2**30:.1f} GiB)"
    )
    # The memory the estimate claims can really be had on this GPU.
    block = torch.empty(best.estimate.total, dtype=torch.uint8, device="cuda")
    assert block.numel() == best.estimate.total
    del block
    torch.cuda.empty_cache()
