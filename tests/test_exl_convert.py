"""The EXL2 and EXL3 model builders (`build_exl2`, `build_exl3`) around their shared
steps (`benchmarks/exl_convert.py`), with fake converters in place of exllamav2's and
exllamav3's: the converted directory is checked, the HF model's files are copied, the
build is recorded and then reused, a failed conversion says why."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from exlsp.benchmarks.build_exl2 import build_exl2
from exlsp.benchmarks.build_exl3 import build_exl3
from exlsp.benchmarks.exl_convert import ConversionError

# A converter's command line: the output folder after OUT_FLAG, bits after -b.
FAKE_CONVERTER = """
import json, os, pathlib, sys

args = sys.argv[1:]
if os.environ.get("FAKE_CONVERT_FAIL"):
    print("converting layer 0")
    print("boom: the fake converter failed")
    sys.exit(3)
out = pathlib.Path(args[args.index({out_flag!r}) + 1])
out.mkdir(parents=True, exist_ok=True)
bits = float(args[args.index("-b") + 1])
config = {{"quantization_config": {{"quant_method": {method!r}, "bits": bits}}}}
(out / "config.json").write_text(json.dumps(config))
(out / "model.safetensors").write_bytes(b"0123456789")
print("done")
"""

BUILDERS: dict[str, tuple[Callable[..., Path], str, str, str]] = {
    # format: (builder, converter module, its output flag, what a failure names)
    "exl2": (build_exl2, "exllamav2.conversion.convert_exl2", "-cf", "convert_exl2 failed"),
    "exl3": (
        build_exl3,
        "exllamav3.conversion.convert_model",
        "-o",
        "exllamav3's converter failed",
    ),
}


@pytest.fixture
def hf_model(tmp_path: Path) -> Path:
    """An HF model folder that passes for the random-weight build of qwen2.5-coder tiny."""
    hf = tmp_path / "hf"
    hf.mkdir()
    build = {"family": "qwen2.5-coder", "size": "tiny", "seed": 0}
    (hf / "exlsp-build.json").write_text(json.dumps(build))
    (hf / "model.safetensors").write_bytes(b"weights")
    (hf / "tokenizer.json").write_text('{"model": {}}')
    return hf


def _fake_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    _, module, out_flag, _ = BUILDERS[fmt]
    path = tmp_path / "fakes" / (module.replace(".", "/") + ".py")
    for parent in path.relative_to(tmp_path / "fakes").parents:
        if parent != Path("."):
            (tmp_path / "fakes" / parent).mkdir(parents=True, exist_ok=True)
            (tmp_path / "fakes" / parent / "__init__.py").touch()
    path.write_text(FAKE_CONVERTER.format(out_flag=out_flag, method=fmt))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fakes"))
    monkeypatch.delenv("FAKE_CONVERT_FAIL", raising=False)


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_a_build_is_checked_recorded_and_reused(
    fmt: str, hf_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_converter(tmp_path, monkeypatch, fmt)
    build = BUILDERS[fmt][0]
    out = build("qwen2.5-coder", "tiny", tmp_path / "out", 4.0, hf_dir=hf_model)
    assert out == (tmp_path / "out").resolve()
    record = json.loads((out / f"exlsp-{fmt}.json").read_text())
    assert record["bits_measured"] == 4.0
    assert record["build"]["family"] == "qwen2.5-coder" and record["build"]["bits"] == 4.0
    assert record["size_bytes"] == 10
    assert BUILDERS[fmt][1] in record["command"]
    # The files the converter does not write come from the HF model.
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'
    assert (out / "exlsp-build.json").is_file()
    assert (hf_model / "model.safetensors").is_file()  # a given HF folder is kept
    # The same build again reuses the folder: the converter (now failing) does not run.
    monkeypatch.setenv("FAKE_CONVERT_FAIL", "1")
    assert build("qwen2.5-coder", "tiny", tmp_path / "out", 4.0, hf_dir=hf_model) == out
    with pytest.raises(ConversionError):  # another bit width is another build
        build("qwen2.5-coder", "tiny", tmp_path / "out", 3.0, hf_dir=hf_model)


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_a_failed_conversion_names_the_converter_and_shows_its_log(
    fmt: str, hf_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_converter(tmp_path, monkeypatch, fmt)
    monkeypatch.setenv("FAKE_CONVERT_FAIL", "1")
    with pytest.raises(ConversionError) as info:
        BUILDERS[fmt][0]("qwen2.5-coder", "tiny", tmp_path / "out", 4.0, hf_dir=hf_model)
    message = str(info.value)
    assert message.startswith(f"{BUILDERS[fmt][3]} (exit 3), log ")
    assert message.endswith("converting layer 0\nboom: the fake converter failed")
