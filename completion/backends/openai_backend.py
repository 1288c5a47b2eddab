"""A remote OpenAI-compatible completions server as a backend (vLLM, llama.cpp, SGLang, TabbyAPI).

The engine stays the same: it builds the cache-stable prompt as token ids, this
backend sends it to ``POST {baseUrl}/completions`` with ``stream: true`` and
feeds the streamed text back to the engine, which post-processes it as for a
local model. The server owns the KV cache; keeping the prompt layout stable is
what lets its prefix cache (vLLM's automatic prefix caching, llama.cpp's
``cache_prompt``) skip everything before the cursor line.

How the prompt travels (``model.promptFormat``):

- ``tokens`` sends the token ids themselves (``"prompt": [ids]``; vLLM,
  llama.cpp's server and SGLang accept them). This needs the served model's
  tokenizer in ``model.path``; it is the default when that is set, because the
  server then runs exactly the sequence the engine built: token budgets are
  exact, segment boundaries tokenize as they did here, and text in the user's
  file that looks like a control token (``<|fim_prefix|>``) stays plain text.
- ``text`` sends the prompt detokenized (any server; TabbyAPI accepts only
  text). The server re-tokenizes it and reads control-token strings as control
  tokens, so a control-token string written in the user's file is broken with a
  zero-width space first. The BOS token is left to the server, which adds it
  to a text prompt where the model wants one. Without a tokenizer directory
  the token budgets are an estimate: one token per ``CHARS_PER_TOKEN``
  characters, which over-counts code for the usual code-model vocabularies,
  so prompts stay within their budgets.

Either way the layout (snippets, prefix, suffix, then the cursor line after the
middle marker) is the one the local backends get, and the control tokens act as
tokenization barriers, so the server sees the same prefix from one keystroke
to the next.

The streamed text comes back as *piece ids*: negative integers that encode the
text itself, so ``decode`` returns exactly what the server sent whatever the
tokenizer (no table to grow, no re-tokenization).

HTTP runs on a private asyncio loop thread with one `httpx.AsyncClient`
(keep-alive connections). Cancelling a job (a newer keystroke, a filter cut,
the deadline) cancels its request task, which closes the HTTP stream, and the
server stops generating for it. Failures (refused connection, timeout, 4xx/5xx,
a malformed stream) raise `BackendUnavailable` with a message for the user and
start a short exponential back-off during which jobs fail at once without a
request: the editor gets a status, not a storm of errors or requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from exlsp.completion.backends.base import BackendUnavailable, GenerationJob, ModelInfo
from exlsp.completion.config import ModelConfig, api_key_env_allowed
from exlsp.completion.fim import TEMPLATES, FimTemplate
from exlsp.completion.tokenizer import HfTokenizer

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 3
PROMPT_FORMATS = ("auto", "tokens", "text")
_POLL_S = 0.005  # how often a waiting job looks at its cancel flag and deadline
_BACKOFF_MIN_S = 1.0
_BACKOFF_MAX_S = 30.0
_SILENT_LIMIT = 3  # deadlines in a row without a token before the backend backs off
_ZWSP = "\u200b"
# Servers that warn about request fields they do not know (llama.cpp's cache_prompt).
_VLLM_LIKE = ("vllm", "sglang")
_PROBE_TEXT = "def probe(x):\n    return {'k': x * 2}  # ü\n"


class RemoteConfigError(ValueError):
    """The remote backend is configured wrongly; the message says what to set."""


# -- text pieces -------------------------------------------------------------------


def piece_id(text: str) -> int:
    """A negative id that encodes `text` itself (never a real token id)."""
    return -int.from_bytes(b"\x01" + text.encode("utf-8"), "big")


def piece_text(i: int) -> str:
    n = -i
    return n.to_bytes((n.bit_length() + 7) // 8, "big")[1:].decode("utf-8")


class CharEstimateTokenizer:
    """Stands in for the served model's tokenizer when none is configured.

    A token is estimated as `CHARS_PER_TOKEN` characters: `encode` cuts text into
    pieces of that many characters, each a piece id, so counts are estimates
    while `decode` stays exact. The template's control tokens get small ids.
    """

    exact = False

    def __init__(self, template: FimTemplate) -> None:
        names = [template.prefix, template.suffix, *template.stops]
        names += [t for t in (template.middle, template.repo_name, template.file_sep) if t]
        self._ids = {name: i for i, name in enumerate(dict.fromkeys(names))}
        self._names = {i: name for name, i in self._ids.items()}
        self.special_tokens = frozenset(self._ids)
        self.bos_id: int | None = None  # a text prompt gets its BOS from the server
        self.bos_token: str | None = None
        self.eos_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        n = CHARS_PER_TOKEN
        return [piece_id(text[i : i + n]) for i in range(0, len(text), n)]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(piece_text(i) if i < 0 else self._names.get(i, "") for i in ids)

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)


class RemoteTokenizer:
    """The served model's tokenizer (`tokenizer.json`), also decoding piece ids."""

    exact = True

    def __init__(self, inner: HfTokenizer) -> None:
        self._inner = inner
        self.special_tokens = inner.special_tokens
        self.bos_id = inner.bos_id
        self.bos_token = inner.bos_token
        self.eos_ids = inner.eos_ids

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < 0:
                if run:
                    out.append(self._inner.decode(run))
                    run = []
                out.append(piece_text(i))
            else:
                run.append(i)
        if run:
            out.append(self._inner.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        return self._inner.token_to_id(token)


def family_from_model_name(name: str) -> str | None:
    """The FIM family a served model's name suggests (as editor plugins guess it)."""
    n = name.lower().replace("_", "-")
    if "coder" in n and "qwen" in n:
        return "qwen2.5-coder"
    for key, family in (
        ("starcoder2", "starcoder2"),
        ("deepseek-coder", "deepseek-coder"),
        ("codellama", "codellama"),
        ("code-llama", "codellama"),
        ("codestral", "codestral"),
        ("codegemma", "codegemma"),
    ):
        if key in n:
            return family
    return None


# -- settings and errors -------------------------------------------------------------


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


# -- the backend -----------------------------------------------------------------------


class OpenAIBackend:
    """Streams completions from an OpenAI-compatible server. Driven from one worker thread."""

    name = "openai"

    def __init__(self, config: ModelConfig, tokenizer_dir: Path | None = None) -> None:
        import httpx

        self._httpx = httpx
        self.config = config
        base = config.baseUrl.strip().rstrip("/")
        if not base:
            raise RemoteConfigError(
                "model.baseUrl is not set: the OpenAI-compatible server's URL, "
                "e.g. http://gpu-pool:8000/v1"
            )
        parts = urllib.parse.urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteConfigError(f"model.baseUrl is not an http(s) URL: {_redact_url(base)}")
        self.base_url = base
        self.display_url = _redact_url(base)
        fmt = config.promptFormat.lower()
        if fmt not in PROMPT_FORMATS:
            raise RemoteConfigError(
                f"model.promptFormat must be one of {', '.join(PROMPT_FORMATS)} (got {fmt!r})"
            )
        self._api_key = resolve_api_key(config)
        self.health = RemoteHealth()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="exlsp-openai-http", daemon=True
        )
        self._thread.start()
        self._client: Any = None
        self._requests = 0
        # Which server answers, from /models' "owned_by" ("vllm", "llamacpp", ...):
        # each gets only the extra fields it knows ("" = unknown: all of them).
        self.server_kind = ""
        try:
            self._client = self._run(self._make_client(), timeout=10)
            self.model_name, context_length = self._probe_models()
            self.tokenizer: Any
            if tokenizer_dir is not None:
                self.tokenizer = RemoteTokenizer(HfTokenizer(tokenizer_dir))
            else:
                family = self._estimate_family()
                self.tokenizer = CharEstimateTokenizer(TEMPLATES[family])
            self.exact_tokens = bool(self.tokenizer.exact)
            if fmt == "auto":
                fmt = "tokens" if self.exact_tokens else "text"
            if fmt == "tokens" and not self.exact_tokens:
                raise RemoteConfigError(
                    'model.promptFormat "tokens" needs model.path: the directory of the '
                    "served model's tokenizer (tokenizer.json)"
                )
            self.prompt_format = fmt
            self.tokenizer_checked = fmt != "tokens"
            if not self.tokenizer_checked and self.health.problem is None:
                self._check_tokenizer()
        except BaseException:
            self.close()
            raise
        if config.contextLength:
            context_length = config.contextLength
        self.info = ModelInfo(
            # The tokenizer directory where one is configured (config.json breaks
            # template ties), else the served model's name.
            path=str(tokenizer_dir) if tokenizer_dir else (self.model_name or self.display_url),
            backend=self.name,
            context_length=context_length or 4096,
            device=f"remote: {self.display_url}",
            dtype="",
        )
        self._control: dict[int, str] = {}
        for tok in self.tokenizer.special_tokens:
            i = self.tokenizer.token_to_id(tok)
            if i is not None:
                self._control[i] = tok
        specials = sorted(self.tokenizer.special_tokens, key=len, reverse=True)
        self._special_re = (
            re.compile("|".join(re.escape(s) for s in specials)) if specials else None
        )
        self._stop_text: dict[frozenset[int], list[str]] = {}
        self._drop_cache = False
        self._silent = 0
        log.info(
            "openai backend: %s, model %s, %s prompts, %s token counts",
            self.display_url,
            self.model_name or "(server default)",
            self.prompt_format,
            "exact" if self.exact_tokens else f"estimated ({CHARS_PER_TOKEN} chars per token)",
        )

    # -- the loop thread ------------------------------------------------------------

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _make_client(self) -> Any:
        httpx = self._httpx
        cfg = self.config
        verify: ssl.SSLContext | bool = True
        if not cfg.verifyTls:
            log.warning("model.verifyTls is off: the server's certificate is not checked")
            verify = False
        elif cfg.caFile:
            ca = Path(cfg.caFile).expanduser()
            if not ca.is_file():
                raise RemoteConfigError(f"model.caFile not found: {ca}")
            verify = ssl.create_default_context(cafile=str(ca))
        headers = {"Accept": "text/event-stream, application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        timeout = httpx.Timeout(
            connect=cfg.connectTimeoutMs / 1000,
            read=cfg.readTimeoutMs / 1000,
            write=cfg.readTimeoutMs / 1000,
            pool=cfg.connectTimeoutMs / 1000,
        )
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=4)
        return httpx.AsyncClient(headers=headers, timeout=timeout, verify=verify, limits=limits)

    # -- errors --------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._api_key and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return " ".join(text.split())[:300]

    def _describe(self, e: BaseException, what: str) -> _RemoteError:
        """A message for the user: what failed, where, and what to check."""
        httpx = self._httpx
        where = f"the inference server at {self.display_url}"
        if isinstance(e, _RemoteError):
            return e
        if isinstance(e, httpx.ConnectTimeout | httpx.PoolTimeout):
            return _RemoteError(
                f"{where} did not accept a connection within {self.config.connectTimeoutMs} ms"
            )
        if isinstance(e, httpx.ReadTimeout | httpx.WriteTimeout):
            return _RemoteError(f"{where} sent nothing for {self.config.readTimeoutMs} ms ({what})")
        if isinstance(e, httpx.ConnectError):
            reason = self._scrub(str(e)) or type(e).__name__
            if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate" in reason.lower():
                return _RemoteError(
                    f"{where}: its TLS certificate is not trusted ({reason}); set model.caFile "
                    "to its CA bundle"
                )
            return _RemoteError(f"cannot connect to {where}: {_os_reason(e) or reason}")
        if isinstance(e, httpx.RemoteProtocolError | httpx.ReadError):
            return _RemoteError(f"{where} broke the connection ({what}): {self._scrub(str(e))}")
        if isinstance(e, ValueError):
            return _RemoteError(f"{where} sent a malformed reply ({what}): {self._scrub(str(e))}")
        return _RemoteError(f"{where}: {type(e).__name__}: {self._scrub(str(e))} ({what})")

    def _status_error(self, status: int, body: bytes, what: str) -> _RemoteError:
        detail = ""
        try:
            data = json.loads(body)
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict):
                detail = str(err.get("message") or err)
            elif err:
                detail = str(err)
            elif isinstance(data, dict) and data.get("detail"):
                detail = str(data["detail"])
        except ValueError:
            detail = body.decode("utf-8", "replace")
        detail = self._scrub(detail)
        where = f"the inference server at {self.display_url}"
        if status in (401, 403):
            hint = (
                f"set {self.config.apiKeyEnv or 'model.apiKey'}"
                if not self._api_key
                else "check the API key"
            )
            msg = f"{where} refused the request (HTTP {status}, {what}): {hint}"
        elif status == 404:
            msg = (
                f"{where} has no {what} endpoint or model (HTTP 404); model.baseUrl usually "
                "ends with /v1"
            )
        elif status == 429:
            msg = f"{where} is overloaded (HTTP 429)"
        elif status >= 500:
            msg = f"{where} failed (HTTP {status}, {what})"
        else:
            msg = f"{where} rejected the request (HTTP {status}, {what})"
        if detail:
            msg += f": {detail}"
        return _RemoteError(msg, status)

    # -- load-time checks ------------------------------------------------------------------

    async def _get_json(self, url: str, what: str) -> Any:
        try:
            resp = await self._client.get(url)
        except Exception as e:
            raise self._describe(e, what) from e
        if resp.status_code >= 400:
            raise self._status_error(resp.status_code, resp.content, what)
        try:
            return resp.json()
        except ValueError as e:
            raise self._describe(e, what) from e

    def _probe_models(self) -> tuple[str | None, int]:
        """The model to request and its context length, from ``GET /models``.

        An unreachable server is not a load failure (it may come up later): the
        backend starts backing off and reports it. A refused key or a model the
        server does not serve is a configuration error.
        """
        wanted = self.config.remoteModel or None
        try:
            data = self._run(self._get_json(f"{self.base_url}/models", "/models"), timeout=30)
        except _RemoteError as e:
            if e.status is not None and 400 <= e.status < 500 and e.status not in (404, 408, 429):
                raise RemoteConfigError(e.message) from None
            if e.status == 404:
                log.info("%s has no /models endpoint; sending model %r", self.display_url, wanted)
                return wanted, 0
            self.health.failed(e.message)
            return wanted, 0
        models = data.get("data") if isinstance(data, dict) else None
        entries = [m for m in models or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        ids = [m["id"] for m in entries]
        if wanted is not None and ids and wanted not in ids:
            raise RemoteConfigError(
                f"{self.display_url} does not serve model {wanted!r}; it serves: {', '.join(ids)}"
            )
        name = wanted or (ids[0] if ids else None)
        context = 0
        for m in entries:
            if m["id"] == name:
                self.server_kind = str(m.get("owned_by") or "").lower()
                meta = m["meta"] if isinstance(m.get("meta"), dict) else {}
                for value in (m.get("max_model_len"), meta.get("n_ctx_train")):
                    if isinstance(value, int) and value > 0:
                        context = value
                        break
        return name, context

    def _estimate_family(self) -> str:
        family = self.config.fimTemplate.lower()
        if family in ("", "auto"):
            guessed = family_from_model_name(self.model_name or "")
            if guessed is None:
                raise RemoteConfigError(
                    "cannot tell the model's fill-in-the-middle format without its tokenizer: "
                    "set model.fimTemplate (one of "
                    + ", ".join(TEMPLATES)
                    + ") or model.path (the served model's tokenizer directory)"
                )
            return guessed
        if family not in TEMPLATES:
            raise RemoteConfigError(
                f"unknown FIM template {family!r}; one of {', '.join(TEMPLATES)}"
            )
        return family

    def _check_tokenizer(self) -> None:
        """Token-id prompts need the server's vocabulary: compare one tokenization.

        llama.cpp and vLLM expose ``POST /tokenize`` next to ``/v1``; a server
        without it is trusted as configured.
        """
        root = self.base_url.removesuffix("/v1")
        body = {
            "content": _PROBE_TEXT,
            "add_special": False,
            "prompt": _PROBE_TEXT,
            "add_special_tokens": False,
        }
        if self.model_name:
            body["model"] = self.model_name

        async def post() -> tuple[str, Any]:
            try:
                resp = await self._client.post(f"{root}/tokenize", json=body)
            except Exception:
                return "down", None
            if resp.status_code != 200:
                return "absent", None
            try:
                return "ok", resp.json()
            except ValueError:
                return "absent", None

        outcome, data = self._run(post(), timeout=30)
        if outcome == "down":
            return  # checked on the first request that reaches the server
        self.tokenizer_checked = True
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            log.info("%s: no /tokenize to compare tokenizers with; trusting model.path", root)
            return
        ours = self.tokenizer.encode(_PROBE_TEXT)
        if tokens != ours:
            raise RemoteConfigError(
                "model.path's tokenizer does not match the served model's (a probe text gives "
                f"{len(ours)} tokens here and {len(tokens)} on the server); point model.path at "
                'the served model\'s tokenizer, or set model.promptFormat to "text"'
            )

    # -- prompts -----------------------------------------------------------------------------

    def _neutralize(self, text: str) -> str:
        if self._special_re is None:
            return text
        return self._special_re.sub(lambda m: m.group(0)[0] + _ZWSP + m.group(0)[1:], text)

    def render_text(self, ids: Sequence[int]) -> str:
        """The prompt as text: control tokens as their strings, user text neutralized."""
        tok = self.tokenizer
        if ids and tok.bos_id is not None and ids[0] == tok.bos_id:
            ids = ids[1:]  # the server adds BOS to a text prompt where the model wants one
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            name = self._control.get(i)
            if name is None:
                run.append(i)
                continue
            if run:
                out.append(self._neutralize(tok.decode(run)))
                run = []
            out.append(name)
        if run:
            out.append(self._neutralize(tok.decode(run)))
        return "".join(out)

    def _stops(self, stop_ids: frozenset[int]) -> list[str]:
        texts = self._stop_text.get(stop_ids)
        if texts is None:
            texts = sorted({t for i in stop_ids if (t := self._control.get(i))})
            self._stop_text[stop_ids] = texts
        return texts

    def request_body(self, job: GenerationJob) -> dict[str, Any]:
        prompt: str | list[int]
        if self.prompt_format == "tokens":
            prompt = list(job.prompt)
        else:
            prompt = self.render_text(job.prompt)
        stops = self._stops(job.stop_ids)
        reuse = self.config.cachePrompt and job.reuse_cache and not self._drop_cache
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": job.max_tokens,
            "temperature": 0.0,
            "stream": True,
            # Usage in every chunk (vLLM): the engine often stops reading early.
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "n": 1,
        }
        kind = self.server_kind
        if kind not in _VLLM_LIKE:
            # llama.cpp: keep the KV cache of the common prefix between requests, and
            # report it (timings.cache_n) with every token, not only at the end.
            body["cache_prompt"] = bool(reuse)
            body["timings_per_token"] = True
        if kind != "llamacpp":
            # vLLM: keep control tokens in the text so that the stop strings see them.
            body["skip_special_tokens"] = False
            if self.prompt_format == "tokens" and job.stop_ids:
                body["stop_token_ids"] = sorted(job.stop_ids)
        if stops:
            body["stop"] = stops
        if self.model_name:
            body["model"] = self.model_name
        return body

    # -- streaming -----------------------------------------------------------------------------

    async def _post_stream(self, body: dict[str, Any], out: queue.Queue[tuple[str, Any]]) -> None:
        """POST the request and put each SSE data object on `out`; then ("end", saw [DONE])."""
        url = f"{self.base_url}/completions"
        done = False
        try:
            async with self._client.stream("POST", url, json=body) as resp:
                if resp.status_code >= 400:
                    raise self._status_error(resp.status_code, await resp.aread(), "/completions")
                async for line in resp.aiter_lines():
                    if not line or line.startswith(":"):
                        continue
                    if line.startswith("error:"):
                        raise _RemoteError(
                            f"the inference server at {self.display_url} reported an error: "
                            + self._scrub(line[6:])
                        )
                    if not line.startswith("data:"):
                        continue  # event:, id:, retry:
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        obj = None
                    if not isinstance(obj, dict):
                        raise self._describe(
                            ValueError(f"not a JSON object: {data[:80]!r}"), "stream"
                        )
                    out.put(("data", obj))
            out.put(("end", done))
        except asyncio.CancelledError:
            raise  # the job was cancelled: leaving the context closed the stream
        except BaseException as e:
            out.put(("error", self._describe(e, "streaming")))

    def start(self, job: GenerationJob) -> _RemoteRun:
        try:
            self.health.check()
            if not self.tokenizer_checked:
                self._check_tokenizer()  # the server was down when the backend loaded
        except RemoteConfigError as e:
            raise self.health.failed(str(e)) from None
        body = self.request_body(job)
        self._drop_cache = False
        return _RemoteRun(self, job, body)

    def _silent_deadline(self) -> None:
        """A deadline passed before the first token. Several in a row: back off.

        A server that accepts requests but never answers in time would otherwise
        take a request per keystroke and show nothing.
        """
        self._silent += 1
        if self._silent >= _SILENT_LIMIT:
            self._silent = 0
            self.health.failed(
                f"the inference server at {self.display_url} gave no token before the "
                f"deadline {_SILENT_LIMIT} times in a row"
            )

    def reset_cache(self) -> None:
        # The cache is the server's: ask it not to reuse it for the next request.
        self._drop_cache = True

    @property
    def requests_sent(self) -> int:
        return self._requests

    def close(self) -> None:
        loop = self._loop
        if loop.is_closed():
            return
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._run(self._client.aclose(), timeout=5)
            self._client = None
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            loop.close()


