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
    "credentials*",
    "*credentials.json",
    "application_default_credentials.json",
    "secrets.*",
    "secret.*",
    "service-account*.json",
    "*kubeconfig*",
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

# Directories (lower case) whose whole content is secret, at any depth.
DIR_NAMES: frozenset[str] = frozenset(
    {".ssh", ".aws", ".gnupg", ".docker", ".kube", ".azure", ".password-store"}
)

_NAME = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in FILE_PATTERNS))

# Content: a private key or a credential of a well-known shape, anywhere in the text.
_TEXT_PATTERNS: tuple[tuple[str, str], ...] = (
    ("a private key", r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    ("an AWS access key id", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    (
        "an AWS secret access key",
        r"(?i:aws_?secret_?(?:access_?)?key)\W{0,4}[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])",
    ),
    ("a GitHub token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})"),
    ("a GitLab token", r"\bglpat-[A-Za-z0-9_-]{20,}"),
    ("a Slack token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    ("a Google API key", r"\bAIza[0-9A-Za-z_-]{35}"),
    ("an API secret key", r"\bsk-(?:proj-|ant-[a-z0-9]{2,6}-)?[A-Za-z0-9_-]{32,}"),
    ("a Stripe live key", r"\b[rs]k_live_[0-9A-Za-z]{24,}"),
    ("an npm token", r"\bnpm_[A-Za-z0-9]{36}\b"),
    ("a PyPI token", r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}"),
    ("a Hugging Face token", r"\bhf_[A-Za-z0-9]{34,}\b"),
)
_TEXT = [re.compile(p) for _, p in _TEXT_PATTERNS]
# Text each pattern's match must contain (in the lower-cased text where the first
# is None): ``str.find`` looks for them a hundred times faster than the
# patterns themselves (which start with ``\b``) scan a file that holds none.
_HINTS: tuple[tuple[str, ...], ...] = (
    ("PRIVATE KEY",),
    ("AKIA", "ASIA"),
    ("aws",),  # case-insensitive: looked for in the lower-cased text
    ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ("glpat-",),
    ("xox",),
    ("AIza",),
    ("sk-",),
    ("k_live_",),
    ("npm_",),
    ("pypi-",),
    ("hf_",),
)
_CASELESS = frozenset({2})
assert len(_HINTS) == len(_TEXT_PATTERNS)


def secret_name(path: str | os.PathLike[str]) -> bool:
    """The path (relative or absolute, either separator) names a secret file, or
    lies in a secret directory. Names only: nothing is read or resolved."""
    parts = PurePosixPath(os.fspath(path).replace("\\", "/").lower()).parts
    if not parts:
        return False
    if any(part in DIR_NAMES for part in parts[:-1]):
        return True
    return _NAME.fullmatch(parts[-1]) is not None


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
    """What kind of secret the text holds ("a private key", ...; the first in the
    text when there are several), or None."""
    lower: str | None = None
    first: tuple[int, str] | None = None
    for i, hints in enumerate(_HINTS):
        if i in _CASELESS:
            lower = text.lower() if lower is None else lower
            hinted = any(h in lower for h in hints)
        else:
            hinted = any(h in text for h in hints)
        if not hinted:
            continue
        match = _TEXT[i].search(text)
        if match is not None and (first is None or match.start() < first[0]):
            first = (match.start(), _TEXT_PATTERNS[i][0])
    return first[1] if first is not None else None
