"""The one configuration tree, fully defaulted, camelCase on the wire.

Precedence: defaults < the user configuration file (`user_config.py`) <
`initializationOptions` < `workspace/configuration`
(section "exlsp") / `workspace/didChangeConfiguration`. A bad value is
reported and its default (or the value it had) kept; the rest still applies.

Settings that choose a model to load, a host, a credential or a path to write
(`USER_ONLY`) come only from the user: `initializationOptions` (the editor's
user settings), the user configuration file and the command line. A
repository's settings reach the server through `workspace/configuration`, so
those keys are dropped there (`drop_user_only`).
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from exlsp.completion.assist.assistant import CodeActionsConfig, HoverConfig
from exlsp.completion.config import (
    API_KEY_ENV_PREFIX,
    AssistModelConfig,
    CompletionConfig,
    EngineConfig,
    ModelConfig,
    api_key_env_allowed,
)
from exlsp.index.config import IndexConfig

_LEVELS = ("critical", "error", "warning", "info", "debug")
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("logging", "level"): _LEVELS,
    ("completion", "multiline"): ("auto", "always", "never"),
    ("model", "backend"): ("transformers", "exllamav2", "exllamav3", "openai", "instant"),
    ("model", "dtype"): ("auto", "float32", "float16", "bfloat16"),
    ("model", "cacheType"): ("fp16", "q8", "q6", "q4"),
    ("model", "promptFormat"): ("auto", "tokens", "text"),
    ("model", "host"): ("auto", "off"),
    ("assist", "backend"): ("", "transformers", "exllamav2", "exllamav3", "openai"),
    ("assist", "dtype"): ("auto", "float32", "float16", "bfloat16"),
    ("assist", "cacheType"): ("fp16", "q8", "q6", "q4"),
    ("assist", "promptFormat"): ("auto", "tokens", "text"),
}
# Chosen only by the user: a model to load, a host, a credential, a path to write.
USER_ONLY: frozenset[tuple[str, str]] = frozenset(
    {
        ("model", "path"),
        ("model", "backend"),
        ("model", "baseUrl"),
        ("model", "remoteModel"),
        ("model", "apiKey"),
        ("model", "apiKeyEnv"),
        ("model", "verifyTls"),
        ("model", "caFile"),
        ("model", "fallback"),
        ("model", "pageCacheDir"),
        ("assist", "path"),
        ("assist", "backend"),
        ("assist", "baseUrl"),
        ("assist", "remoteModel"),
        ("assist", "apiKey"),
        ("assist", "apiKeyEnv"),
        ("assist", "verifyTls"),
        ("assist", "caFile"),
        ("index", "databaseDir"),
        ("index", "sharedIndex"),
        ("index", "embeddingModel"),
        ("index", "storageEndpoint"),
        ("index", "storageRegion"),
        ("index", "storageAccessKeyId"),
        ("index", "storageSecretAccessKey"),
        ("logging", "file"),
    }
)
# Values never echoed in messages.
# (A fallback entry may hold an API key.)
_SECRETS = {
    ("model", "apiKey"),
    ("model", "fallback"),
    ("assist", "apiKey"),
    ("index", "storageSecretAccessKey"),
}
# Integers that must be positive; the others must be >= 0.
_POSITIVE = {
    "prefixTokens",
    "suffixTokens",
    "middleTokens",
    "maxTokens",
    "maxTokensSingleLine",
    "deadlineMs",
    "typeAheadEntries",
    "maxSeqLen",
    "connectTimeoutMs",
    "readTimeoutMs",
    "hostSlots",
}


@dataclass
class LoggingConfig:
    level: str = "info"
    # Also log to this file ("" = only the client's log via window/logMessage).
    file: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    hover: HoverConfig = field(default_factory=HoverConfig)
    codeActions: CodeActionsConfig = field(default_factory=CodeActionsConfig)
    # The model behind hover and code actions; by default the completion model.
    assist: AssistModelConfig = field(default_factory=AssistModelConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def engine(self) -> EngineConfig:
        return EngineConfig(model=self.model, completion=self.completion)


def to_wire(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def default_wire_config() -> dict[str, Any]:
    """The complete default tree as the client sends it (the README shows it)."""
    return to_wire(Config())


def _check(section: str, name: str, typ: Any, value: Any) -> Any:
    """The value converted to the field's type, or ValueError."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise ValueError("expected an integer")
        value = int(value)
        if (name in _POSITIVE and value <= 0) or value < 0:
            raise ValueError("expected a positive integer" if name in _POSITIVE else ">= 0")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        if (
            name == "apiKeyEnv"
            and section in ("model", "assist")
            and value
            and not api_key_env_allowed(value)
        ):
            raise ValueError(
                f"only variables named {API_KEY_ENV_PREFIX}* may hold the API key"
                f" (set {API_KEY_ENV_PREFIX}API_KEY in the editor's environment)"
            )
        choices = _CHOICES.get((section, name))
        if choices and value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value.lower() if choices else value
    if (section, name) == ("model", "fallback"):
        return _check_fallback(value)
    if typing.get_origin(typ) in (list, types.GenericAlias) or typ is list:
        if not isinstance(value, list):
            raise ValueError("expected a list")
        return list(value)
    raise ValueError(f"unsupported setting type {typ}")