class _RemoteRun:
    """One streamed request: each step is the next text piece (a piece id) from the server.

    Stop strings are applied here on the text (the server applies them too, but a
    piece may end inside one), and the server's own figures (reused tokens,
    timings) replace the estimates when the run closes.
    """

    def __init__(self, backend: OpenAIBackend, job: GenerationJob, body: dict[str, Any]) -> None:
        self._b = backend
        self._job = job
        self.prompt_tokens = len(job.prompt)
        self.reused_tokens = 0
        self.prefilled_tokens = len(job.prompt)
        self.max_tokens = job.max_tokens
        self.end_reason = ""
        self._stops: list[str] = body.get("stop", [])
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self._items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._held = ""  # text that may be the start of a stop string
        self._pieces = 0
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._timings: dict[str, Any] | None = None
        self._first = True
        self._ended = False
        backend._requests += 1
        self._fut: Future[None] = asyncio.run_coroutine_threadsafe(
            backend._post_stream(body, self._items), backend._loop
        )

    def prefill(self) -> list[int] | None:
        return self.step()

    def step(self) -> list[int] | None:
        b = self._b
        while not self._ended:
            reason = self._job.should_stop()
            if reason:
                if reason == "deadline" and self._first:
                    b._silent_deadline()
                return None
            try:
                kind, value = self._items.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if kind == "error":
                raise b.health.failed(value.message)
            if kind == "end":
                return self._end(complete=bool(value))
            piece = self._piece(value)
            if piece:
                self._first = False
                self._pieces += 1
                return [piece_id(piece)]
        return []

    def _piece(self, value: dict[str, Any]) -> str:
        """The text of one SSE object that is safe to show (no part of a stop string)."""
        b = self._b
        if isinstance(value.get("error"), dict | str):
            err = value["error"]
            detail = err.get("message", err) if isinstance(err, dict) else err
            raise b.health.failed(
                f"the inference server at {b.display_url} reported an error: "
                + b._scrub(str(detail))
            )
        if isinstance(value.get("usage"), dict):
            self._usage = value["usage"]
        if isinstance(value.get("timings"), dict):
            self._timings = value["timings"]
        choices = value.get("choices")
        if not isinstance(choices, list) or not choices:
            return ""
        choice = choices[0] if isinstance(choices[0], dict) else {}
        text = choice.get("text")
        if isinstance(choice.get("finish_reason"), str):
            self._finish = choice["finish_reason"]
        if not isinstance(text, str) or not text:
            return ""
        self._held += text
        cut = _first_stop(self._held, self._stops)
        if cut is not None:
            emit, self._held = self._held[:cut], ""
            self._finish = "stop"
            self._finished()
            return emit
        keep = _stop_prefix_len(self._held, self._stops, self._longest_stop)
        emit, self._held = (
            self._held[: len(self._held) - keep],
            self._held[len(self._held) - keep :],
        )
        return emit

    def _end(self, complete: bool) -> list[int]:
        if self._finish is None and not complete:
            raise self._b.health.failed(
                f"the inference server at {self._b.display_url} ended the stream before the "
                "completion finished"
            )
        self._finished()
        held, self._held = self._held, ""
        if held:
            self._pieces += 1
            return [piece_id(held)]
        return []

    def _finished(self) -> None:
        self._ended = True
        self._b.health.ok()
        self._b._silent = 0
        self.end_reason = "max_tokens" if self._finish == "length" else "eos"
        if self._finish is None and self._pieces >= self._job.max_tokens:
            self.end_reason = "max_tokens"

    def failed(self, error: BaseException) -> BaseException | None:
        return None

    def close(self) -> dict[str, Any]:
        if not self._fut.done():
            self._fut.cancel()  # closes the HTTP stream: the server stops generating
        return server_figures(self._usage, self._timings, self.prompt_tokens)


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


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stops: Sequence[str], longest: int) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    for n in range(min(len(text), longest - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


def server_figures(
    usage: dict[str, Any] | None, timings: dict[str, Any] | None, sent: int
) -> dict[str, Any]:
    """The job's figures from what the server reported, where it did.

    The KV cache is the server's: reused tokens are known only when it says so
    (OpenAI-style ``usage.prompt_tokens_details.cached_tokens``, which vLLM sends
    with ``--enable-prompt-tokens-details`` and llama.cpp always; llama.cpp's
    ``timings.cache_n``). Otherwise `reuse_known` is False.
    """
    out: dict[str, Any] = {"reuse_known": False}
    prompt = sent
    cached: int | None = None
    if usage:
        if isinstance(usage.get("prompt_tokens"), int):
            prompt = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            out["generated_tokens"] = usage["completion_tokens"]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            cached = details["cached_tokens"]
    if timings:
        if isinstance(timings.get("cache_n"), int):
            cached = timings["cache_n"]
            if isinstance(timings.get("prompt_n"), int):
                # llama.cpp: the prompt was cache_n reused tokens plus prompt_n new ones.
                prompt = cached + timings["prompt_n"]
        if isinstance(timings.get("prompt_ms"), int | float):
            out["prefill_ms"] = float(timings["prompt_ms"])
        if isinstance(timings.get("predicted_ms"), int | float):
            out["decode_ms"] = float(timings["predicted_ms"])
    out["prompt_tokens"] = prompt
    if cached is not None:
        out["reuse_known"] = True
        out["reused_tokens"] = cached
        out["prefilled_tokens"] = max(0, prompt - cached)
    return out


def load_openai_backend(config: ModelConfig) -> OpenAIBackend:
    tokenizer_dir: Path | None = None
    if config.path:
        tokenizer_dir = Path(config.path).expanduser()
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise RemoteConfigError(
                f"model.path has no tokenizer.json: {tokenizer_dir} (for the openai backend it "
                "is the served model's tokenizer directory; leave it empty to estimate tokens)"
            )
    return OpenAIBackend(config, tokenizer_dir)


def estimate_note(exact: bool) -> str:
    return (
        "exact (the served model's tokenizer)"
        if exact
        else (f"estimated: {CHARS_PER_TOKEN} characters per token (no tokenizer in model.path)")
    )
