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

The package: `tokens` (piece ids and the tokenizers), `health` (settings checks,
errors, back-off), `wire` (HTTP, the SSE stream, the request body, stop strings,
the server's figures), `backend` (`OpenAIBackend` and its Run).
"""

from exlsp.completion.backends.openai.backend import (
    PROMPT_FORMATS,
    OpenAIBackend,
    estimate_note,
    load_openai_backend,
)
from exlsp.completion.backends.openai.health import (
    RemoteConfigError,
    RemoteHealth,
    resolve_api_key,
)
from exlsp.completion.backends.openai.tokens import (
    CHARS_PER_TOKEN,
    CharEstimateTokenizer,
    RemoteTokenizer,
    family_from_model_name,
    piece_id,
    piece_text,
)
from exlsp.completion.backends.openai.wire import server_figures

__all__ = [
    "CHARS_PER_TOKEN",
    "PROMPT_FORMATS",
    "CharEstimateTokenizer",
    "OpenAIBackend",
    "RemoteConfigError",
    "RemoteHealth",
    "RemoteTokenizer",
    "estimate_note",
    "family_from_model_name",
    "load_openai_backend",
    "piece_id",
    "piece_text",
    "resolve_api_key",
    "server_figures",
]
