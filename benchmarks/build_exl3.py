"""Build a small EXL3 model for the GPU tests and benchmarks: a random-weight HF
model (`build_model`) converted by exllamav3's own converter.

    python -m exlsp.benchmarks.build_exl3 --size tiny --bits 4.0 --out DIR [--hf-dir DIR]

The converter (`exllamav3/conversion/convert_model.py`) needs a CUDA GPU. Random
weights need no real calibration: `FAST_CALIBRATION` shortens it (rows x columns
of calibration tokens) so that the 1.5B architecture converts in the kit's budget.
`<out>/exlsp-exl3.json` records the build and its timings; a directory with the
same record is reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from exlsp.benchmarks.build_exl2 import read_json

logger = logging.getLogger(__name__)

# exllamav3's defaults are 250 rows x 2048 columns (convert_model.py --cal_rows/--cal_cols).
FAST_CALIBRATION = {"rows": 16, "cols": 512}
HEAD_BITS = 6  # convert_model.py --head_bits default
_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "exlsp-build.json",
)


class ConversionError(RuntimeError):
    pass


def convert_command(
    hf_dir: Path,
    work_dir: Path,
    out_dir: Path,
    bits: float,
    *,
    head_bits: int = HEAD_BITS,
    fast_calibration: bool = True,
    python: str = sys.executable,
) -> list[str]:
    cmd = [python, "-m", "exllamav3.conversion.convert_model", "-i", str(hf_dir)]
    cmd += ["-o", str(out_dir), "-w", str(work_dir), "-b", str(bits), "-hb", str(head_bits)]
    if fast_calibration:
        cmd += ["-cr", str(FAST_CALIBRATION["rows"]), "-cc", str(FAST_CALIBRATION["cols"])]
    return cmd


def exl3_bits(model_dir: Path) -> float | None:
    """Bits per weight of a finished EXL3 directory (None if it is not one)."""
    quant = read_json(model_dir / "config.json").get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "exl3":
        return None
    if not any(model_dir.glob("*.safetensors")):
        return None
    bits = quant.get("bits")
    return float(bits) if isinstance(bits, int | float) else None


def build_exl3(
    family: str,
    size: str,
    out_dir: str | Path,
    bits: float = 4.0,
    *,
    seed: int = 0,
    hf_dir: str | Path | None = None,
    fast_calibration: bool = True,
    timeout_s: float | None = None,
) -> Path:
    """Build (or reuse) `out_dir`: an EXL3 model of `family`/`size` at `bits` bpw."""
    from exlsp.benchmarks.build_model import build_model

    out = Path(out_dir).resolve()
    stamp = {"family": family, "size": size, "seed": seed, "bits": bits, "fast": fast_calibration}
    if exl3_bits(out) is not None and read_json(out / "exlsp-exl3.json").get("build") == stamp:
        logger.info("EXL3 model already built: %s", out)
        return out
    hf = Path(hf_dir).resolve() if hf_dir else out.with_name(out.name + "-hf")
    work = out.with_name(out.name + "-work")
    started = time.perf_counter()
    info = read_json(hf / "exlsp-build.json")
    if not (
        info.get("family") == family
        and info.get("size") == size
        and info.get("seed") == seed
        and (hf / "model.safetensors").is_file()
    ):
        shutil.rmtree(hf, ignore_errors=True)
        logger.info("building the %s %s HF model (random weights) in %s", family, size, hf)
        build_model(hf, family=family, size=size, seed=seed)
    hf_s = time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cmd = convert_command(hf, work, out, bits, fast_calibration=fast_calibration)
    logger.info("running: %s", " ".join(cmd))
    t0 = time.perf_counter()
    log_path = out.with_name(out.name + "-convert.log")
    with log_path.open("w", encoding="utf-8") as log_file:
        proc = subprocess.run(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    convert_s = time.perf_counter() - t0
    got = exl3_bits(out)
    if proc.returncode != 0 or got is None:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise ConversionError(
            f"exllamav3's converter failed (exit {proc.returncode}), log {log_path}:\n"
            + "\n".join(tail)
        )
    for name in _COPIED_FILES:
        if (hf / name).is_file() and not (out / name).is_file():
            shutil.copyfile(hf / name, out / name)
    record = {
        "build": stamp,
        "bits_measured": got,
        "hf_build_s": round(hf_s, 1),
        "convert_s": round(convert_s, 1),
        "command": cmd,
        "size_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
    }
    (out / "exlsp-exl3.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    logger.info("built %s (%.2f bpw) in %.0f s", out, got, time.perf_counter() - started)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen2.5-coder")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hf-dir", type=Path, default=None)
    parser.add_argument("--full-calibration", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = build_exl3(
            args.family,
            args.size,
            args.out,
            args.bits,
            seed=args.seed,
            hf_dir=args.hf_dir,
            fast_calibration=not args.full_calibration,
        )
    except (ConversionError, subprocess.TimeoutExpired) as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(read_json(path / "exlsp-exl3.json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
