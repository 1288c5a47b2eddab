"""The GPU proof in one command: a bare lent GPU machine to results in at most 9 minutes.

    bash benchmarks/gpu/run.sh              # on the GPU machine (carry .gpu-wheels)
    bash benchmarks/gpu/run.sh --plan       # anywhere: every stage, its command and budget

Stages run in the order of `STAGES` (one table: a later backend adds its rows),
each under `timeout` with its own budget, clamped to what is left of the whole
run's budget. After each stage, `$OUT/gpu-kit.json` (and
`benchmarks/results/gpu-kit-<gpu>.json` in the tree) is rewritten with what is
known so far, so a run killed at the limit still returns everything finished.
`$OUT/kit.log` holds every stage's output. A stage marked `background` starts
and runs beside the next ones (the 1.5B model is written on the CPU while the
CUDA extension compiles); a stage that needs it waits for it.

Nothing here imports torch or exlsp's backends at module level: the plan, the
wheel check and the model writer's layout check run on any CPU (and in CI).
The wheels are prepared here, once, by `benchmarks/gpu/prepare-wheels.sh`; the
list of what the GPU image already has is `benchmarks/gpu/image-packages.txt`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exlsp.completion.models import read_json_object

ROOT = Path(__file__).resolve().parent.parent
KIT_DIR = ROOT / "benchmarks" / "gpu"
WHEELS_DIR = ROOT / ".gpu-wheels"
WHEELS_LOCK = KIT_DIR / "wheels.lock.json"
IMAGE_PACKAGES = KIT_DIR / "image-packages.txt"
RESULTS_DIR = ROOT / "benchmarks" / "results"
TOTAL_BUDGET_S = 540  # 9 minutes: one rerun fits the 15 minutes of a lent machine
CARRY_LIMIT_BYTES = 64 * 2**20
PYTHON_TARGET = (3, 12)
FAMILY = "qwen2.5-coder"
RESULTS_NAME = "gpu-kit.json"
BENCH_NAME = "bench"  # gpu_bench writes gpu-bench.json
LOG_NAME = "kit.log"
JUNIT_NAME = "tests.xml"
EXL3_JUNIT_NAME = "tests-exl3.xml"


# --- paths and environment ---------------------------------------------------------------


@dataclass(frozen=True)
class KitPaths:
    out: Path
    work: Path = Path("/tmp/exlsp-kit")
    python: str = "python3"
    wheels: Path = WHEELS_DIR

    @property
    def site(self) -> Path:
        return self.work / "site"

    @property
    def parts(self) -> Path:
        """Each stage body's JSON part (merged into the results file; not in $OUT)."""
        return self.work / "parts"

    @property
    def shim(self) -> Path:
        return self.work / "shim"

    @property
    def models(self) -> Path:
        return self.work / "models"

    @property
    def extensions(self) -> Path:
        return self.work / "torch_extensions"

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    def exl2_dir(self, size: str) -> Path:
        return self.models / f"{FAMILY}-{size}-exl2-4.0"

    def hf_dir(self, size: str) -> Path:
        return self.models / f"{FAMILY}-{size}-hf"

    @property
    def tiny_exl2(self) -> Path:
        return self.models / f"{FAMILY}-tiny-exl2-4.0"

    def exl3_dir(self, size: str) -> Path:
        return self.models / f"{FAMILY}-{size}-exl3-4.0"

    @property
    def exl3_pages(self) -> Path:
        """The exllamav3 backend's disk page tier in the EXL3 benchmark."""
        return self.work / "exl3-pages"


def nvidia_cuda_dirs() -> tuple[Path, Path] | None:
    """torch's CUDA headers and libraries from the `nvidia` pip packages (the image's
    minimal toolkit lacks cusparse.h and others): `nvidia/cu13/{include,lib}`, else the
    first `nvidia/<package>/include` of the older per-package layout."""
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("nvidia")
        bases = [Path(b) for b in (spec.submodule_search_locations or [])] if spec else []
        for base in bases:
            for sub in ("cu13", "cu12"):
                if (base / sub / "include").is_dir():
                    return base / sub / "include", base / sub / "lib"
        for base in bases:
            for inc in sorted(base.glob("*/include")):
                if (inc / "cusparse.h").is_file():
                    return inc, inc.parent / "lib"
    return None


def stage_env(paths: KitPaths) -> dict[str, str]:
    """The environment every stage after the wheels runs with."""
    env = dict(os.environ)
    py_path = [str(paths.site), str(paths.shim)]
    py_path += [p for p in env.get("PYTHONPATH", "").split(":") if p and p not in py_path]
    # The image's own bin (ninja, nvcc wrappers) first; the carried ninja last, a fallback.
    py_bin = str(Path(sys.executable).parent) if paths.python == sys.executable else ""
    path = [p for p in (py_bin, env.get("PATH", "")) if p] + [str(paths.site / "bin")]
    env.update(
        PYTHONPATH=":".join(py_path),
        PATH=":".join(path),
        PYTHONUNBUFFERED="1",
        TORCH_CUDA_ARCH_LIST="9.0",
        MAX_JOBS=str(os.cpu_count() or 16),
        TORCH_EXTENSIONS_DIR=str(paths.extensions),
        EXLSP_CACHE_DIR=str(paths.cache),
        EXLSP_LLAMA_SERVER="skip",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    nv = nvidia_cuda_dirs()
    if nv is not None:
        for var, d in (("CPATH", nv[0]), ("LIBRARY_PATH", nv[1])):
            env[var] = ":".join(x for x in (str(d), env.get(var, "")) if x)
    return env


def make_shim(paths: KitPaths) -> None:
    """`exlsp.*` importable from the repository folders without installing the project."""
    pkg = paths.shim / "exlsp"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("server", "completion", "index", "benchmarks"):
        link = pkg / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ROOT / name)


# --- the stage table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int
    what: str
    argv: Callable[[KitPaths], list[str]]
    collect: Callable[[KitPaths], dict[str, Any]] | None = None
    background: bool = False
    needs: tuple[str, ...] = ()
    flag: str | None = None  # runs only with this command-line flag
    skip_flag: str | None = None  # left out with this command-line flag
    # A status from the collected data where the exit code does not tell (all skipped).
    judge: Callable[[dict[str, Any]], str | None] = field(default=lambda d: None)
    extra_env: Callable[[KitPaths], dict[str, str]] = field(default=lambda p: {})


