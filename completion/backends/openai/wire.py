"""The wire: HTTP to the server on a private asyncio loop, the SSE stream of a
completion, the request body, stop strings in streamed text, and the server's
own figures (reused tokens, timings)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import ssl
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from exlsp.completion.backends.base import GenerationJob
from exlsp.completion.backends.openai.health import RemoteConfigError, _os_reason, _RemoteError
from exlsp.completion.config import ModelConfig

log = logging.getLogger(__name__)

# Servers that warn about request fields they do not know (llama.cpp's cache_prompt).
_VLLM_LIKE = ("vllm", "sglang")


class RemoteHttp:
    """One `httpx.AsyncClient` (keep-alive connections) on a private loop thread, and
    failures put in words for the user (what failed, where, what to check)."""

    def __init__(self, config: ModelConfig, base_url: str, display_url: str, api_key: str) -> None:
        import httpx

        self._httpx = httpx
        self.config = config
        self.base_url = base_url
        self.display_url = display_url
        self._api_key = api_key
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="exlsp-openai-http", daemon=True
        )
        self._thread.start()
        self.client: Any = None

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run `coro` on the loop thread and wait for its result."""
        return self.submit(coro).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def open(self) -> None:
        self.client = self.run(self._make_client(), timeout=10)

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

    def scrub(self, text: str) -> str:
        if self._api_key and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return " ".join(text.split())[:300]

    def describe(self, e: BaseException, what: str) -> _RemoteError:
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
            reason = self.scrub(str(e)) or type(e).__name__
            if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate" in reason.lower():
                return _RemoteError(
                    f"{where}: its TLS certificate is not trusted ({reason}); set model.caFile "
                    "to its CA bundle"
                )
            return _RemoteError(f"cannot connect to {where}: {_os_reason(e) or reason}")
        if isinstance(e, httpx.RemoteProtocolError | httpx.ReadError):
            return _RemoteError(f"{where} broke the connection ({what}): {self.scrub(str(e))}")
        if isinstance(e, ValueError):
            return _RemoteError(f"{where} sent a malformed reply ({what}): {self.scrub(str(e))}")
        return _RemoteError(f"{where}: {type(e).__name__}: {self.scrub(str(e))} ({what})")

    def status_error(self, status: int, body: bytes, what: str) -> _RemoteError:
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
        detail = self.scrub(detail)
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

    async def get_json(self, url: str, what: str) -> Any:
        try:
            resp = await self.client.get(url)
        except Exception as e:
            raise self.describe(e, what) from e
        if resp.status_code >= 400:
            raise self.status_error(resp.status_code, resp.content, what)
        try:
            return resp.json()
        except ValueError as e:
            raise self.describe(e, what) from e

    async def post_stream(self, body: dict[str, Any], out: queue.Queue[tuple[str, Any]]) -> None:
        """POST the request and put each SSE data object on `out`; then ("end", saw [DONE])."""
        url = f"{self.base_url}/completions"
        done = False
        try:
            async with self.client.stream("POST", url, json=body) as resp:
                if resp.status_code >= 400:
                    raise self.status_error(resp.status_code, await resp.aread(), "/completions")
                async for line in resp.aiter_lines():
                    if not line or line.startswith(":"):
                        continue
                    if line.startswith("error:"):
                        raise _RemoteError(
                            f"the inference server at {self.display_url} reported an error: "
                            + self.scrub(line[6:])
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
                        raise self.describe(
                            ValueError(f"not a JSON object: {data[:80]!r}"), "stream"
                        )
                    out.put(("data", obj))
            out.put(("end", done))
        except asyncio.CancelledError:
            raise  # the job was cancelled: leaving the context closed the stream
        except BaseException as e:
            out.put(("error", self.describe(e, "streaming")))

    def close(self) -> None:
        loop = self._loop
        if loop.is_closed():
            return
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.run(self.client.aclose(), timeout=5)
            self.client = None
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            loop.close()


def completion_body(
    job: GenerationJob,
    prompt: str | list[int],
    stops: list[str],
    *,
    reuse: bool,
    server_kind: str,
    model_name: str | None,
) -> dict[str, Any]:
    """The streamed `/completions` request of `job`, with the fields `server_kind`
    ("vllm", "llamacpp", ...; "" = unknown: all of them) knows."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": job.max_tokens,
        "temperature": 0.0,
        "stream": True,
        # Usage in every chunk (vLLM): the engine often stops reading early.
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "n": 1,
    }
    if server_kind not in _VLLM_LIKE:
        # llama.cpp: keep the KV cache of the common prefix between requests, and
        # report it (timings.cache_n) with every token, not only at the end.
        body["cache_prompt"] = bool(reuse)
        body["timings_per_token"] = True
    if server_kind != "llamacpp":
        # vLLM: keep control tokens in the text so that the stop strings see them.
        body["skip_special_tokens"] = False
        if isinstance(prompt, list) and job.stop_ids:
            body["stop_token_ids"] = sorted(job.stop_ids)
    if stops:
        body["stop"] = stops
    if model_name:
        body["model"] = model_name
    return body


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
