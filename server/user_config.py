"""The user's configuration file: the same tree as `initializationOptions`, for every editor.

`<user config dir>/exlsp/config.json` (`$EXLSP_CONFIG_DIR/config.json` when set)
sits below the editor's settings: defaults < this file < `initializationOptions`
< `workspace/configuration`. `exlsp pull` writes `model.path` and `model.backend`
here, so one download serves every editor without per-editor setup.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILE_NAME = "config.json"


class UserConfigError(ValueError):
    pass


def user_config_dir() -> Path:
    env = os.environ.get("EXLSP_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("exlsp"))


def user_config_path() -> Path:
    return user_config_dir() / FILE_NAME


def read_user_config() -> dict[str, Any]:
    """The file's tree; {} when there is none. UserConfigError when it is not a JSON object."""
    path = user_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise UserConfigError(f"{path}: {e.strerror or e}") from None
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise UserConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserConfigError(f"{path}: expected a JSON object")
    return data


def deep_merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """`base` with `updates` applied; nested objects merge, everything else replaces."""
    out = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def write_user_settings(updates: dict[str, Any]) -> Path:
    """Merge `updates` into the file, keeping every other key; atomic, mode 0600."""
    path = user_config_path()
    data = deep_merge(read_user_config(), updates)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file with mode 0600: it may hold an API key.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def user_settings(report: Callable[[str], Any]) -> dict[str, Any] | None:
    """The file's tree for the server: an unreadable file is reported and skipped."""
    try:
        return read_user_config() or None
    except UserConfigError as e:
        report(f"exlsp: the user configuration file is ignored: {e}")
        return None
