"""The transformers backend's CPU threads: one unless `model.threads` says otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
from pathlib import Path
import torch
from exlsp.completion.backends.transformers_backend import TransformersBackend
from exlsp.completion.config import ModelConfig
config = ModelConfig(**json.loads(sys.argv[2]))
TransformersBackend(config, Path(sys.argv[1]))
print(torch.get_num_threads())
"""


def threads_after_load(model: Path, settings: dict[str, object]) -> int:
    # A process each: torch's thread count is global to the process.
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(model), json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


def test_the_backend_decodes_on_one_thread_by_default(tiny_model: Path) -> None:
    """torch's default (a thread per core) took ~200 ms a token on a busy 2-core
    machine and hit the deadline; one thread took 14-19 ms (README, model.threads)."""
    assert threads_after_load(tiny_model, {"device": "cpu"}) == 1


def test_threads_zero_leaves_torch_its_default(tiny_model: Path) -> None:
    fresh = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    default = int(fresh.stdout.split()[-1])
    assert threads_after_load(tiny_model, {"device": "cpu", "threads": 0}) == default
