"""Build an EXL2 model of a real architecture with random weights (needs a CUDA GPU).

The Hugging Face model comes from `build_model` (random weights, the family's
real shapes and special tokens); exllamav2's converter quantizes it:

    python -m exllamav2.conversion.convert_exl2 -i HF_DIR -o WORK -cf OUT -b BITS

Speed does not depend on weight values, so such a model is valid for timing as
long as the generated length is fixed. The converter measures and quantizes
against calibration text that ships in the exllamav2 wheel; by default a short
calibration (`fast_calibration`) keeps a 7B conversion within minutes, which
changes the quality of the quantization, not the speed of the result.

The converter resumes an interrupted job from its working directory
(`<out>-work/job_new.json`), so a build killed by a time limit continues when
the same command runs again. It prints its errors and still exits 0 on some of
them: the output directory is checked afterwards.

    python -m exlsp.benchmarks.build_exl2 --size 1.5b --bits 4.0 --out DIR
"""

from __future__ import annotations

import argparse
import logging
import shutil
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

logger = logging.getLogger(__name__)

# Short calibration for random-weight timing models: rows of 512 tokens
# (the converter wants multiples of 128).
FAST_CALIBRATION = {"rows": 16, "measurement_rows": 4, "length": 512}


def convert_command(
    hf_dir: Path,
    work_dir: Path,
    out_dir: Path,
    bits: float,
    *,
    head_bits: int = 6,
    fast_calibration: bool = True,
    python: str = sys.executable,
) -> list[str]:
    cmd = [python, "-m", "exllamav2.conversion.convert_exl2", "-i", str(hf_dir)]
    cmd += ["-o", str(work_dir), "-cf", str(out_dir), "-b", str(bits), "-hb", str(head_bits)]
    if fast_calibration:
        cal = FAST_CALIBRATION
        cmd += ["-r", str(cal["rows"]), "-mr", str(cal["measurement_rows"])]
        cmd += ["-l", str(cal["length"]), "-ml", str(cal["length"])]
    return cmd


def exl2_bits(model_dir: Path) -> float | None:
    """Bits per weight of a finished EXL2 directory (None if it is not one)."""
    return quant_bits(model_dir, "exl2")


def build_exl2(
    family: str,
    size: str,
    out_dir: str | Path,
    bits: float = 4.0,
    *,
    seed: int = 0,
    hf_dir: str | Path | None = None,
    fast_calibration: bool = True,
    keep_intermediate: bool = False,
    timeout_s: float | None = None,
) -> Path:
    """Build (or reuse) `out_dir`: an EXL2 model of `family`/`size` at `bits` bpw.

    The random-weight HF model goes to `hf_dir` (default `<out_dir>-hf`) and the
    converter's working files to `<out_dir>-work`; both are removed afterwards
    unless `keep_intermediate`.
    """
    out = Path(out_dir).resolve()
    stamp = {
        "family": family,
        "size": size,
        "seed": seed,
        "bits": bits,
        "fast_calibration": fast_calibration,
    }
    if already_built(out, "exl2", stamp):
        return out
    hf = Path(hf_dir).resolve() if hf_dir else out.with_name(out.name + "-hf")
    work = out.with_name(out.name + "-work")
    started = time.perf_counter()
    ensure_hf_model(hf, family, size, seed)
    hf_s = time.perf_counter() - started

    resuming = (work / "job_new.json").is_file()
    if not resuming:
        shutil.rmtree(work, ignore_errors=True)
        if out.exists():
            shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    cmd = convert_command(hf, work, out, bits, fast_calibration=fast_calibration)
    logger.info("%s: %s", "resuming" if resuming else "running", " ".join(cmd))
    log_path = work / "convert.log"
    returncode, convert_s = run_converter(cmd, log_path, append=True, timeout_s=timeout_s)
    got = exl2_bits(out)
    if returncode != 0 or got is None:
        raise conversion_error("convert_exl2", returncode, log_path)
    # -cf copies config and tokenizer files; record_build makes sure of ours
    record_build(
        out,
        hf,
        "exl2",
        stamp=stamp,
        bits=got,
        hf_s=hf_s,
        convert_s=convert_s,
        cmd=cmd,
    )
    if not keep_intermediate:
        shutil.rmtree(work, ignore_errors=True)
        if hf_dir is None:
            shutil.rmtree(hf, ignore_errors=True)
    logger.info("built %s (%.2f bpw) in %.0f s", out, got, time.perf_counter() - started)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exlsp.benchmarks.build_exl2", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--family", default="qwen2.5-coder")
    parser.add_argument("--size", default="1.5b", help="tiny, 1.5b or 7b")
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hf-dir", type=Path, default=None)
    parser.add_argument(
        "--full-calibration",
        action="store_true",
        help="the converter's default calibration (slower)",
    )
    parser.add_argument("--keep-intermediate", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        path = build_exl2(
            args.family,
            args.size,
            args.out,
            args.bits,
            seed=args.seed,
            hf_dir=args.hf_dir,
            fast_calibration=not args.full_calibration,
            keep_intermediate=args.keep_intermediate,
        )
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
