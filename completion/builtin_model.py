"""Where the built-in default model is: shipped in the package, else a local build.

An install without the shipped model builds a tiny stand-in on first use
(`exlsp.benchmarks.build_model`, imported only then); its folder's name comes
from here, so finding a build never imports the benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# The shipped model (benchmarks/train_default_model.py writes it).
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

# What the stand-in is built from (benchmarks/build_model.py's parameters).
DEFAULT_MODEL: dict[str, Any] = dict(family="qwen2.5-coder", size="tiny", seed=0, train_steps=300)

# Bump whenever a change alters the bytes of a build (tokenizer, init, training):
# it is part of every build's folder name.
BUILDER_VERSION = "2"


def cache_dir() -> Path:
    """`$EXLSP_CACHE_DIR`, else the user cache directory for exlsp."""
    env = os.environ.get("EXLSP_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("exlsp"))


def models_dir() -> Path:
    """Where built and downloaded models live."""
    return cache_dir() / "models"


def model_dir_name(family: str, size: str, seed: int, train_steps: int) -> str:
    return f"{family}-{size}-s{seed}-t{train_steps}-v{BUILDER_VERSION}"


def shipped_model_dir() -> Path | None:
    return SHIPPED_MODEL_DIR if (SHIPPED_MODEL_DIR / "config.json").is_file() else None


def built_model_dir() -> Path:
    """Where the stand-in's build is (or would be)."""
    return models_dir() / model_dir_name(**DEFAULT_MODEL)


def default_model_dir() -> Path:
    """The model used when none is configured: the shipped one, else the local build
    (built now, once, if missing: about a minute)."""
    shipped = shipped_model_dir()
    if shipped is not None:
        return shipped
    from exlsp.benchmarks.build_model import ensure_model

    return ensure_model(**DEFAULT_MODEL)
