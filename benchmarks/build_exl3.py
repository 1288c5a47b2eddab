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
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from exlsp.benchmarks.exl_convert import (
    ConversionError,
    already_built,
    conversion_error,
    ensure_hf_model,
    quant_bits,
    record_build,
    run_converter,
)
from exlsp.completion.models import read_json_object

logger = logging.getLogger(__name__)

# exllamav3's defaults are 250 rows x 2048 columns (convert_model.py --cal_rows/--cal_cols).
FAST_CALIBRATION = {"rows": 16, "cols": 512}
HEAD_BITS = 6  # convert_model.py --head_bits default


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
    return quant_bits(model_dir, "exl3")


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
    out = Path(out_dir).resolve()
    stamp = {"family": family, "size": size, "seed": seed, "bits": bits, "fast": fast_calibration}
    if already_built(out, "exl3", stamp):
        return out
    hf = Path(hf_dir).resolve() if hf_dir else out.with_name(out.name + "-hf")
    work = out.with_name(out.name + "-work")
    started = time.perf_counter()
    ensure_hf_model(hf, family, size, seed)
    hf_s = time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cmd = convert_command(hf, work, out, bits, fast_calibration=fast_calibration)
    logger.info("running: %s", " ".join(cmd))
    log_path = out.with_name(out.name + "-convert.log")
    returncode, convert_s = run_converter(cmd, log_path, append=False, timeout_s=timeout_s)
    got = exl3_bits(out)
    if returncode != 0 or got is None:
        raise conversion_error("exllamav3's converter", returncode, log_path)
    record_build(
        out,
        hf,
        "exl3",
        stamp=stamp,
        bits=got,
        hf_s=hf_s,
        convert_s=convert_s,
        cmd=cmd,
    )
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
    print(json.dumps(read_json_object(path / "exlsp-exl3.json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
