"""`exlsp doctor`: can this machine serve the configured model, and if not, why.

Prints one aligned table (GPU, driver, CUDA, torch, exllamav2 and its CUDA
extension, flash-attn, the model directory's family, quantization, size and
parameters, whether it loads and with how much VRAM) and ends with the verdict:
``ok: ...`` and exit status 0 when the configured backend can run, or
``not ready: <reason>`` and exit status 1; then ``next: <the one command to run>``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from exlsp.completion.backends.exllamav2 import (
    ExLlamaV2LoadError,
    extension_build_dir,
    find_stale_extension_lock,
    import_exllamav2,
    safetensors_parameter_count,
)
from exlsp.completion.builtin_model import built_model_dir, shipped_model_dir
from exlsp.completion.config import ModelConfig
from exlsp.completion.decode import decode
from exlsp.completion.models import read_model_config

NOT_INSTALLED = "not installed"


@dataclass
class DoctorReport:
    rows: list[tuple[str, str]] = field(default_factory=list)
    problem: str | None = None
    serving: str = ""
    next_step: str = ""

    def add(self, label: str, value: str) -> None:
        self.rows.append((label, value))

    def fail(self, reason: str) -> None:
        if self.problem is None:  # the first problem is the one to fix first
            self.problem = reason

    def render(self) -> str:
        width = max((len(label) for label, _ in self.rows), default=0)
        lines = ["exlsp doctor", ""]
        for label, value in self.rows:
            first, *rest = value.splitlines() or [""]
            lines.append(f"  {label.ljust(width)}  {first}")
            lines += [f"  {'':<{width}}  {more}" for more in rest]
        lines.append("")
        if self.problem is None:
            lines.append(f"ok: {self.serving}")
        else:
            lines.append("not ready: " + " ".join(self.problem.split()))
        if self.next_step:
            lines.append(f"next: {self.next_step}")
        return "\n".join(lines) + "\n"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _bytes(n: float) -> str:
    return _gib(n) if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n:,}"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- the machine ------------------------------------------------------------------


def _machine_rows(report: DoctorReport) -> bool:
    """GPU, driver, CUDA and torch rows; whether a CUDA GPU is usable."""
    try:
        import torch
    except ImportError:
        report.add("torch", NOT_INSTALLED)
        report.fail("torch is not installed")
        return False
    has_gpu = bool(torch.cuda.is_available())
    if has_gpu:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            report.add(
                f"GPU {i}",
                f"{props.name}, {_gib(total)} ({_gib(free)} free), "
                f"compute capability {props.major}.{props.minor}",
            )
    else:
        report.add("GPU", "none (torch.cuda.is_available() is False)")
    smi = _run(["nvidia-smi"]) if shutil.which("nvidia-smi") else None
    if smi is None:
        report.add(
            "NVIDIA driver",
            "nvidia-smi not found" if not shutil.which("nvidia-smi") else "nvidia-smi failed",
        )
    else:
        driver = re.search(r"Driver Version:\s*([\w.]+)", smi)
        cuda = re.search(r"CUDA Version:\s*([\w.]+)", smi)
        report.add("NVIDIA driver", driver.group(1) if driver else "?")
        report.add("CUDA (driver)", cuda.group(1) if cuda else "?")
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    report.add("torch", f"{torch.__version__} ({build})")
    nvcc = _run(["nvcc", "--version"]) if shutil.which("nvcc") else None
    release = re.search(r"release ([\d.]+)", nvcc or "")
    report.add("nvcc", release.group(1) if release else "not found")
    return has_gpu


def _exllamav2_rows(report: DoctorReport, has_gpu: bool, wanted: bool) -> bool:
    """exllamav2, its extension and flash-attn; whether exllamav2 imports."""
    version = _version("exllamav2")
    report.add("exllamav2", version)
    build_dir = extension_build_dir()
    stale = find_stale_extension_lock(build_dir)
    built = build_dir.is_dir() and any(p.suffix == ".so" for p in build_dir.iterdir())
    state = "built" if built else "not built (the first import compiles it: minutes)"
    if stale is not None:
        state = f"STALE LOCK {stale[0]} (an interrupted build): delete it"
    report.add("exllamav2 extension", f"{state}\nin {build_dir}")
    imported = False
    if version == NOT_INSTALLED:
        report.add("exllamav2 import", "not tried: not installed")
    elif not has_gpu:
        report.add("exllamav2 import", "not tried: no GPU")
    elif not wanted and not built:
        report.add("exllamav2 import", "not tried: backend is not exllamav2 (would compile)")
    else:
        t0 = time.perf_counter()
        try:
            import_exllamav2()
        except ExLlamaV2LoadError as e:
            report.add("exllamav2 import", f"failed: {e}")
            if wanted:
                report.fail(str(e))
        else:
            imported = True
            report.add("exllamav2 import", f"ok ({time.perf_counter() - t0:.1f} s)")
    flash = _version("flash-attn")
    report.add(
        "flash-attn",
        flash if flash != NOT_INSTALLED else "not installed (exllamav2 uses torch SDPA)",
    )
    if wanted and report.problem is None:
        if not has_gpu:
            report.fail(
                "the exllamav2 backend needs a CUDA GPU and this machine has none; "
                'set model.backend to "transformers" here'
            )
        elif version == NOT_INSTALLED:
            report.fail("exllamav2 is not installed: pip install 'exlsp[gpu]' (exllamav2==0.3.2)")
    return imported


def _exllamav3_rows(report: DoctorReport, has_gpu: bool) -> None:
    """exllamav3 (the exllamav3 backend only; it imports, and compiles, when the model loads)."""
    version = _version("exllamav3")
    report.add("exllamav3", version)
    if not has_gpu:
        report.fail(
            "the exllamav3 backend needs a CUDA GPU and this machine has none; "
            'set model.backend to "transformers" here'
        )
    elif version == NOT_INSTALLED:
        report.fail("exllamav3 is not installed: pip install 'exlsp[exl3]' (exllamav3==1.6.5)")


# --- the model --------------------------------------------------------------------


def _default_model_dir() -> tuple[Path | None, str]:
    shipped = shipped_model_dir()
    if shipped is not None:
        return shipped, f"{shipped} (built-in default, shipped)"

    path = built_model_dir()
    return (
        (path, f"{path} (built-in default)")
        if path.is_dir()
        else (
            None,
            f"built-in default, not built yet (built on first start, about a minute) at {path}",
        )
    )


def _quantization(cfg: dict[str, Any], path: Path) -> str:
    quant = cfg.get("quantization_config")
    extra = " (measurement.json present)" if (path / "measurement.json").is_file() else ""
    if isinstance(quant, dict):
        method = str(quant.get("quant_method", "?"))
        bits = quant.get("bits")
        if method == "exl2":
            head = quant.get("head_bits")
            return f"EXL2 {bits} bpw" + (f" (head {head} bit)" if head else "") + extra
        if method == "exl3":
            return f"EXL3 {bits} bpw" + extra
        return f"{method} {bits}-bit" + extra if bits else method + extra
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "?"
    return f"{dtype} (unquantized)" + extra


def _model_rows(report: DoctorReport, model: ModelConfig) -> tuple[Path | None, dict[str, Any]]:
    if model.path:
        path: Path | None = Path(model.path).expanduser()
        report.add("model dir", str(path))
        assert path is not None
        if not path.is_dir():
            report.fail(f"model directory not found: {path}")
            return None, {}
        if not (path / "config.json").is_file():
            report.fail(f"not a model directory (no config.json): {path}")
            return None, {}
    else:
        path, shown = _default_model_dir()
        report.add("model dir", shown)
        if path is None:
            return None, {}
    cfg = read_model_config(path)
    archs = ", ".join(str(a) for a in cfg.get("architectures") or []) or "?"
    report.add("architecture", f"{archs} ({cfg.get('model_type', '?')})")
    report.add("FIM template", _fim_family(model, path))
    quant = _quantization(cfg, path)
    report.add("weights", quant)
    try:
        params = safetensors_parameter_count(path)
    except (OSError, ValueError) as e:
        report.add("parameters", f"unreadable safetensors header: {e}")
    else:
        report.add("parameters", _human_count(params) if params else "no safetensors files")
    report.add("size on disk", _bytes(_dir_size(path)))
    context = cfg.get("max_position_embeddings")
    if context:
        report.add("context (model)", f"{context} tokens")
    if model.backend == "transformers" and quant.startswith("EXL2"):
        report.fail("an EXL2 model needs the exllamav2 backend (model.backend), not transformers")
    _exl3_model_rows(report, model, cfg)
    return path, cfg


def _exl3_model_rows(report: DoctorReport, model: ModelConfig, cfg: dict[str, Any]) -> None:
    """EXL3 models: the backend they need, how far their prefix reuse goes, the page tiers."""
    from exlsp.completion.backends.exllamav3 import (
        is_exl3_model,
        is_recurrent_architecture,
        page_cache_dir,
    )

    exl3 = is_exl3_model(cfg)
    if model.backend == "exllamav3" and not exl3:
        report.fail("the exllamav3 backend loads EXL3 models only (EXL2: model.backend=exllamav2)")
    if not exl3:
        return
    if model.backend != "exllamav3":
        report.fail(
            f"an EXL3 model needs the exllamav3 backend (model.backend), not {model.backend}"
        )
        return
    if is_recurrent_architecture(cfg):
        report.add(
            "prefix reuse",
            "snaps to 256-token pages: a hybrid/recurrent architecture resumes only at\n"
            "page-aligned checkpoints (no partial-page copy)",
        )
    else:
        report.add("prefix reuse", "to the token (whole pages + partial-page copy)")
    ram, disk = model.pageCacheRamMiB, model.pageCacheDiskMiB
    tiers = f"pinned RAM {ram} MiB" if ram else "RAM tier off"
    if disk:
        where = model.pageCacheDir or str(page_cache_dir())
        tiers += f", disk {disk} MiB in {where}"
    report.add("page tiers", tiers)


def _fim_family(model: ModelConfig, path: Path) -> str:
    if model.fimTemplate != "auto":
        return f"{model.fimTemplate} (configured)"
    try:
        from exlsp.completion.fim import detect_family
        from exlsp.completion.tokenizer import HfTokenizer

        return f"{detect_family(HfTokenizer(path), path)} (detected)"
    except Exception as e:
        return f"unknown: {e}"


# --- loading ------------------------------------------------------------------------


def _load_rows(report: DoctorReport, model: ModelConfig, path: Path) -> None:
    import dataclasses

    import torch

    from exlsp.completion.service import create_backend

    cuda = torch.cuda.is_available()
    free_before = torch.cuda.mem_get_info()[0] if cuda else 0
    t0 = time.perf_counter()
    try:
        backend = create_backend(dataclasses.replace(model, path=str(path)))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        report.add("loads", f"no: {first}")
        report.fail(f"the {model.backend} backend cannot load {path}: {first}")
        return
    seconds = time.perf_counter() - t0
    try:
        info = backend.info
        detail = f"yes, in {seconds:.1f} s on {info.device}"
        if cuda:
            vram = getattr(backend, "vram_bytes", None)
            if vram is None:
                vram = free_before - torch.cuda.mem_get_info()[0]
            detail += f", {_bytes(vram)} VRAM"
        report.add("loads", detail)
        if info.parameters:
            report.add("parameters (loaded)", _human_count(info.parameters))
        report.serving = (
            f"the {backend.name} backend serves {Path(info.path).name} on {info.device}"
            + (f" ({info.dtype})" if info.dtype else "")
        )
    finally:
        backend.close()


def _remote_rows(report: DoctorReport, model: ModelConfig, load: bool) -> None:
    """The openai backend: the server, the key's source, the prompt format, one completion."""
    from exlsp.completion.backends.base import GenerationJob
    from exlsp.completion.backends.openai import (
        estimate_note,
        load_openai_backend,
        resolve_api_key,
    )

    report.add("server", model.baseUrl or "(model.baseUrl not set)")
    if model.apiKey:
        report.add("API key", "from model.apiKey")
    elif resolve_api_key(model):
        report.add("API key", f"from ${model.apiKeyEnv}")
    else:
        report.add("API key", "none")
    try:
        backend = load_openai_backend(model)
    except Exception as e:
        report.add("reachable", "not tried")
        report.fail(str(e))
        return
    try:
        report.add("model", backend.model_name or "(the server's default)")
        report.add(
            "prompts",
            f"{backend.prompt_format}; token counts {estimate_note(backend.exact_tokens)}",
        )
        if backend.health.problem is not None:
            report.add("reachable", f"no: {backend.health.problem}")
            report.fail(backend.health.problem)
            return
        if not load:
            report.add("answers", "not tried (--no-load)")
            report.serving = f"the openai backend is configured for {backend.display_url}"
            return
        t0 = time.perf_counter()
        job = GenerationJob(
            prompt=backend.tokenizer.encode("def hello():\n    return"),
            stop_ids=frozenset(),
            max_tokens=4,
            deadline=time.monotonic() + 30,
        )
        try:
            text = backend.tokenizer.decode(list(decode(backend, job)))
        except Exception as e:
            report.add("answers", f"no: {e}")
            report.fail(str(e))
            return
        report.add("answers", f"yes, {len(text)} characters in {time.perf_counter() - t0:.2f} s")
        served = backend.model_name or "a model"
        report.serving = f"the openai backend serves {served} from {backend.display_url}"
    finally:
        backend.close()