def _kit(*args: str) -> Callable[[KitPaths], list[str]]:
    return lambda p: [
        p.python, "-m", "exlsp.benchmarks.gpu_kit", *args, "--out", str(p.parts),
        "--work", str(p.work),
    ]  # fmt: skip


def _wheels_argv(p: KitPaths) -> list[str]:
    return [
        p.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
        "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(p.site),
        "--find-links", str(p.wheels), *[row["requirement"] for row in read_lock()["wheels"]],
    ]  # fmt: skip


def _model_argv(size: str) -> Callable[[KitPaths], list[str]]:
    return lambda p: [
        p.python, "-m", "exlsp.benchmarks.exl2_writer", "--size", size,
        "--out", str(p.exl2_dir(size)), "--hf-dir", str(p.hf_dir(size)),
    ]  # fmt: skip


def _convert_argv(p: KitPaths) -> list[str]:
    return [
        p.python, "-m", "exlsp.benchmarks.build_exl2", "--size", "1.5b", "--bits", "4.0",
        "--out", str(p.models / f"{FAMILY}-1.5b-converted-4.0"), "--hf-dir", str(p.hf_dir("1.5b")),
    ]  # fmt: skip


def _tests_argv(p: KitPaths) -> list[str]:
    # The EXL3 tests run in the EXL3 stage (their model needs exllamav3's extension).
    tests = sorted(
        str(t.relative_to(ROOT))
        for t in (ROOT / "tests").glob("test_gpu_*.py")
        if t.name != "test_gpu_exllamav3.py"
    )
    return [
        p.python, "-m", "pytest", "-m", "gpu", *tests, "-q", "-rs", "-p", "no:cacheprovider",
        "--junitxml", str(p.out / JUNIT_NAME),
    ]  # fmt: skip


def _bench_argv(size: str) -> Callable[[KitPaths], list[str]]:
    return lambda p: [
        p.python, "-m", "exlsp.benchmarks.gpu_bench", "--models-dir", str(p.models),
        "--sizes", size, "--maker", "writer", "--no-index", "--name", BENCH_NAME,
        "--results-dir", str(p.out),
    ]  # fmt: skip


def _exl3_model_argv(size: str) -> Callable[[KitPaths], list[str]]:
    return lambda p: [
        p.python, "-m", "exlsp.benchmarks.build_exl3", "--size", size, "--bits", "4.0",
        "--out", str(p.exl3_dir(size)), "--hf-dir", str(p.hf_dir(size)),
    ]  # fmt: skip


def _exl3_tests_argv(p: KitPaths) -> list[str]:
    return [
        p.python, "-m", "pytest", "-m", "gpu", "tests/test_gpu_exllamav3.py", "-q", "-rs",
        "-p", "no:cacheprovider", "--junitxml", str(p.out / EXL3_JUNIT_NAME),
    ]  # fmt: skip


def _collect_model(size: str) -> Callable[[KitPaths], dict[str, Any]]:
    return lambda p: read_json_object(p.exl2_dir(size) / "exlsp-exl2.json")


def _collect_tests(p: KitPaths) -> dict[str, Any]:
    return junit_summary(p.out / JUNIT_NAME)


def _collect_bench(p: KitPaths) -> dict[str, Any]:
    return read_json_object(p.out / f"gpu-{BENCH_NAME}.json")


# One row per stage, in running order. Another backend (EXL3) adds its rows: a model
# maker, a `tests` run of its gpu-marked file, and a bench row beside exllamav2's.
STAGES: tuple[Stage, ...] = (
    Stage("env", 30, "GPU, driver, CUDA, torch, Python, free VRAM", _kit("env")),
    Stage("wheels", 60, "install the carried wheels (no network)", _wheels_argv),
    Stage(
        "model-1.5b",
        150,
        "Qwen2.5-Coder-1.5B architecture, EXL2 4.0 bpw, direct writer (CPU)",
        _model_argv("1.5b"),
        _collect_model("1.5b"),
        background=True,
    ),
    Stage(
        "exl3-extension",
        300,
        "exllamav3's CUDA extension (JIT), compiled beside exllamav2's",
        _kit("exl3-extension"),
        background=True,
        flag="exl3",
    ),
    Stage("extension", 240, "exllamav2's CUDA extension (JIT, all cores)", _kit("extension")),
    Stage(
        "tiny",
        90,
        "tiny EXL2 by exllamav2's converter, checked against the loader's layout",
        _kit("tiny"),
        needs=("extension",),
        skip_flag="exl3",
    ),
    Stage(
        "tests",
        150,
        "gpu-marked tests on the tiny model",
        _tests_argv,
        _collect_tests,
        needs=("tiny",),
        extra_env=lambda p: {"EXLSP_GPU_EXL2_MODEL": str(p.tiny_exl2)},
        judge=lambda d: None if d.get("counts", {}).get("passed") else "nothing-passed",
        skip_flag="exl3",
    ),
    Stage(
        "bench-1.5b",
        200,
        "side-by-side benchmark, 1.5B, 4k-token prompts, 32 tokens forced",
        _bench_argv("1.5b"),
        _collect_bench,
        needs=("extension", "model-1.5b"),
        skip_flag="exl3",
    ),
    # EXL3 (run.sh --exl3, a run of its own): exllamav3's converter makes a tiny and a
    # 1.5B-architecture model, the gpu-marked tests run on the tiny one, and the bench
    # puts exllamav3 beside exllamav2 on the same architecture at 4.0 bpw.
    Stage(
        "exl3-tiny",
        90,
        "tiny EXL3 by exllamav3's converter (short calibration)",
        _exl3_model_argv("tiny"),
        lambda p: read_json_object(p.exl3_dir("tiny") / "exlsp-exl3.json"),
        needs=("exl3-extension",),
        flag="exl3",
    ),
    Stage(
        "exl3-tests",
        150,
        "gpu-marked exllamav3 tests on the tiny EXL3 model",
        _exl3_tests_argv,
        lambda p: junit_summary(p.out / EXL3_JUNIT_NAME),
        needs=("exl3-tiny",),
        extra_env=lambda p: {"EXLSP_GPU_EXL3_MODEL": str(p.exl3_dir("tiny"))},
        judge=lambda d: None if d.get("counts", {}).get("passed") else "nothing-passed",
        flag="exl3",
    ),
    Stage(
        "exl3-model-1.5b",
        150,
        "Qwen2.5-Coder-1.5B architecture, EXL3 4.0 bpw, exllamav3's converter",
        _exl3_model_argv("1.5b"),
        lambda p: read_json_object(p.exl3_dir("1.5b") / "exlsp-exl3.json"),
        needs=("exl3-extension", "model-1.5b"),
        flag="exl3",
    ),
    Stage(
        "exl3-bench-1.5b",
        150,
        "exllamav3 beside exllamav2, 1.5B at 4.0 bpw, 4k prompt: keystrokes, disk-tier restart",
        _kit("exl3-bench"),
        needs=("extension", "exl3-model-1.5b"),
        flag="exl3",
    ),
    Stage(
        "convert-1.5b",
        150,
        "the same model through exllamav2's converter (short calibration), timed",
        _convert_argv,
        lambda p: read_json_object(p.models / f"{FAMILY}-1.5b-converted-4.0" / "exlsp-exl2.json"),
        needs=("extension", "model-1.5b"),
        flag="with_converter",
    ),
    Stage("model-7b", 120, "7B architecture, EXL2 4.0 bpw", _model_argv("7b"), flag="with_7b"),
    Stage(
        "bench-7b",
        150,
        "side-by-side benchmark, 7B",
        _bench_argv("7b"),
        _collect_bench,
        needs=("model-7b",),
        flag="with_7b",
    ),
)