def _check_fallback(value: Any) -> list[dict[str, Any]]:
    """`model.fallback`: a list of partial `model` trees, each checked as `model` is."""
    if not isinstance(value, list):
        raise ValueError("expected a list of partial model settings")
    entries: list[dict[str, Any]] = []
    for i, entry in enumerate(value):
        where = f"entry {i + 1}"
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"{where}: expected an object of model settings")
        if "fallback" in entry:
            raise ValueError(f"{where}: an entry has no fallback of its own")
        checked, errors = merge(ModelConfig(), entry, "model")
        if errors:
            # The messages name model.<key>; an API key's value is never echoed.
            raise ValueError(f"{where}: " + "; ".join(e.removeprefix("model.") for e in errors))
        entries.append({k: getattr(checked, k) for k in entry})
    return entries


def merge(obj: Any, wire: Any, path: str = "") -> tuple[Any, list[str]]:
    """A copy of dataclass `obj` with the values of `wire` applied; and the problems."""
    errors: list[str] = []
    if wire is None:
        return obj, errors
    if not isinstance(wire, dict):
        return obj, [f"{path or 'settings'}: expected an object"]
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in wire.items():
        where = f"{path}.{key}" if path else key
        if key not in known:
            errors.append(f"{where}: unknown setting")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key], sub = merge(current, value, where)
            errors += sub
            continue
        try:
            changes[key] = _check(path, key, hints[key], value)
        except ValueError as e:
            if (path, key) in _SECRETS:
                errors.append(f"{where}: {e}; keeping the previous value")
            else:
                errors.append(f"{where}: {e} (got {value!r}); keeping {current!r}")
    return dataclasses.replace(obj, **changes), errors


def drop_user_only(current: Any, wire: Any) -> tuple[Any, list[str]]:
    """`wire` (a settings tree from the workspace) without the `USER_ONLY` keys; and
    the names of those that would have changed a value (the same value, as a client
    that answers with the user's own settings sends it, is not worth a word)."""
    if not isinstance(wire, dict):
        return wire, []
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for section, values in wire.items():
        if not isinstance(values, dict):
            kept[section] = values
            continue
        sub = getattr(current, section, None)
        kept[section] = {}
        for key, value in values.items():
            if (section, key) not in USER_ONLY:
                kept[section][key] = value
            elif sub is None or getattr(sub, key, value) != value:
                dropped.append(f"{section}.{key}")
    return kept, dropped


# The log file's lines (`--log-file`, `logging.file`).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def level_number(level: str) -> int:
    return int(logging.getLevelName(level.upper()))
