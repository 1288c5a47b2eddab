"""`exlsp pull`: download a model from the Hugging Face hub, check it, configure it.

A catalogue name (`exlsp models`) or any repository id, optionally `@REVISION`
(EXL2 repositories keep each bits-per-weight size on its own branch; `--bits`
picks it for a catalogue name). The download goes through `huggingface_hub`
(its progress bar; a dropped connection resumes from the last chunk written, and
a command run again after a failure fetches only the files still missing) into
`<cache>/models/<owner>--<name>--<revision>`, safetensors weights only. The
folder is then checked the way the server will load it: `config.json`, the
tokenizer, the fill-in-the-middle tokens and the template they name. Only then
is it written to the user configuration file as `model.path` and `model.backend`.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exlsp.completion import models as catalogue

# Weights, configs and tokenizers; never pickled weights (.bin, .pt: loading them can run code).
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "merges.txt",
    "vocab.txt",
    "*.tiktoken",
    "chat_template.jinja",  # the chat template, where it is not in tokenizer_config.json
]
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class PullError(Exception):
    """A reason the pull cannot go on, worded for the user."""


@dataclass
class PullTarget:
    repo: str
    revision: str
    entry: catalogue.CatalogueModel | None = None


@dataclass
class PullResult:
    path: Path
    repo: str
    revision: str
    commit: str
    backend: str
    fim_template: str | None  # None: an assist model without FIM tokens
    quantization: str
    size_bytes: int
    role: str = "model"  # the configuration section written: "model" or "assist"


def models_dir() -> Path:
    from exlsp.completion.builtin_model import cache_dir

    return cache_dir() / "models"


def local_dir(repo: str, revision: str) -> Path:
    safe_rev = revision.replace("/", "_")
    return models_dir() / f"{repo.replace('/', '--')}--{safe_rev}"


def _bits_branch(entry: catalogue.CatalogueModel, bits: float) -> tuple[str, str]:
    offered = [(e.repo, b, bpw) for e in entry.exl2 for b, bpw in e.branches.items()]
    if not offered:
        raise PullError(
            f"no EXL2 repository of {entry.name} is known; pull the safetensors "
            f"({entry.repo}) without --bits for the transformers backend, or give an EXL2 "
            "repository as REPO@BRANCH"
        )
    for repo, branch, bpw in offered:
        if abs(bpw - bits) < 1e-6:
            return repo, branch
    sizes = ", ".join(f"{bpw:g}" for _, _, bpw in offered)
    raise PullError(f"{entry.name} has no EXL2 size of {bits:g} bits per weight; one of {sizes}")


def resolve_target(spec: str, bits: float | None = None, assist: bool = False) -> PullTarget:
    """NAME | REPO[@REVISION] (+ --bits) -> the repository and revision to download.

    With `assist`, a catalogue name stands for its instruction-tuned companion."""
    spec = spec.strip()
    name, _, revision = spec.partition("@")
    entry = catalogue.find(name)
    if assist and entry is not None:
        if bits is not None:
            raise PullError("--bits picks an EXL2 size of a completion model, not with --assist")
        if entry.instruct is None:
            raise PullError(
                f"{entry.name} has no instruction-tuned companion in the catalogue; name a "
                "repository (OWNER/NAME) of an instruct model with a chat template"
            )
        return PullTarget(entry.instruct, revision or "main", None)
    if entry is not None and bits is not None:
        if revision:
            raise PullError("give either @REVISION or --bits, not both")
        repo, branch = _bits_branch(entry, bits)
        return PullTarget(repo, branch, entry)
    if bits is not None:
        raise PullError(
            "--bits picks a size of a catalogue model (exlsp models); for another "
            "repository name its branch: REPO@BRANCH"
        )
    repo = entry.repo if entry is not None else name
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise PullError(
            f"{spec!r} is neither a model of the catalogue (exlsp models) nor a "
            "repository id OWNER/NAME"
        )
    return PullTarget(repo, revision or "main", entry)


def _hub_error(e: Exception, target: PullTarget) -> PullError:
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{target.repo}@{target.revision}"
    if isinstance(e, RevisionNotFoundError):
        return PullError(
            f"{target.repo} has no revision {target.revision!r} (branch, tag or commit)"
        )
    if isinstance(e, GatedRepoError):
        return PullError(
            f"{target.repo} is gated: accept its licence on the hub, then log in "
            "(`hf auth login` or HF_TOKEN) and pull again"
        )
    if isinstance(e, RepositoryNotFoundError):
        return PullError(f"no repository {target.repo} on the hub (or it is private)")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return PullError(f"the hub did not answer for {where}: {first}")


def _check_files(files: list[str], target: PullTarget) -> None:
    weights = [f for f in files if f.endswith(".safetensors")]
    if weights:
        return
    pickles = [f for f in files if f.endswith(_PICKLES)]
    if pickles:
        raise PullError(
            f"{target.repo}@{target.revision} has only PyTorch pickle weights "
            f"({', '.join(sorted(pickles)[:3])}); exlsp loads safetensors only, since loading "
            "a pickle can run code. Look for a safetensors conversion of this model."
        )
    hint = ""
    if any(f.endswith("measurement.json") for f in files):
        hint = (
            "; this looks like an EXL2 repository, whose sizes live on branches: "
            "pull REPO@BRANCH (e.g. @6_5) or a catalogue name with --bits"
        )
    raise PullError(f"{target.repo}@{target.revision} has no .safetensors weights{hint}")


def _is_disk_full(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def download(target: PullTarget, dest: Path) -> str:
    """Download the safetensors snapshot into `dest`; the commit it came from."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    try:
        info = api.model_info(target.repo, revision=target.revision)
    except Exception as e:
        raise _hub_error(e, target) from None
    files = [s.rfilename for s in info.siblings or []]
    _check_files(files, target)
    commit = info.sha or target.revision
    dest.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(
            target.repo,
            revision=commit,
            local_dir=dest,
            allow_patterns=ALLOW_PATTERNS,
        )
    except Exception as e:
        if _is_disk_full(e):
            free = shutil.disk_usage(dest).free
            raise PullError(
                f"the disk is full ({free / 2**30:.1f} GiB free at {dest}); free some space "
                "and run the same command again: the files already downloaded are kept and "
                "only the rest is fetched"
            ) from None
        raise _hub_error(e, target) from None
    return commit