def selected_stages(flags: set[str], only: Sequence[str] | None = None) -> list[Stage]:
    return [
        s
        for s in STAGES
        if (s.flag is None or s.flag in flags)
        and (s.skip_flag is None or s.skip_flag not in flags)
        and (not only or s.name in only)
    ]


# --- the wheels ------------------------------------------------------------------------------


# Carried although the image lists it, and why.
CARRIED_ANYWAY = {
    "ninja": "torch's JIT build needs the binary on PATH, which no run has shown; "
    "installed last on PATH, so the image's comes first",
}


# Requirements of a carried wheel that are not carried, and why (reported, not failed).
UNCARRIED = {
    "llguidance": "exllamav3 needs >=1.7.0, the local package index has 1.6.1 at most; "
    "exllamav3 imports it in a try/except, for grammar filters the backend never uses",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = WHEELS_LOCK) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def read_image_packages(path: Path = IMAGE_PACKAGES) -> dict[str, str | None]:
    """{normalized name: version or None} of what the GPU image holds."""
    out: dict[str, str | None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        out[normalize(name)] = version.strip() or None
    return out


def wheel_metadata(wheel: Path) -> dict[str, Any]:
    """Name, version, Requires-Dist and top-level import names of a wheel file."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode("utf-8", "replace")
        top: set[str] = set()
        for n in names:
            head = n.split("/", 1)[0]
            if head.endswith((".dist-info", ".data")):
                continue
            top.add(head.removesuffix(".py") if "/" not in n else head)
    fields: dict[str, list[str]] = {}
    for line in meta.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields.setdefault(key, []).append(value.strip())
    return {
        "name": fields["Name"][0],
        "version": fields["Version"][0],
        "requires_dist": fields.get("Requires-Dist", []),
        "imports": sorted(t for t in top if t.isidentifier()),
    }


def make_lock(wheels_dir: Path, requirements: Sequence[str]) -> dict[str, Any]:
    """The lock written by prepare-wheels.sh: what each carried wheel is and needs."""
    import hashlib

    rows = []
    for wheel in sorted(wheels_dir.glob("*.whl")):
        meta = wheel_metadata(wheel)
        rows.append(
            {
                "file": wheel.name,
                "bytes": wheel.stat().st_size,
                "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
                "requirement": f"{meta['name']}=={meta['version']}",
                **meta,
            }
        )
    return {
        "python": "{}.{}".format(*PYTHON_TARGET),
        "requested": list(requirements),
        "wheels": rows,
    }


def write_lock(wheels_dir: Path = WHEELS_DIR, path: Path = WHEELS_LOCK) -> int:
    """Rewrite the lock from the wheels folder (prepare-wheels.sh calls this)."""
    requested = [
        line.split("#", 1)[0].strip()
        for line in (KIT_DIR / "wheels.txt").read_text(encoding="utf-8").splitlines()
    ]
    lock = make_lock(wheels_dir, [r for r in requested if r])
    path.write_text(json.dumps(lock, indent=1) + "\n", encoding="utf-8")
    print(f"{path}: {len(lock['wheels'])} wheels, {sum(w['bytes'] for w in lock['wheels'])} bytes")
    return 0


def _marker_env() -> dict[str, str]:
    return {
        "python_version": "{}.{}".format(*PYTHON_TARGET),
        "python_full_version": "{}.{}.3".format(*PYTHON_TARGET),
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "extra": "",
    }


def check_wheels(
    lock: dict[str, Any], image: dict[str, str | None], wheels_dir: Path | None = None
) -> dict[str, Any]:
    """Is every requirement of every carried wheel met by the image or the wheels?

    Returns {"missing": [...], "version_conflicts": [...], "assumed": [...] (met by an
    image package whose version nobody has read), "duplicates": [...], "carried_image":
    [...] (a wheel the image already has), "folder": [...] (the folder against the lock),
    "bytes": total}."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    carried = {normalize(w["name"]): w for w in lock["wheels"]}
    report: dict[str, Any] = {
        "missing": [],
        "uncarried": [],
        "version_conflicts": [],
        "assumed": [],
        "duplicates": [],
        "carried_image": [],
        "folder": [],
        "bytes": sum(int(w["bytes"]) for w in lock["wheels"]),
    }
    names = [normalize(w["name"]) for w in lock["wheels"]]
    report["duplicates"] = sorted({n for n in names if names.count(n) > 1})
    report["carried_image"] = sorted(n for n in carried if n in image and n not in CARRIED_ANYWAY)
    env = _marker_env()
    for w in lock["wheels"]:
        for line in w["requires_dist"]:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = normalize(req.name)
            where = f"{w['name']} needs {req}"
            if name in carried:
                if not req.specifier.contains(Version(carried[name]["version"]), prereleases=True):
                    report["version_conflicts"].append(
                        f"{where}; carried {carried[name]['version']}"
                    )
            elif name in image:
                version = image[name]
                if version is None:
                    if str(req.specifier):
                        report["assumed"].append(f"{where}; the image's version is unread")
                elif not req.specifier.contains(Version(version), prereleases=True):
                    report["version_conflicts"].append(f"{where}; the image has {version}")
            elif name in UNCARRIED:
                report["uncarried"].append(f"{where}: {UNCARRIED[name]}")
            else:
                report["missing"].append(where)
    if wheels_dir is not None:
        on_disk = {p.name: p.stat().st_size for p in wheels_dir.glob("*.whl")}
        for w in lock["wheels"]:
            if on_disk.get(w["file"]) != w["bytes"]:
                report["folder"].append(f"{w['file']}: not in {wheels_dir} as locked")
        report["folder"] += [
            f"{name}: in {wheels_dir} but not in the lock"
            for name in sorted(set(on_disk) - {w["file"] for w in lock["wheels"]})
        ]
    return report


# --- what the stages import -------------------------------------------------------------------

# Import names whose distribution name differs (image packages only; wheels list theirs).
IMPORT_ALIASES = {
    "yaml": "pyyaml",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "google": "protobuf",
    "attr": "attrs",
    "cv2": "opencv-python-headless",
    "_pytest": "pytest",
    "pkg_resources": "setuptools",
}
# Entry modules of the GPU stages; `exlsp.index` is not followed: the kit runs the
# server with the index off (its lancedb, tree-sitter and embedding model stay home).
GPU_ENTRY_MODULES = (
    "exlsp.benchmarks.gpu_kit",
    "exlsp.benchmarks.gpu_bench",
    "exlsp.benchmarks.exl2_writer",
    "exlsp.benchmarks.build_exl2",
    "exlsp.server.__main__",
    "exlsp.server.lsp",
    "exlsp.completion.backends.exllamav2",
    "exlsp.completion.backends.exllamav3",
    "exlsp.benchmarks.build_exl3",
    "exlsp.completion.backends.transformers_backend",
)
# Third-party imports the GPU stages can do without (each guarded where it is imported).
OPTIONAL_IMPORTS = {
    "tree_sitter": "completion.assist.syntax: a missing grammar only turns hover/refactor off",
}
NOT_ON_GPU_PATH = {
    # server/features/indexing.py imports these only with index.enabled, which the kit
    # turns off (lancedb, tree-sitter and the embedding model stay home);
    # exlsp.index.config, which server/config.py imports, is followed.
    "exlsp.index.service": "imported only with index.enabled (the kit turns it off)",
    "exlsp.index.retrieve": "imported only with index.enabled (the kit turns it off)",
    "exlsp.index.cli": "`exlsp index` / `exlsp search` are not run by the kit",
    "exlsp.server.doctor": "`exlsp doctor` is not run by the kit",
    "exlsp.completion.backends.openai": "the openai backend is not run by the kit",
    "exlsp.benchmarks.build_gguf": "not run by the kit",
    "exlsp.benchmarks.index_bench": "not run by the kit",
    "exlsp.benchmarks.quality": "not run by the kit",
    "exlsp.benchmarks.assist_bench": "not run by the kit",
    "exlsp.benchmarks.train_default_model": "not run by the kit",
}
_PACKAGE_DIRS = {
    "exlsp.server": ROOT / "server",
    "exlsp.completion": ROOT / "completion",
    "exlsp.index": ROOT / "index",
    "exlsp.benchmarks": ROOT / "benchmarks",
}


def _module_file(module: str) -> Path | None:
    if module.startswith("tests."):  # a test module importing another's helpers
        candidate = ROOT / "tests" / f"{module.removeprefix('tests.')}.py"
        return candidate if candidate.is_file() else None
    for pkg, folder in _PACKAGE_DIRS.items():
        if module == pkg:
            return folder / "__init__.py"
        if module.startswith(pkg + "."):
            rel = module[len(pkg) + 1 :].replace(".", "/")
            for candidate in (folder / f"{rel}.py", folder / rel / "__init__.py"):
                if candidate.is_file():
                    return candidate
    return None


def third_party_imports(
    entries: Sequence[str] = GPU_ENTRY_MODULES, extra_files: Sequence[Path] = ()
) -> dict[str, set[str]]:
    """{top-level import name: {importing modules}} over exlsp's modules reachable from
    `entries` (imports anywhere in a module, lazy ones too), plus `extra_files`."""
    import ast

    stdlib = set(sys.stdlib_module_names)

    def skipped(module: str) -> bool:
        return any(module == s or module.startswith(s + ".") for s in NOT_ON_GPU_PATH)

    found: dict[str, set[str]] = {}
    seen: set[str] = set()
    todo: list[tuple[str, Path]] = [(f.name, f) for f in extra_files]
    todo += [(m, p) for m in entries if (p := _module_file(m)) is not None]
    while todo:
        module, path = todo.pop()
        if module in seen or skipped(module):
            continue
        seen.add(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.startswith(("exlsp.", "tests.")):
                    if (sub := _module_file(name)) is not None:
                        todo.append((name, sub))
                    continue
                top = name.split(".")[0]
                if top not in stdlib and top not in ("exlsp", "tests"):
                    found.setdefault(top, set()).add(module)
    return found


def check_imports(
    lock: dict[str, Any], image: dict[str, str | None], imports: dict[str, set[str]]
) -> list[str]:
    """Import names that neither the image nor a carried wheel provides."""
    provided = {i for w in lock["wheels"] for i in w["imports"]}
    missing = []
    for name, where in sorted(imports.items()):
        dist = normalize(IMPORT_ALIASES.get(name, name))
        if name in provided or dist in image or name in OPTIONAL_IMPORTS:
            continue
        missing.append(f"{name} (imported by {', '.join(sorted(where))})")
    return missing


# --- the EXL2 layout ---------------------------------------------------------------------------


def writer_config(size: str) -> dict[str, Any]:
    """The config.json fields of a `build_model` size that the EXL2 layout depends on."""
    from exlsp.benchmarks.build_model import SIZES

    spec = SIZES[size]
    tied = spec.tie_word_embeddings
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True if tied is None else tied,
    }


def check_writer_layouts(sizes: Sequence[str] = ("tiny", "1.5b", "7b")) -> dict[str, Any]:
    """The writer's tensor table of each size against the loader's rules (no file written)."""
    from exlsp.benchmarks import exl2_writer

    out: dict[str, Any] = {}
    for size in sizes:
        config = writer_config(size)
        specs = exl2_writer.tensor_specs(config)
        linears = exl2_writer.linear_specs(config)
        problems = exl2_writer.check_exl2_tensors(
            config, {s.name: (s.dtype, s.shape) for s in specs}
        )
        for lin in linears:
            rows = exl2_writer.GROUP_SIZE * lin.bits // 32
            table = [x for g in range(lin.groups) for x in (lin.bits, g * rows)]
            problems += [
                f"{lin.key}: {p}"
                for p in exl2_writer.check_group_values(table, lin.packed_rows, lin.in_features)
            ]
        out[size] = {
            "tensors": len(specs),
            "bytes": sum(s.nbytes for s in specs),
            "bits_per_weight": round(exl2_writer.bits_per_weight(linears[:-1]), 3),
            "problems": problems,
        }
    return out


# --- the plan --------------------------------------------------------------------------------


def plan(paths: KitPaths, flags: set[str], out: Any = sys.stdout) -> int:
    """Print every stage's command and budget and run every check that needs no GPU;
    1 if a check fails."""
    failures = 0
    stages = selected_stages(flags)
    out.write(f"exlsp GPU kit: {len(stages)} stages, whole run clamped to {TOTAL_BUDGET_S} s\n")
    others = [s for s in STAGES if s not in stages]
    for i, st in enumerate([*stages, *others], 1):
        if i == len(stages) + 1:
            out.write("not in this run (another command-line flag selects or drops them):\n")
        env = {k: v for k, v in st.extra_env(paths).items()}
        argv = " ".join(shlex.quote(a) for a in st.argv(paths))
        mode = " (background)" if st.background else ""
        needs = f" after {', '.join(st.needs)}" if st.needs else ""
        out.write(f"{i}. {st.name}{mode}{needs}: {st.budget_s} s - {st.what}\n")
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        out.write(f"   {prefix + ' ' if prefix else ''}timeout {st.budget_s} {argv}\n")
    foreground = sum(s.budget_s for s in stages if not s.background)
    out.write(
        f"foreground budgets add up to {foreground} s; each stage's limit is its budget or "
        f"what is left of {TOTAL_BUDGET_S} s, whichever is less\n"
    )
    env = stage_env(paths)
    for var in ("PYTHONPATH", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "TORCH_EXTENSIONS_DIR"):
        out.write(f"env {var}={env.get(var, '')}\n")
    out.write(f"env CPATH={env.get('CPATH', '<nvidia/cu13/include, found on the GPU machine>')}\n")

    lock = read_lock()
    image = read_image_packages()
    folder = WHEELS_DIR if WHEELS_DIR.is_dir() else None
    report = check_wheels(lock, image, folder)
    out.write(
        f"wheels: {len(lock['wheels'])} carried, {report['bytes'] / 2**20:.1f} MiB "
        f"(limit {CARRY_LIMIT_BYTES / 2**20:.0f} MiB with the working tree)\n"
    )
    if folder is None:
        out.write(f"   {WHEELS_DIR.name}/ is not here: run benchmarks/gpu/prepare-wheels.sh\n")
    tree = working_tree_bytes()
    if tree is not None:
        total = tree + report["bytes"]
        out.write(
            f"travels: working tree {tree / 2**20:.1f} MiB + wheels "
            f"{report['bytes'] / 2**20:.1f} MiB = {total / 2**20:.1f} MiB of 64 MiB\n"
        )
        if total > CARRY_LIMIT_BYTES:
            out.write("   FAIL over the travel limit\n")
            failures += 1
    for key in ("missing", "version_conflicts", "duplicates", "folder"):
        for line in report[key]:
            out.write(f"   FAIL {key}: {line}\n")
            failures += 1
    for line in report["carried_image"]:
        out.write(f"   FAIL carried although the image has it: {line}\n")
        failures += 1
    for name, why in CARRIED_ANYWAY.items():
        out.write(f"   note: {name} carried although the image lists it: {why}\n")
    for line in report["assumed"]:
        out.write(f"   assumed (checked on the machine by the env stage): {line}\n")
    for line in report["uncarried"]:
        out.write(f"   note: not carried: {line}\n")
    if report["bytes"] > CARRY_LIMIT_BYTES // 2:
        out.write("   FAIL the wheels take more than half the travel limit\n")
        failures += 1

    missing = check_imports(lock, image, third_party_imports(extra_files=gpu_test_files()))
    out.write(f"imports of the GPU stages: {len(missing)} unresolved\n")
    for line in missing:
        out.write(f"   FAIL import {line}\n")
        failures += 1

    for size, row in check_writer_layouts().items():
        out.write(
            f"EXL2 writer {size}: {row['tensors']} tensors, {row['bytes'] / 1e9:.2f} GB, "
            f"{row['bits_per_weight']} bpw, {len(row['problems'])} layout problems\n"
        )
        for p in row["problems"][:10]:
            out.write(f"   FAIL layout: {p}\n")
            failures += 1
    wheel = next(iter(sorted(WHEELS_DIR.glob("exllamav2-*.whl"))), None)
    if wheel is None or importlib.util.find_spec("torch") is None:
        out.write("exllamav2's own loader code: skipped (needs the exllamav2 wheel and torch)\n")
    else:
        for size in ("tiny", "1.5b", "7b"):
            argv = [sys.executable, "-m", "exlsp.benchmarks.exl2_writer", "--size", size]
            r = subprocess.run(
                [*argv, "--source-check", str(wheel)], capture_output=True, text=True, timeout=300
            )
            lines = (r.stdout or r.stderr).strip().splitlines()
            out.write(
                f"exllamav2's own loader code, {size}: {lines[-1] if lines else r.returncode}\n"
            )
            if r.returncode:
                failures += 1
                for line in lines[:-1][:10]:
                    out.write(f"   FAIL {line}\n")
    out.write("plan: ok\n" if not failures else f"plan: {failures} failures\n")
    return 1 if failures else 0


def working_tree_bytes() -> int | None:
    """Bytes of what travels besides the carried paths: tracked files and untracked ones
    git does not ignore (None without git)."""
    try:
        listed = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for name in listed.decode("utf-8", "replace").split("\0"):
        with contextlib.suppress(OSError):
            if name:
                total += (ROOT / name).lstat().st_size
    return total


def gpu_test_files() -> list[Path]:
    return [*sorted((ROOT / "tests").glob("test_gpu_*.py")), ROOT / "tests" / "conftest.py"]


# --- results ------------------------------------------------------------------------------------


def junit_summary(path: Path) -> dict[str, Any]:
    """Outcome of each test in a pytest junit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    tests: dict[str, str] = {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = f"{child.tag}: {(child.get('message') or '')[:300]}"
            elif child.tag == "skipped":
                outcome = f"skipped: {(child.get('message') or '')[:300]}"
        tests[name] = outcome
    counts: dict[str, int] = {}
    for outcome in tests.values():
        key = outcome.split(":", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    return {"counts": counts, "tests": tests}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


class KitResults:
    """The results file: machine, commit, date, and each stage's part as it finishes."""

    def __init__(self, out: Path, *, commit: dict[str, Any], started: str) -> None:
        self.path = out / RESULTS_NAME
        self.data: dict[str, Any] = {
            "kit": {"total_budget_s": TOTAL_BUDGET_S, "started": started},
            "commit": commit,
            "machine": {},
            "stages": {},
        }

    def put_stage(self, name: str, record: dict[str, Any]) -> None:
        self.data["stages"][name] = record
        if name == "env" and isinstance(record.get("data"), dict):
            self.data["machine"] = record["data"]
        self.save()

    def save(self) -> Path:
        text = json.dumps(self.data, indent=1, ensure_ascii=False, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".part")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.path)
        gpu = self.data["machine"].get("gpu")
        if gpu:  # the copy to commit, in the tree
            with contextlib.suppress(OSError):
                RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                (RESULTS_DIR / f"gpu-kit-{slug(str(gpu))}.json").write_text(text, "utf-8")
        return self.path