def recommended_pull(model: ModelConfig, has_gpu: bool) -> tuple[str, str] | None:
    """(`exlsp pull ...`, what it fits) for the largest catalogue model that fits here."""
    from exlsp.completion import models

    free, where = models.available_memory(model.device)
    cpu = not has_gpu or where == "RAM"
    backend = "transformers" if cpu else "exllamav2"
    best = models.recommend(
        models.size_all(
            free,
            backend,
            max_seq_len=model.maxSeqLen,
            cache_type=model.cacheType,
            cpu=cpu,
        )
    )
    if best is None:
        return None
    v = best.variant
    command = f"exlsp pull {v.model.name}" + (f" --bits {v.bpw:g}" if v.exl2 else "")
    return command, f"{_gib(best.estimate.total)} of {_gib(free)} free {where}"


def next_step(report: DoctorReport, model: ModelConfig, has_gpu: bool) -> str:
    """The one command to run next."""
    no_model = not model.path or (
        report.problem is not None and report.problem.startswith("model directory not found")
    )
    if report.problem is not None and not no_model:
        return "fix the problem above, then run `exlsp doctor` again"
    if no_model:
        pick = recommended_pull(model, has_gpu)
        if pick is None:
            return "no catalogue model fits this machine's free memory (see `exlsp models`)"
        command, fit = pick
        why = "the built-in model serves now; for real completions" if not model.path else "then"
        return f"{command}  ({why}: the largest catalogue model that fits, {fit})"
    return "all good: start your editor"


