"""The remote backend: an OpenAI-compatible completions server behind the decode loop
(the package's docstring says how prompts and replies travel)."""

from __future__ import annotations

import logging
import queue
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from exlsp.completion.backends.base import GenerationJob, ModelInfo
from exlsp.completion.backends.openai.health import (
    RemoteConfigError,
    RemoteHealth,
    _redact_url,
    _RemoteError,
    check_base_url,
    resolve_api_key,
)
from exlsp.completion.backends.openai.tokens import (
    CHARS_PER_TOKEN,
    CharEstimateTokenizer,
    PromptText,
    RemoteTokenizer,
    family_from_model_name,
    piece_id,
)
from exlsp.completion.backends.openai.wire import (
    RemoteHttp,
    _first_stop,
    _stop_prefix_len,
    completion_body,
    server_figures,
)
from exlsp.completion.config import ModelConfig
from exlsp.completion.fim import TEMPLATES
from exlsp.completion.tokenizer import HfTokenizer

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("auto", "tokens", "text")
_POLL_S = 0.005  # how often a waiting job looks at its cancel flag and deadline
_SILENT_LIMIT = 3  # deadlines in a row without a token before the backend backs off
_PROBE_TEXT = "def probe(x):\n    return {'k': x * 2}  # ü\n"


class OpenAIBackend:
    """Streams completions from an OpenAI-compatible server. Driven from one worker thread."""

    name = "openai"

    def __init__(self, config: ModelConfig, tokenizer_dir: Path | None = None) -> None:
        self.config = config
        self.base_url = check_base_url(config.baseUrl)
        self.display_url = _redact_url(self.base_url)
        fmt = config.promptFormat.lower()
        if fmt not in PROMPT_FORMATS:
            raise RemoteConfigError(
                f"model.promptFormat must be one of {', '.join(PROMPT_FORMATS)} (got {fmt!r})"
            )
        self.health = RemoteHealth()
        self._http = RemoteHttp(config, self.base_url, self.display_url, resolve_api_key(config))
        # Which server answers, from /models' "owned_by" ("vllm", "llamacpp", ...):
        # each gets only the extra fields it knows ("" = unknown: all of them).
        self.server_kind = ""
        try:
            self._http.open()
            self.model_name, context_length = self._probe_models()
            self.tokenizer: Any = (
                RemoteTokenizer(HfTokenizer(tokenizer_dir))
                if tokenizer_dir is not None
                else CharEstimateTokenizer(TEMPLATES[self._estimate_family()])
            )
            self.exact_tokens = bool(self.tokenizer.exact)
            self.prompt_format = self._prompt_format(fmt)
            self.tokenizer_checked = self.prompt_format != "tokens"
            if not self.tokenizer_checked and self.health.problem is None:
                self._check_tokenizer()
        except BaseException:
            self.close()
            raise
        self.info = ModelInfo(
            # The tokenizer directory where one is configured (config.json breaks
            # template ties), else the served model's name.
            path=str(tokenizer_dir) if tokenizer_dir else (self.model_name or self.display_url),
            backend=self.name,
            context_length=config.contextLength or context_length or 4096,
            device=f"remote: {self.display_url}",
            dtype="",
        )
        self._text = PromptText(self.tokenizer)
        self._drop_cache = False
        self._silent = 0
        log.info(
            "openai backend: %s, model %s, %s prompts, %s token counts",
            self.display_url,
            self.model_name or "(server default)",
            self.prompt_format,
            "exact" if self.exact_tokens else f"estimated ({CHARS_PER_TOKEN} chars per token)",
        )

    def _prompt_format(self, fmt: str) -> str:
        if fmt == "auto":
            return "tokens" if self.exact_tokens else "text"
        if fmt == "tokens" and not self.exact_tokens:
            raise RemoteConfigError(
                'model.promptFormat "tokens" needs model.path: the directory of the '
                "served model's tokenizer (tokenizer.json)"
            )
        return fmt

    # -- load-time checks ------------------------------------------------------------------

    def _probe_models(self) -> tuple[str | None, int]:
        """The model to request and its context length, from ``GET /models``.

        An unreachable server is not a load failure (it may come up later): the
        backend starts backing off and reports it. A refused key or a model the
        server does not serve is a configuration error.
        """
        wanted = self.config.remoteModel or None
        try:
            data = self._http.run(
                self._http.get_json(f"{self.base_url}/models", "/models"), timeout=30
            )
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
                resp = await self._http.client.post(f"{root}/tokenize", json=body)
            except Exception:
                return "down", None
            if resp.status_code != 200:
                return "absent", None
            try:
                return "ok", resp.json()
            except ValueError:
                return "absent", None

        outcome, data = self._http.run(post(), timeout=30)
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

    def render_text(self, ids: Sequence[int]) -> str:
        """The prompt as text (see `PromptText.render`)."""
        return self._text.render(ids)

    def request_body(self, job: GenerationJob) -> dict[str, Any]:
        prompt: str | list[int]
        if self.prompt_format == "tokens":
            prompt = list(job.prompt)
        else:
            prompt = self.render_text(job.prompt)
        return completion_body(
            job,
            prompt,
            self._text.stops(job.stop_ids),
            reuse=self.config.cachePrompt and job.reuse_cache and not self._drop_cache,
            server_kind=self.server_kind,
            model_name=self.model_name,
        )

    # -- generation -----------------------------------------------------------------------------

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

    def close(self) -> None:
        self._http.close()


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
        self._fut: Future[None] = backend._http.submit(backend._http.post_stream(body, self._items))

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
                + b._http.scrub(str(detail))
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