# --- running ------------------------------------------------------------------------------------


@dataclass
class _Running:
    stage: Stage
    proc: subprocess.Popen[bytes]
    started: float
    limit_s: float
    log: Any


def _start(stage: Stage, paths: KitPaths, limit_s: float, env: dict[str, str]) -> _Running:
    argv = ["timeout", "-k", "10", str(max(1, int(limit_s))), *stage.argv(paths)]
    log = (paths.out / f"{stage.name}.part.log").open("wb")
    proc = subprocess.Popen(
        argv, cwd=ROOT, env={**env, **stage.extra_env(paths)}, stdout=log, stderr=subprocess.STDOUT
    )
    return _Running(stage, proc, time.monotonic(), limit_s, log)


def _finish(run: _Running, paths: KitPaths, results: KitResults, echo: Any) -> dict[str, Any]:
    rc = run.proc.wait()
    run.log.close()
    seconds = time.monotonic() - run.started
    part = paths.out / f"{run.stage.name}.part.log"
    text = part.read_text(encoding="utf-8", errors="replace") if part.is_file() else ""
    with (paths.out / LOG_NAME).open("a", encoding="utf-8") as log:
        log.write(f"\n===== {run.stage.name} (rc {rc}, {seconds:.1f} s) =====\n{text}")
    with contextlib.suppress(OSError):
        part.unlink()
    echo.write(f"\n===== {run.stage.name} (rc {rc}, {seconds:.1f} s) =====\n")
    echo.write("\n".join(text.splitlines()[-25:]) + "\n")
    echo.flush()
    status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")
    record: dict[str, Any] = {
        "status": status,
        "rc": rc,
        "seconds": round(seconds, 1),
        "limit_s": int(run.limit_s),
        "budget_s": run.stage.budget_s,
        "tail": text.splitlines()[-12:],
    }
    data = read_json_object(paths.parts / f"{run.stage.name}.json")
    if run.stage.collect is not None:
        with contextlib.suppress(Exception):
            data = {**data, **run.stage.collect(paths)}
    if data:
        record["data"] = data
    if status == "ok" and (verdict := run.stage.judge(data)):
        record["status"] = verdict
    results.put_stage(run.stage.name, record)
    return record