def _describe(model: ModelConfig) -> str:
    """A model as the rows name it: backend and folder or server (never a key)."""
    where = model.baseUrl if model.backend == "openai" else (model.path or "the built-in model")
    return f"{model.backend}: {where}"


def _chain_rows(report: DoctorReport, model: ModelConfig, assist: ModelConfig | None) -> None:
    """The fallback chain and the assist model: named, their folders looked at, not loaded."""
    from exlsp.completion.assist.prompts import read_chat_template
    from exlsp.completion.config import fallback_chain

    for n, entry in enumerate(fallback_chain(model)[1:], 1):
        report.add(f"fallback {n}", _describe(entry))
    if assist is None:
        report.add("assist model", "the completion model (assist.backend is empty)")
        return
    row = _describe(assist)
    folder = Path(assist.path).expanduser() if assist.path else None
    if folder is not None and not folder.is_dir():
        row += "\nnot found: hover and code actions will use the completion model"
    elif folder is not None:
        template = read_chat_template(folder)
        row += "\n" + (
            "chat template: yes (explanations and every refactor)"
            if template
            else "chat template: none (docstrings only, from fill-in-the-middle)"
        )
    report.add("assist model", row)


def _host_rows(report: DoctorReport, model: ModelConfig) -> None:
    """The shared model host of this configuration, and how many others run."""
    from exlsp.completion.host import control, host_mode, uses_host

    if not uses_host(model):
        why = "the openai backend runs in-process" if model.backend == "openai" else "off"
        report.add("model host", f"{why} (model.host: {host_mode(model)})")
        return
    mine = control.host_for(model)
    others = [h for h in control.running_hosts() if mine is None or h["pid"] != mine["pid"]]
    if mine is None:
        report.add("model host", "not running (the first editor starts it)")
    else:
        for label, value in control.describe(mine):
            report.add(label, value)
    if others:
        report.add(
            "other hosts",
            "\n".join(f"pid {h['pid']}: {control.describe(h)[1][1]}" for h in others)
            + "\n(another model configuration has a host of its own)",
        )


