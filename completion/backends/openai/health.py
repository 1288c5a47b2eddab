"""The remote backend's settings checks, its errors and its back-off after failures."""

from __future__ import annotations

import logging
import os
import ssl
import time
import urllib.parse
from collections.abc import Callable

from exlsp.completion.backends.base import BackendUnavailable
from exlsp.completion.config import ModelConfig, api_key_env_allowed

log = logging.getLogger(__name__)

_BACKOFF_MIN_S = 1.0
_BACKOFF_MAX_S = 30.0


class RemoteConfigError(ValueError):
    """The remote backend is configured wrongly; the message says what to set."""


def _redact_url(url: str) -> str:
    """The URL without user:password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    return urllib.parse.urlunsplit(parts)


def resolve_api_key(model: ModelConfig) -> str:
    if model.apiKey:
        return model.apiKey
    if not api_key_env_allowed(model.apiKeyEnv):
        return ""
    return os.environ.get(model.apiKeyEnv, "")


class _RemoteError(Exception):
    """One failed request; `message` is shown to the user."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class RemoteHealth:
    """Exponential back-off after failures: one request per period, then none until it ends."""

    def __init__(
        self,
        min_s: float = _BACKOFF_MIN_S,
        max_s: float = _BACKOFF_MAX_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.clock = clock
        self.failures = 0
        self.problem: str | None = None
        self.retry_at = 0.0

    def check(self) -> None:
        """Raise `BackendUnavailable` while backing off."""
        if self.problem is not None and self.clock() < self.retry_at:
            raise BackendUnavailable(self.problem, self.retry_at - self.clock())

    def failed(self, message: str) -> BackendUnavailable:
        delay = min(self.max_s, self.min_s * 2**self.failures)
        self.failures += 1
        if message != self.problem:
            log.warning("%s (retrying in %.0f s)", message, delay)
        else:
            log.debug("%s (retrying in %.0f s)", message, delay)
        self.problem = message
        self.retry_at = self.clock() + delay
        return BackendUnavailable(message, delay)

    def ok(self) -> None:
        if self.problem is not None:
            log.info("the inference server answers again")
        self.failures = 0
        self.problem = None
        self.retry_at = 0.0


def _os_reason(e: BaseException) -> str:
    """The operating system's words for the error under `e` ("Connection refused")."""
    seen = 0
    cause: BaseException | None = e
    while cause is not None and seen < 10:
        errno = getattr(cause, "errno", None)
        if isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError) and errno:
            return os.strerror(errno)
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return ""


def check_base_url(url: str) -> str:
    """`model.baseUrl` without its trailing slash; RemoteConfigError where it is unusable."""
    base = url.strip().rstrip("/")
    if not base:
        raise RemoteConfigError(
            "model.baseUrl is not set: the OpenAI-compatible server's URL, "
            "e.g. http://gpu-pool:8000/v1"
        )
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteConfigError(f"model.baseUrl is not an http(s) URL: {_redact_url(base)}")
    return base