def run_kit(paths: KitPaths, flags: set[str], only: Sequence[str] | None = None) -> int:
    from exlsp.benchmarks.provenance import commit_info, now

    t0 = time.monotonic()
    deadline = t0 + TOTAL_BUDGET_S
    paths.out.mkdir(parents=True, exist_ok=True)
    paths.parts.mkdir(parents=True, exist_ok=True)
    make_shim(paths)
    results = KitResults(paths.out, commit=commit_info(), started=now())
    results.save()
    echo = sys.stdout
    done: dict[str, dict[str, Any]] = {}
    background: dict[str, _Running] = {}
    for stage in selected_stages(flags, only):
        for need in stage.needs:  # a background stage this one needs: wait for it
            if need in background:
                done[need] = _finish(background.pop(need), paths, results, echo)
        failed = [n for n in stage.needs if n in done and done[n]["status"] != "ok"]
        left = deadline - time.monotonic()
        if failed or left < 5:
            why = f"needs {', '.join(failed)}" if failed else "no time left"
            done[stage.name] = {"status": "skipped", "why": why}
            results.put_stage(stage.name, done[stage.name])
            echo.write(f"\n===== {stage.name}: skipped ({why}) =====\n")
            continue
        env = stage_env(paths)
        running = _start(stage, paths, min(stage.budget_s, left), env)
        if stage.background:
            background[stage.name] = running
            continue
        done[stage.name] = _finish(running, paths, results, echo)
    for run in background.values():
        done[run.stage.name] = _finish(run, paths, results, echo)
    results.data["kit"]["seconds"] = round(time.monotonic() - t0, 1)
    results.save()
    echo.write(f"\nresults: {results.path}\n")
    for name, rec in done.items():
        echo.write(f"  {name:<12} {rec['status']:<8} {rec.get('seconds', '')}\n")
    return 0 if all(r["status"] == "ok" for r in done.values()) else 1