def run_doctor(
    model: ModelConfig,
    out: TextIO = sys.stdout,
    *,
    load: bool = True,
    assist: ModelConfig | None = None,
) -> int:
    """Print the diagnosis for `model`; 0 when its backend can run here, else 1.

    The fallback chain and the assist model (`assist`, None: the completion model
    serves hover and code actions) are listed, not loaded."""
    report = DoctorReport()
    report.add("exlsp", _version("exlsp"))
    report.add("python", sys.version.split()[0])
    if model.backend == "openai":
        # A remote server: nothing about this machine's GPU matters.
        report.add("backend", model.backend)
        _remote_rows(report, model, load)
        _chain_rows(report, model, assist)
        report.next_step = (
            "all good: start your editor"
            if report.problem is None
            else "fix the server or model.baseUrl above, then run `exlsp doctor` again"
        )
        out.write(report.render())
        out.flush()
        return 0 if report.problem is None else 1
    has_gpu = _machine_rows(report)
    _exllamav2_rows(report, has_gpu, wanted=model.backend == "exllamav2")
    if model.backend == "exllamav3":
        _exllamav3_rows(report, has_gpu)
    report.add("backend", model.backend)
    path, _ = _model_rows(report, model)
    if report.problem is None and path is not None:
        if load:
            _load_rows(report, model, path)
        else:
            report.add("loads", "not tried (--no-load)")
            report.serving = f"the {model.backend} backend is configured for {path.name}"
    elif path is None and report.problem is None:
        report.add("loads", "not tried: the default model is built on first start")
        report.serving = f"the {model.backend} backend, once the default model is built"
    elif report.problem is not None:
        report.add("loads", "not tried")
    _host_rows(report, model)
    _chain_rows(report, model, assist)
    report.next_step = next_step(report, model, has_gpu)
    out.write(report.render())
    out.flush()
    return 0 if report.problem is None else 1