def _quantization(cfg: dict[str, Any]) -> tuple[str, str]:
    """(description, backend) from config.json."""
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "exl2":
        return f"EXL2 {quant.get('bits', '?')} bpw", "exllamav2"
    if isinstance(quant, dict):
        method = str(quant.get("quant_method", "?"))
        raise PullError(
            f"the weights are {method}-quantized; exlsp loads EXL2 (exllamav2) or plain "
            "safetensors (transformers)"
        )
    return f"{cfg.get('torch_dtype') or cfg.get('dtype') or '?'} safetensors", "transformers"


def verify(path: Path, assist: bool = False) -> tuple[str | None, str, str]:
    """Check the folder as the server will load it: (FIM template, quantization, backend).

    A completion model needs FIM tokens; an assist model needs a chat template (for
    explanations and refactors) or FIM tokens (docstrings only)."""
    from exlsp.completion.assist.prompts import read_chat_template
    from exlsp.completion.fim import UnknownFamily, detect_family
    from exlsp.completion.models import read_model_config
    from exlsp.completion.tokenizer import HfTokenizer

    if not (path / "config.json").is_file():
        raise PullError(f"no config.json in {path}: not a transformers model folder")
    cfg = read_model_config(path)
    if not cfg:
        raise PullError(f"{path / 'config.json'} is not a JSON object")
    quantization, backend = _quantization(cfg)
    try:
        tokenizer = HfTokenizer(path)
    except FileNotFoundError:
        raise PullError(f"no tokenizer.json in {path}: exlsp needs the fast tokenizer") from None
    except Exception as e:
        raise PullError(f"the tokenizer in {path} does not load: {e}") from None
    try:
        family: str | None = detect_family(tokenizer, path)
    except UnknownFamily:
        family = None
    if assist:
        if family is None and read_chat_template(path) is None:
            raise PullError(
                "the model has neither a chat template nor fill-in-the-middle tokens, so it "
                "can neither explain nor refactor. Nothing was configured."
            )
        return family, quantization, backend
    if family is None:
        raise PullError(
            "the tokenizer has no fill-in-the-middle tokens, so this model cannot complete "
            "code in the middle of a file (is it an instruct or chat model? exlsp completes "
            "with FIM base models, see `exlsp models`; `exlsp pull --assist` takes it for "
            "explanations and refactors). Nothing was configured."
        )
    return family, quantization, backend


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)


def pull(
    spec: str, bits: float | None = None, *, configure: bool = True, assist: bool = False
) -> PullResult:
    """Download, verify and (with `configure`) write model.path/backend (with `assist`:
    assist.path/backend, the model for hover and code actions) to the user file."""
    target = resolve_target(spec, bits, assist)
    dest = local_dir(target.repo, target.revision)
    commit = download(target, dest)
    family, quantization, backend = verify(dest, assist)
    role = "assist" if assist else "model"
    if configure:
        from exlsp.server.user_config import write_user_settings

        write_user_settings({role: {"path": str(dest), "backend": backend}})
    return PullResult(
        path=dest,
        repo=target.repo,
        revision=target.revision,
        commit=commit,
        backend=backend,
        fim_template=family,
        role=role,
        quantization=quantization,
        size_bytes=_dir_size(dest),
    )