# --- stage bodies that run as `python -m exlsp.benchmarks.gpu_kit <stage>` ------------------


def _write_part(out: Path, name: str, data: dict[str, Any]) -> None:
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n", "utf-8")


def _version(name: str) -> str | None:
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(name)
    return None


def _tool_version(argv: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        lines = (r.stdout or r.stderr).strip().splitlines()
        return lines[-1] if lines else None
    return None


def body_env(out: Path) -> int:
    """Stage 1: the machine as the later stages will find it."""
    from exlsp.benchmarks.provenance import machine_info, now

    data: dict[str, Any] = {"date": now()}
    try:
        import torch

        data["torch_cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(0)
            data["free_vram_gib"] = round(free / 2**30, 2)
            data["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception as e:  # a broken torch is a fact worth returning
        data["torch_error"] = f"{type(e).__name__}: {e}"
    data.update(machine_info(("torch", "transformers", "tokenizers", "safetensors", "numpy")))
    data["nvcc"] = _tool_version(["nvcc", "--version"])
    data["ninja"] = _tool_version(["ninja", "--version"])
    data["gcc"] = _tool_version(["gcc", "-dumpfullversion"])
    data["nvidia_cuda_dirs"] = [str(p) for p in nvidia_cuda_dirs() or ()]
    # The image packages the carried wheels rely on without a version on record.
    lock = read_lock()
    image = read_image_packages()
    report = check_wheels(lock, image)
    needed = sorted({line.split(" needs ")[1].split(";")[0] for line in report["assumed"]})
    data["assumed_requirements"] = {}
    from packaging.requirements import Requirement
    from packaging.version import Version

    for text in needed:
        req = Requirement(text)
        have = _version(req.name)
        ok = have is not None and req.specifier.contains(Version(have), prereleases=True)
        data["assumed_requirements"][text] = {"installed": have, "ok": ok}
    _write_part(out, "env", data)
    print(json.dumps(data, indent=1, default=str))
    return 0 if data.get("torch_cuda_available") else 1


def body_extension(out: Path) -> int:
    """Stage 3: import exllamav2, which JIT-compiles its CUDA extension; timed."""
    from exlsp.completion.backends.exllamav2.extension import (
        _lock_holder_alive,
        extension_build_dir,
        import_exllamav2,
    )

    # A build this kit started earlier on this machine and `timeout` killed leaves its
    # lock; torch would wait on it forever. Nothing else builds here: remove it when no
    # live process holds it, and ninja resumes from the objects already compiled.
    lock = extension_build_dir() / "lock"
    resumed = lock.is_file() and _lock_holder_alive(lock) is False
    if resumed:
        lock.unlink()
    t0 = time.perf_counter()
    exl = import_exllamav2()
    from exllamav2 import ext  # noqa: F401  (the extension module itself)

    data = {
        "exllamav2": getattr(exl, "__version__", None),
        "build_s": round(time.perf_counter() - t0, 1),
        "build_dir": str(extension_build_dir()),
        "resumed_after_a_killed_build": resumed,
        "max_jobs": os.environ.get("MAX_JOBS"),
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    }
    _write_part(out, "extension", data)
    print(json.dumps(data))
    return 0


def body_tiny(out: Path, work: Path) -> int:
    """Stage 4a: the tiny model through exllamav2's converter (`build_exl2`), its layout
    checked against the loader's rules the writer follows; the writer's tiny model
    stands in when the converter fails, so the tests still run."""
    from exlsp.benchmarks import exl2_writer
    from exlsp.benchmarks.build_exl2 import build_exl2

    paths = KitPaths(out=out, work=work)
    target = paths.tiny_exl2  # in work/models, whatever `out` is
    data: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        build_exl2(FAMILY, "tiny", target, 4.0, hf_dir=paths.hf_dir("tiny"), timeout_s=75)
        data["maker"] = "converter"
        data["layout_problems"] = exl2_writer.check_exl2_dir(target)
    except Exception as e:
        data["converter_error"] = f"{type(e).__name__}: {e}"[:2000]
        shutil.rmtree(target, ignore_errors=True)
        exl2_writer.ensure_exl2_direct(FAMILY, "tiny", target, hf_dir=paths.hf_dir("tiny"))
        data["maker"] = "writer"
        data["layout_problems"] = exl2_writer.check_exl2_dir(target)
    data["seconds"] = round(time.perf_counter() - t0, 1)
    data["dir"] = str(target)
    _write_part(out, "tiny", data)
    print(json.dumps(data, indent=1))
    return 0


def body_exl3_extension(out: Path) -> int:
    """EXL3 stage: import exllamav3's extension module, which JIT-compiles it; timed."""
    from exlsp.completion.backends.exllamav3.loader import import_exllamav3

    t0 = time.perf_counter()
    exl3 = import_exllamav3()
    import exllamav3.ext  # noqa: F401  (the extension module itself)

    data = {
        "exllamav3": _version("exllamav3") or getattr(exl3, "__version__", None),
        "build_s": round(time.perf_counter() - t0, 1),
        "max_jobs": os.environ.get("MAX_JOBS"),
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    }
    _write_part(out, "exl3-extension", data)
    print(json.dumps(data))
    return 0


# The EXL3 targets on an H100/H200, 1.5B architecture at 4.0 bpw, 4k-token prompt.
EXL3_TARGETS = {
    "p50_ms": 40.0,
    "p95_ms": 100.0,
    "ttft_ms": 15.0,
    "prefilled_per_inline_keystroke": 16,
    "restart_reused_fraction": 0.90,
}
EXL3_BENCH_PROMPT = 4096
EXL3_BENCH_KEYSTROKES = 40
EXL3_BENCH_TOKENS = 32


def keystroke_prompts(base: list[int], keystrokes: int) -> list[list[int]]:
    """In-line typing at the end of `base`: one token more each keystroke, and every
    eighth keystroke a correction (the last two tokens replaced by one)."""
    prompts = []
    text = list(base)
    for k in range(keystrokes):
        if k % 8 == 7:
            text = [*text[:-2], (text[-1] * 7 + k) % 30000 + 100]
        else:
            text = [*text, (k * 131 + 17) % 30000 + 100]
        prompts.append(text)
    return prompts


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, round(q * (len(s) - 1)))], 2)


