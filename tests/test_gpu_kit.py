"""The GPU kit's checks that need no GPU: the plan, the carried wheels against the GPU
image, the EXL2 writer against exllamav2's loader rules, and the results file a run
writes stage by stage (with fake stages)."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exlsp.benchmarks import exl2_writer, gpu_kit
from exlsp.benchmarks.gpu_kit import KitPaths, Stage

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "vocab_size": 4096,
    "tie_word_embeddings": True,
}


# --- the plan ------------------------------------------------------------------------------


def test_the_plan_prints_every_stage_and_its_checks_pass(tmp_path: Path) -> None:
    out = io.StringIO()
    rc = gpu_kit.plan(KitPaths(out=tmp_path), {"with_7b", "with_converter"}, out)
    text = out.getvalue()
    assert rc == 0, text
    for stage in gpu_kit.STAGES:
        assert f"{stage.name}" in text and f": {stage.budget_s} s - " in text
        assert " ".join(stage.argv(KitPaths(out=tmp_path))[2:4]) in text
    assert "imports of the GPU stages: 0 unresolved" in text
    assert "EXL2 writer 1.5b: 1127 tensors" in text and "0 layout problems" in text
    assert "plan: ok" in text
    assert "travels: working tree" in text


def test_flagged_stages_run_only_with_their_flag() -> None:
    plain = [s.name for s in gpu_kit.selected_stages(set())]
    assert "model-7b" not in plain and "convert-1.5b" not in plain
    assert plain[:2] == ["env", "wheels"] and "bench-1.5b" in plain
    assert "bench-7b" in [s.name for s in gpu_kit.selected_stages({"with_7b"})]


def test_run_sh_plan_runs_through_the_shim() -> None:
    env = {**os.environ, "PYTHON": sys.executable, "EXLSP_KIT_WORK": "/tmp/exlsp-kit-test"}
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--plan"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "timeout 240" in r.stdout and "exlsp.benchmarks.gpu_kit extension" in r.stdout


def test_the_whole_run_fits_nine_minutes_and_every_stage_has_a_budget() -> None:
    assert gpu_kit.TOTAL_BUDGET_S <= 540
    assert all(0 < s.budget_s <= gpu_kit.TOTAL_BUDGET_S for s in gpu_kit.STAGES)
    names = [s.name for s in gpu_kit.STAGES]
    assert len(names) == len(set(names))
    for i, s in enumerate(gpu_kit.STAGES):  # a stage only needs stages before it
        assert set(s.needs) <= set(names[:i]), s.name


# --- the wheels ---------------------------------------------------------------------------------


def test_the_lock_is_the_requested_list_and_fits_the_travel_limit() -> None:
    lock = gpu_kit.read_lock()
    requested = [
        line.split("#", 1)[0].strip()
        for line in (ROOT / "benchmarks/gpu/wheels.txt").read_text().splitlines()
    ]
    requested = sorted(gpu_kit.normalize(r) for r in requested if r)
    assert sorted(gpu_kit.normalize(w["requirement"]) for w in lock["wheels"]) == requested
    report = gpu_kit.check_wheels(lock, gpu_kit.read_image_packages())
    assert report["bytes"] < gpu_kit.CARRY_LIMIT_BYTES // 2
    assert not report["missing"] and not report["version_conflicts"]
    assert not report["carried_image"], "carried although the image has it"
    if gpu_kit.WHEELS_DIR.is_dir():
        folder = gpu_kit.check_wheels(lock, {}, gpu_kit.WHEELS_DIR)["folder"]
        assert not folder, folder


def test_a_requirement_neither_carried_nor_in_the_image_is_reported() -> None:
    lock = gpu_kit.read_lock()
    image = gpu_kit.read_image_packages()
    without = copy.deepcopy(lock)
    without["wheels"] = [w for w in lock["wheels"] if w["name"] != "fastparquet"]
    report = gpu_kit.check_wheels(without, image)
    assert any(m.startswith("exllamav2 needs fastparquet") for m in report["missing"])

    old_image = {**image, "pandas": "1.0.0"}
    report = gpu_kit.check_wheels(lock, old_image)
    assert any("fastparquet needs pandas>=1.5.0" in c for c in report["version_conflicts"])

    doubled = copy.deepcopy(lock)
    doubled["wheels"].append(dict(lock["wheels"][0]))
    assert gpu_kit.check_wheels(doubled, image)["duplicates"]

    image_has_it = copy.deepcopy(lock)
    row = {"name": "numpy", "version": "2.5.2", "requires_dist": [], "bytes": 1, "imports": []}
    image_has_it["wheels"].append(row)
    assert gpu_kit.check_wheels(image_has_it, image)["carried_image"] == ["numpy"]


def test_an_import_the_stages_need_and_nobody_provides_is_reported() -> None:
    lock = gpu_kit.read_lock()
    image = gpu_kit.read_image_packages()
    imports = gpu_kit.third_party_imports(extra_files=gpu_kit.gpu_test_files())
    assert {"pygls", "lsprotocol", "torch", "pytest", "pytest_lsp"} <= set(imports)
    assert "tests.test_lsp_e2e" in imports["pytest_lsp"]  # helpers a GPU test imports
    assert "lancedb" not in imports, "the index is off on the GPU path"
    assert "pathspec" not in imports and "watchdog" not in imports
    assert gpu_kit.check_imports(lock, image, imports) == []
    without = copy.deepcopy(lock)
    without["wheels"] = [w for w in lock["wheels"] if w["name"] != "pygls"]
    missing = gpu_kit.check_imports(without, image, imports)
    assert any(m.startswith("pygls (imported by") for m in missing)


# --- the EXL2 writer against the loader's rules -----------------------------------------------


def _table(config: dict[str, object]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {s.name: (s.dtype, s.shape) for s in exl2_writer.tensor_specs(config)}


def test_the_written_tiny_model_passes_the_loader_rules(tmp_path: Path) -> None:
    out = exl2_writer.write_exl2(tmp_path / "m", TINY)
    assert exl2_writer.check_exl2_dir(out) == []
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "exl2"
    assert config["quantization_config"]["bits"] == 4.0
    from exlsp.benchmarks.build_exl2 import exl2_bits

    assert exl2_bits(out) == 4.0
    groups = exl2_writer.read_tensor(out / "output.safetensors", "lm_head.q_groups")
    assert list(groups) == [6, 0]  # one group of 128 rows at the head's 6 bits
    inv = exl2_writer.read_tensor(
        out / "output.safetensors", "model.layers.0.mlp.down_proj.q_invperm"
    )
    assert sorted(inv.tolist()) == list(range(256))  # a permutation (argsort gives q_perm)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.q_scale_max": ("float32", (1,))}),
         "q_scale_max: dtype float32"),
        (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"), "k_proj: bias missing"),
        (lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": ("float16", (128,))}),
         "o_proj: bias present"),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.q_scale": ("int32", (1, 16))}),
         "q_weight columns 256 != 8 * q_scale columns 16"),
        (lambda t: t.update({"model.layers.0.mlp.down_proj.q_invperm": ("int32", (128,))}),
         "q_invperm (128,) != (256,)"),
        (lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.mlp.up_proj")],
         "model.layers.1.mlp.up_proj: missing"),
        (lambda t: t.update({"lm_head.q_weight": ("int16", (48, 4096))}), "q_weight: dtype int16"),
    ],
)  # fmt: skip
def test_the_loader_rules_catch_a_wrong_layout(change: object, expected: str) -> None:
    table = _table(TINY)
    assert exl2_writer.check_exl2_tensors(TINY, table) == []
    change(table)  # type: ignore[operator]
    problems = exl2_writer.check_exl2_tensors(TINY, table)
    assert any(expected in p for p in problems), problems


def test_the_group_table_must_cover_the_input_rows_widest_first() -> None:
    assert exl2_writer.check_group_values([4, 0, 4, 16], 32, 256) == []
    assert exl2_writer.check_group_values([6, 0, 4, 24], 40, 256) == []
    assert any("cover" in p for p in exl2_writer.check_group_values([4, 0], 16, 256))
    assert any("narrower" in p for p in exl2_writer.check_group_values([4, 0, 6, 16], 40, 256))


def test_the_real_sizes_lay_out_without_problems() -> None:
    for size, row in gpu_kit.check_writer_layouts().items():
        assert row["problems"] == [], size
        assert 4.0 <= row["bits_per_weight"] < 4.3, size


# --- the run, with fake stages --------------------------------------------------------------------


def _py(code: str) -> object:
    return lambda p: [sys.executable, "-c", code, str(p.out), str(p.parts)]


def test_each_stage_lands_in_the_results_as_it_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_part = (
        "import json, sys, pathlib; "
        "(pathlib.Path(sys.argv[2]) / 'env.json').write_text(json.dumps({'gpu': 'Fake H100'}))"
    )
    stages = (
        Stage("env", 20, "fake env", _py(env_part)),  # type: ignore[arg-type]
        Stage("slow-bg", 20, "background", _py("import time; time.sleep(0.5)"), background=True),  # type: ignore[arg-type]
        Stage("hangs", 1, "killed at its budget", _py("import time; time.sleep(60)")),  # type: ignore[arg-type]
        Stage("after-hang", 20, "needs the killed one", _py("pass"), needs=("hangs",)),  # type: ignore[arg-type]
        Stage("after-bg", 20, "waits for the background", _py("print('done')"), needs=("slow-bg",)),  # type: ignore[arg-type]
        Stage("flagged", 20, "only with a flag", _py("pass"), flag="with_7b"),  # type: ignore[arg-type]
        Stage("all-skipped", 20, "rc 0, judged", _py("pass"), judge=lambda d: "nothing-passed"),  # type: ignore[arg-type]
    )
    monkeypatch.setattr(gpu_kit, "STAGES", stages)
    monkeypatch.setattr(gpu_kit, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setenv("EXLSP_COMMIT", "abc123")
    paths = KitPaths(out=tmp_path / "out", work=tmp_path / "work", python=sys.executable)
    rc = gpu_kit.run_kit(paths, set())
    assert rc == 1  # a stage timed out
    data = json.loads((paths.out / gpu_kit.RESULTS_NAME).read_text())
    stages_out = data["stages"]
    assert stages_out["env"]["status"] == "ok"
    assert data["machine"] == {"gpu": "Fake H100"}
    assert data["commit"]["sha"] == "abc123"
    assert stages_out["hangs"]["status"] == "timeout"
    assert stages_out["after-hang"] == {"status": "skipped", "why": "needs hangs"}
    assert stages_out["slow-bg"]["status"] == "ok"
    assert stages_out["after-bg"]["status"] == "ok" and stages_out["after-bg"]["tail"] == ["done"]
    assert "flagged" not in stages_out
    assert stages_out["all-skipped"]["status"] == "nothing-passed"
    assert (tmp_path / "results" / "gpu-kit-fake-h100.json").is_file()
    log = (paths.out / gpu_kit.LOG_NAME).read_text()
    assert "===== hangs (rc 124" in log
    assert len(list(paths.out.iterdir())) <= 8  # what comes back from $OUT


def test_junit_summary_counts_outcomes(tmp_path: Path) -> None:
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="a" name="ok"/>'
        '<testcase classname="a" name="bad"><failure message="boom"/></testcase>'
        '<testcase classname="a" name="skip"><skipped message="no GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = gpu_kit.junit_summary(xml)
    assert summary["counts"] == {"passed": 1, "failure": 1, "skipped": 1}
    assert summary["tests"]["a::bad"] == "failure: boom"


def test_the_extension_stage_clears_a_lock_left_by_a_killed_build_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types as pytypes

    fake = pytypes.ModuleType("exllamav2")
    fake.__version__ = "0.3.2"  # type: ignore[attr-defined]
    fake.ext = pytypes.ModuleType("exllamav2.ext")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "exllamav2", fake)
    monkeypatch.setitem(sys.modules, "exllamav2.ext", fake.ext)  # type: ignore[attr-defined]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    lock = tmp_path / "ext" / "exllamav2_ext" / "lock"
    lock.parent.mkdir(parents=True)
    out = tmp_path / "parts"
    out.mkdir()

    lock.write_text("")
    with lock.open():  # a live build holds it: left alone
        assert gpu_kit.body_extension(out) == 0
    assert lock.exists()
    assert json.loads((out / "extension.json").read_text())["resumed_after_a_killed_build"] is False

    assert gpu_kit.body_extension(out) == 0  # nobody holds it: a killed build's
    assert not lock.exists()
    data = json.loads((out / "extension.json").read_text())
    assert data["resumed_after_a_killed_build"] is True and data["exllamav2"] == "0.3.2"


_SOURCE_CHECK = """
import sys, tempfile
from pathlib import Path
from exlsp.benchmarks import exl2_writer as w
from exlsp.benchmarks.gpu_kit import writer_config
if sys.argv[2] == "no-bias":  # a writer that forgets Qwen2's q/k/v bias
    w._qkv_bias = lambda config: False
