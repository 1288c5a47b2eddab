"""Secrets: files and text that exlsp never reads into an index, a prompt or a log.

The one home of the deny-list. The index asks it before it opens a file and
again about the text it read; the server asks it about the document being
completed. Names are matched case-insensitively (``.ENV``, ``ID_RSA``), a
symlink is judged by its own name and by its target's, and text is judged by
its content (PEM private keys, well-known token shapes), so a secret pasted
into ``settings.py`` or a key file with a harmless name is caught as well.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path, PurePosixPath

# File names (fnmatch, lower case): never read, whatever the configuration says.
FILE_PATTERNS: tuple[str, ...] = (
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*_rsa",
    "*_ed25519",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.kdbx",
    "*.gpg",
    "*.ovpn",
    "*.tfstate",
    "*.tfstate.*",
    "*.tfvars",
    "*credentials.json",
    "application_default_credentials.json",
    "service-account*.json",
    ".netrc",
    "_netrc",
    ".npmrc",
    ".yarnrc.yml",
    ".pypirc",
    ".pgpass",
    ".my.cnf",
    ".s3cfg",
    ".boto",
    ".vault-token",
    ".git-credentials",
    ".htpasswd",
    ".dockercfg",
    ".terraformrc",
    "terraform.rc",
)

# Names that are secret as data but common as source files (`secrets.py` is a
# standard library module, `credentials.go` a package): secret unless the name ends
# in a source-code extension. The content check still looks inside those.
DATA_PATTERNS: tuple[str, ...] = ("credentials*", "secrets.*", "secret.*", "*kubeconfig*")
CODE_SUFFIXES: frozenset[str] = frozenset(
    {
        ".py", ".pyi", ".js", ".jsx", ".mjs", ".cjs", ".ts", ".tsx", ".go", ".rs", ".java",
        ".kt", ".scala", ".rb", ".php", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".swift",
        ".lua", ".ex", ".exs", ".erl", ".hs", ".ml", ".dart", ".vue", ".svelte",
    }
)  # fmt: skip

# Directories (lower case) whose whole content is secret, at any depth.
DIR_NAMES: frozenset[str] = frozenset(
    {".ssh", ".aws", ".gnupg", ".docker", ".kube", ".azure", ".password-store"}
)


def _any_of(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


_NAME = _any_of(FILE_PATTERNS)
_DATA_NAME = _any_of(DATA_PATTERNS)

# Content: a private key or a credential of a well-known shape, anywhere in the text.
# Each shape has literal hints: the pattern runs only over text that holds one of
# them, so a large file costs a few substring searches, not a scan per pattern.
_TEXT_PATTERNS: tuple[tuple[str, tuple[str, ...], re.Pattern[str]], ...] = tuple(
    (kind, hints, re.compile(pattern))
    for kind, hints, pattern in (
        (
            "a private key",
            ("PRIVATE KEY",),
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
        ),
        ("an AWS access key id", ("AKIA", "ASIA"), r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
        (
            "an AWS secret access key",
            ("ecret", "ECRET"),
            r"(?i:aws_?secret_?(?:access_?)?key)\W{0,4}[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])",
        ),
        (
            "a GitHub token",
            ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
            r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})",
        ),
        ("a GitLab token", ("glpat-",), r"\bglpat-[A-Za-z0-9_-]{20,}"),
        ("a Slack token", ("xox",), r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
        ("a Google API key", ("AIza",), r"\bAIza[0-9A-Za-z_-]{35}"),
        ("an API secret key", ("sk-",), r"\bsk-(?:proj-|ant-[a-z0-9]{2,6}-)?[A-Za-z0-9_-]{32,}"),
        ("a Stripe live key", ("k_live_",), r"\b[rs]k_live_[0-9A-Za-z]{24,}"),
        ("an npm token", ("npm_",), r"\bnpm_[A-Za-z0-9]{36}\b"),
        ("a PyPI token", ("pypi-AgEI",), r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}"),
        ("a Hugging Face token", ("hf_",), r"\bhf_[A-Za-z0-9]{34,}\b"),
    )
)


def secret_name(path: str | os.PathLike[str]) -> bool:
    """The path (relative or absolute, either separator) names a secret file, or
    lies in a secret directory. Names only: nothing is read or resolved."""
    parts = PurePosixPath(os.fspath(path).replace("\\", "/").lower()).parts
    if not parts:
        return False
    if any(part in DIR_NAMES for part in parts[:-1]):
        return True
    name = parts[-1]
    if _NAME.fullmatch(name) is not None:
        return True
    return (
        _DATA_NAME.fullmatch(name) is not None and PurePosixPath(name).suffix not in CODE_SUFFIXES
    )


def secret_path(path: str | os.PathLike[str]) -> bool:
    """`secret_name` of the path and, where it is or passes through a symlink, of the
    real path it leads to (``env.txt -> .env``)."""
    if secret_name(path):
        return True
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError):
        return True  # a link loop or an unreadable link: not worth the risk
    return real != Path(os.path.abspath(path)) and secret_name(real)


def secret_in_text(text: str) -> str | None:
    """What kind of secret the text holds ("a private key", ...), or None."""
    for kind, hints, pattern in _TEXT_PATTERNS:
        if any(hint in text for hint in hints) and pattern.search(text):
            return kind
    return None