def run_keystrokes(backend: Any, prompts: Sequence[list[int]], tokens: int) -> dict[str, Any]:
    """Each prompt as one keystroke's suggestion (`tokens` forced: no stop ids): latency,
    time to first token, reused and prefilled tokens."""
    from exlsp.completion.backends.base import GenerationJob
    from exlsp.completion.decode import decode

    lat: list[float] = []
    ttft: list[float] = []
    prefilled: list[int] = []
    reused: list[int] = []
    for prompt in prompts:
        job = GenerationJob(prompt=prompt, stop_ids=frozenset(), max_tokens=tokens)
        t0 = time.perf_counter()
        for _ in decode(backend, job):
            pass
        lat.append((time.perf_counter() - t0) * 1000)
        ttft.append(job.stats.ttft_ms or 0.0)
        prefilled.append(job.stats.prefilled_tokens)
        reused.append(job.stats.reused_tokens)
    inline = prefilled[1:]
    return {
        "keystrokes": len(prompts),
        "p50_ms": _percentile(lat, 0.5),
        "p95_ms": _percentile(lat, 0.95),
        "ttft_p50_ms": _percentile(ttft, 0.5),
        "prefilled_max_inline": max(inline) if inline else None,
        "prefilled_p50_inline": _percentile([float(x) for x in inline], 0.5),
        "reused_p50": _percentile([float(x) for x in reused], 0.5),
        "first_prefilled": prefilled[0] if prefilled else None,
    }