folder = w.write_exl2(Path(tempfile.mkdtemp()) / "m", writer_config("tiny"), header_only=True)
for problem in w.exllamav2_source_check(folder, Path(sys.argv[1])):
    print("PROBLEM", problem)
"""


@pytest.mark.skipif(
    not list(gpu_kit.WHEELS_DIR.glob("exllamav2-*.whl")),
    reason="needs .gpu-wheels/ (bash benchmarks/gpu/prepare-wheels.sh)",
)
def test_exllamav2s_own_loader_code_reads_the_writers_layout() -> None:
    wheel = sorted(gpu_kit.WHEELS_DIR.glob("exllamav2-*.whl"))[0]

    def problems(variant: str) -> list[str]:
        r = subprocess.run(
            [sys.executable, "-c", _SOURCE_CHECK, str(wheel), variant],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        return [line[8:] for line in r.stdout.splitlines() if line.startswith("PROBLEM ")]

    assert problems("as-written") == []
    broken = problems("no-bias")
    assert "model.layers.0.self_attn.k_proj: bias False, exllamav2 expects True" in broken


def test_a_tests_stage_where_nothing_passed_is_not_ok() -> None:
    stage = next(s for s in gpu_kit.STAGES if s.name == "tests")
    assert stage.judge({"counts": {"skipped": 6}}) == "nothing-passed"
    assert stage.judge({}) == "nothing-passed"
    assert stage.judge({"counts": {"passed": 5, "skipped": 1}}) is None
