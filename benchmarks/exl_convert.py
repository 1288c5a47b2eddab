"""What the EXL2 and EXL3 model builders (`build_exl2`, `build_exl3`) share: the
random-weight HF model they convert, the converter run with its log, the check of
its output and the `<out>/exlsp-<format>.json` record of a build."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from exlsp.completion.models import read_json_object

logger = logging.getLogger(__name__)

# Files of the HF model that the converted model needs too (tokenizer, build record).
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "exlsp-build.json",
)


class ConversionError(RuntimeError):
    pass


def quant_bits(model_dir: Path, method: str) -> float | None:
    """Bits per weight of a finished model directory quantized by `method` ("exl2",
    "exl3"); None if it is not one."""
    quant = read_json_object(model_dir / "config.json").get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != method:
        return None
    if not any(model_dir.glob("*.safetensors")):
        return None
    bits = quant.get("bits")
    return float(bits) if isinstance(bits, int | float) else None


def already_built(out: Path, method: str, stamp: dict[str, Any]) -> bool:
    """Whether `out` holds a finished `method` model recorded as the build `stamp`."""
    if quant_bits(out, method) is None:
        return False
    if read_json_object(out / f"exlsp-{method}.json").get("build") != stamp:
        return False
    logger.info("%s model already built: %s", method.upper(), out)
    return True


def hf_build_matches(hf_dir: Path, family: str, size: str, seed: int) -> bool:
    info = read_json_object(hf_dir / "exlsp-build.json")
    return (
        info.get("family") == family
        and info.get("size") == size
        and info.get("seed") == seed
        and (hf_dir / "model.safetensors").is_file()
    )


def ensure_hf_model(hf_dir: Path, family: str, size: str, seed: int) -> None:
    """Build the random-weight HF model of `family`/`size` in `hf_dir` unless the one
    there is that build already."""
    from exlsp.benchmarks.build_model import build_model

    if hf_build_matches(hf_dir, family, size, seed):
        return
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    logger.info("building the %s %s HF model (random weights) in %s", family, size, hf_dir)
    build_model(hf_dir, family=family, size=size, seed=seed)


def run_converter(
    cmd: list[str], log_path: Path, *, append: bool, timeout_s: float | None
) -> tuple[int, float]:
    """Run a converter command with its output in `log_path`: (exit code, seconds)."""
    t0 = time.perf_counter()
    with log_path.open("a" if append else "w", encoding="utf-8") as log_file:
        proc = subprocess.run(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return proc.returncode, time.perf_counter() - t0


def conversion_error(converter: str, returncode: int, log_path: Path) -> ConversionError:
    """The error of a failed conversion, with the end of its log."""
    tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
    return ConversionError(
        f"{converter} failed (exit {returncode}), log {log_path}:\n" + "\n".join(tail)
    )


def record_build(
    out: Path,
    hf: Path,
    method: str,
    *,
    stamp: dict[str, Any],
    bits: float,
    hf_s: float,
    convert_s: float,
    cmd: list[str],
) -> None:
    """Copy the HF model's files the converter left out, and write the build's record
    `out/exlsp-<method>.json`."""
    for name in COPIED_FILES:
        if (hf / name).is_file() and not (out / name).is_file():
            shutil.copyfile(hf / name, out / name)
    record = {
        "build": stamp,
        "bits_measured": bits,
        "hf_build_s": round(hf_s, 1),
        "convert_s": round(convert_s, 1),
        "command": cmd,
        "size_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
    }
    (out / f"exlsp-{method}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