def body_exl3_bench(out: Path, work: Path) -> int:
    """EXL3 stage: exllamav3 beside exllamav2 on the 1.5B architecture at 4.0 bpw.

    The same keystrokes (a 4k-token prompt, then in-line typing, 32 tokens forced)
    through `decode()` on each backend in turn, then a restart of the exllamav3 backend
    on its disk page tier: the reused fraction of the first suggestion's prompt."""
    from exlsp.completion.backends.exllamav2 import load_exllamav2_backend
    from exlsp.completion.backends.exllamav3 import load_exllamav3_backend
    from exlsp.completion.config import ModelConfig

    paths = KitPaths(out=out, work=work)
    base = [(i * 7919 + 13) % 30000 + 100 for i in range(EXL3_BENCH_PROMPT - EXL3_BENCH_TOKENS)]
    prompts = keystroke_prompts(base, EXL3_BENCH_KEYSTROKES)
    data: dict[str, Any] = {
        "prompt_tokens": len(prompts[0]),
        "tokens": EXL3_BENCH_TOKENS,
        "targets": EXL3_TARGETS,
    }

    def save() -> None:
        _write_part(out, "exl3-bench-1.5b", data)

    exl3_cfg = ModelConfig(
        path=str(paths.exl3_dir("1.5b")),
        backend="exllamav3",
        maxSeqLen=8192,
        pageCacheRamMiB=1024,
        pageCacheDiskMiB=4096,
        pageCacheDir=str(paths.exl3_pages),
    )
    shutil.rmtree(paths.exl3_pages, ignore_errors=True)
    t0 = time.perf_counter()
    b3 = load_exllamav3_backend(exl3_cfg)
    data["exllamav3_load_s"] = round(time.perf_counter() - t0, 1)
    try:
        data["exllamav3"] = run_keystrokes(b3, prompts, EXL3_BENCH_TOKENS)
        save()
        b3.flush_to_disk()
    finally:
        b3.close()
    # A restart: a new backend (new generator and GPU cache) on the same disk tier.
    t0 = time.perf_counter()
    b3 = load_exllamav3_backend(exl3_cfg)
    data["exllamav3_reload_s"] = round(time.perf_counter() - t0, 1)
    try:
        restart = run_keystrokes(b3, [prompts[-1]], EXL3_BENCH_TOKENS)
        first = restart["reused_p50"] or 0.0
        restart["reused_fraction"] = round(first / len(prompts[-1]), 3)
        data["exllamav3_restart"] = restart
        save()
    finally:
        b3.close()
    exl2_dir = paths.exl2_dir("1.5b")
    if exl2_dir.is_dir():
        b2 = load_exllamav2_backend(
            ModelConfig(path=str(exl2_dir), backend="exllamav2", maxSeqLen=8192)
        )
        try:
            data["exllamav2"] = run_keystrokes(b2, prompts, EXL3_BENCH_TOKENS)
        finally:
            b2.close()
    r3 = data["exllamav3"]
    data["targets_met"] = {
        "p50_ms": r3["p50_ms"] is not None and r3["p50_ms"] <= EXL3_TARGETS["p50_ms"],
        "p95_ms": r3["p95_ms"] is not None and r3["p95_ms"] <= EXL3_TARGETS["p95_ms"],
        "ttft_ms": r3["ttft_p50_ms"] is not None and r3["ttft_p50_ms"] <= EXL3_TARGETS["ttft_ms"],
        "prefilled_per_inline_keystroke": (r3["prefilled_max_inline"] or 0)
        <= EXL3_TARGETS["prefilled_per_inline_keystroke"],
        "restart_reused_fraction": data["exllamav3_restart"]["reused_fraction"]
        >= EXL3_TARGETS["restart_reused_fraction"],
    }
    save()
    print(json.dumps(data, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exlsp.benchmarks.gpu_kit", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=["run", "plan", "env", "extension", "tiny", "lock", "exl3-extension", "exl3-bench"],
    )
    parser.add_argument("--dry-run", "--plan", action="store_true", help="same as `plan`")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/exlsp-kit/out")
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/exlsp-kit"))
    parser.add_argument("--with-7b", action="store_true", help="also the 7B architecture")
    parser.add_argument(
        "--with-converter",
        action="store_true",
        help="also time exllamav2's converter on the 1.5B model",
    )
    parser.add_argument(
        "--exl3",
        action="store_true",
        help="the EXL3 stages (exllamav3 beside exllamav2) instead of the EXL2 tests and bench",
    )
    parser.add_argument("--only", nargs="+", help="run only these stages")
    args = parser.parse_args(argv)
    flags = {f for f in ("with_7b", "with_converter", "exl3") if getattr(args, f)}
    python = os.environ.get("EXLSP_KIT_PYTHON") or sys.executable
    paths = KitPaths(out=args.out.resolve(), work=args.work, python=python)
    command = "plan" if args.dry_run else args.command
    if command == "plan":
        return plan(paths, flags)
    if command == "run":
        return run_kit(paths, flags, args.only)
    if command == "lock":
        return write_lock()
    args.out.mkdir(parents=True, exist_ok=True)
    if command == "env":
        return body_env(args.out)
    if command == "extension":
        return body_extension(args.out)
    if command == "exl3-extension":
        return body_exl3_extension(args.out)
    if command == "exl3-bench":
        return body_exl3_bench(args.out, args.work)
    return body_tiny(args.out, args.work)


if __name__ == "__main__":
    sys.exit(main())
