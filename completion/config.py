"""Engine settings: plain, fully defaulted dataclasses (camelCase on the wire).

The server composes these into its one configuration tree; the engine and
the backends read them directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# `model.apiKeyEnv` may name only exlsp's own variables: a shared settings file must
# not be able to send, say, $GITHUB_TOKEN to a server of its choosing.
API_KEY_ENV_PREFIX = "EXLSP_"


def api_key_env_allowed(name: str) -> bool:
    return name.startswith(API_KEY_ENV_PREFIX) and name.isidentifier()


@dataclass
class ModelConfig:
    # A Hugging Face / EXL2 model directory. Empty: the built-in default model
    # (built locally on first use).
    path: str = ""
    # "transformers", "exllamav2", "exllamav3", "openai" or "instant" (server-overhead
    # measurement: loads only the tokenizer and generates nothing).
    backend: str = "transformers"
    # "auto", "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "float16", "bfloat16".
    dtype: str = "auto"
    # FIM template family; "auto" detects it from the tokenizer and config.json.
    # One of: qwen2.5-coder, starcoder2, deepseek-coder, codellama, codestral, codegemma.
    fimTemplate: str = "auto"
    # Tokens the backend may keep in its KV cache; 0: the model's own limit.
    contextLength: int = 0
    # exllamav2: KV cache type: "fp16", "q8", "q6" or "q4".
    cacheType: str = "q8"
    # exllamav2: cache length in tokens (a multiple of 256).
    maxSeqLen: int = 8192
    # exllamav2, exllamav3: n-gram speculative decoding.
    ngramDraft: bool = False
    # exllamav3: prompt tokens per prefill pass (a multiple of 256): a cancelled
    # keystroke or a passed deadline stops a long prefill between two passes.
    prefillChunk: int = 1024
    # exllamav3: pinned system RAM (MiB) for cache pages evicted from the GPU; 0: off.
    pageCacheRamMiB: int = 0
    # exllamav3: disk budget (MiB) for cache pages kept across restarts (needs
    # pageCacheRamMiB); 0: off. In `pageCacheDir` ("": <exlsp cache dir>/exl3-pages).
    pageCacheDiskMiB: int = 0
    pageCacheDir: str = ""
    # CPU threads for the transformers backend (0: torch's default, one per core).
    # 1 by default: on a busy 2-core machine torch's default took ~200 ms a token
    # and hit the 2 s deadline, one thread 14-19 ms (README, model.threads).
    threads: int = 1
    # openai: the OpenAI-compatible server's base URL, e.g. "http://gpu-pool:8000/v1".
    # `path` is then optional: the served model's tokenizer directory, for exact
    # token budgets and token-id prompts (without it, budgets are estimated from characters).
    baseUrl: str = ""
    # openai: the model name sent with each request ("": the server's first model).
    remoteModel: str = ""
    # openai: API key. Prefer `apiKeyEnv`: settings files get shared, environments less so.
    apiKey: str = field(default="", repr=False)
    # openai: environment variable read for the API key when `apiKey` is empty
    # (only EXLSP_* names are read).
    apiKeyEnv: str = "EXLSP_API_KEY"
    # openai: "tokens" (token-id prompts: vLLM, llama.cpp, SGLang; needs `path`),
    # "text" (any server, TabbyAPI included) or "auto" (tokens when `path` is set).
    promptFormat: str = "auto"
    # openai: check the server's TLS certificate; `caFile`: a PEM bundle of a private CA.
    verifyTls: bool = True
    caFile: str = ""
    connectTimeoutMs: int = 3000
    # openai: the longest silence allowed while a reply streams.
    readTimeoutMs: int = 10000
    # openai: ask llama.cpp's server to keep the prompt's KV cache (`cache_prompt`).
    cachePrompt: bool = True
    # What serves when this model cannot load or dies (a fatal backend error), tried
    # in order: each entry is a partial `model` tree applied over this one, e.g.
    # [{"backend": "transformers", "device": "cuda"}, {"backend": "openai", "baseUrl":
    # "http://gpu-pool:8000/v1"}, {"backend": "transformers", "path": ""}].
    fallback: list[dict[str, Any]] = field(default_factory=list, repr=False)
    # "auto": the model runs in a model host, one process per user and model
    # configuration that every `exlsp serve` (one per editor) shares; "off": in this
    # process (debugging, single use). The openai backend holds no model and always
    # runs in-process. The environment variable EXLSP_MODEL_HOST (auto/off) overrides it.
    host: str = "auto"
    # The host exits after this many minutes without a connected server.
    hostIdleMinutes: int = 15
    # KV caches the host keeps (least recently used dropped first): each editor
    # uses one for completions and one for hover and code actions.
    hostSlots: int = 4


def fallback_chain(model: ModelConfig) -> list[ModelConfig]:
    """The models to try in order: `model`, then each `fallback` entry applied over it.

    The entries were checked when the settings were read (unknown keys dropped here)."""
    primary = dataclasses.replace(model, fallback=[])
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"fallback"}
    chain = [primary]
    for entry in model.fallback:
        if isinstance(entry, dict):
            chain.append(
                dataclasses.replace(primary, **{k: v for k, v in entry.items() if k in known})
            )
    return chain


@dataclass
class AssistModelConfig:
    """The model behind hover and code actions (explanations and refactors).

    An empty `backend` means the completion model serves them too (nothing more is
    loaded); the other keys then do nothing. Otherwise a second model, as `model`
    describes one: local (its own worker thread in the same process, its memory
    counted in the stats) or a remote OpenAI-compatible server.
    """

    # "" (the completion model), "transformers", "exllamav2", "exllamav3" or "openai".
    backend: str = ""
    # The model directory (openai: the served model's tokenizer, for its chat template).
    # Empty with a local backend: the built-in default model.
    path: str = ""
    device: str = "auto"
    dtype: str = "auto"
    # FIM template for a base model's docstring prompts ("auto": detected).
    fimTemplate: str = "auto"
    contextLength: int = 0
    cacheType: str = "q8"
    maxSeqLen: int = 4096
    threads: int = 0
    baseUrl: str = ""
    remoteModel: str = ""
    apiKey: str = field(default="", repr=False)
    apiKeyEnv: str = "EXLSP_API_KEY"
    promptFormat: str = "auto"
    verifyTls: bool = True
    caFile: str = ""
    connectTimeoutMs: int = 3000
    readTimeoutMs: int = 10000

    @property
    def shared(self) -> bool:
        return not self.backend

    def model_config(self) -> ModelConfig | None:
        """The assist model as a `ModelConfig`; None when the completion model serves."""
        if self.shared:
            return None
        return ModelConfig(**dataclasses.asdict(self))


@dataclass
class CompletionConfig:
    enabled: bool = True
    # Token budgets of the prompt windows (counted with the model's tokenizer).
    prefixTokens: int = 1024
    suffixTokens: int = 256
    # Upper bound on the text left of the cursor on its own line.
    middleTokens: int = 256
    snippetTokens: int = 1024
    maxTokens: int = 128
    # Single-line suggestions stop earlier.
    maxTokensSingleLine: int = 48
    # Wall-clock limit per suggestion; what is ready by then is returned.
    deadlineMs: int = 2000
    # "auto" decides from the cursor's context; "always" / "never" force it.
    multiline: str = "auto"
    # After a request is cancelled, its generation keeps running this long so a
    # newer request that agrees with it can attach instead of starting again.
    attachGraceMs: int = 40
    # Sticky snippets: refresh when the cursor moves this many lines away, or
    # after the editor was idle this long.
    snippetRefreshLines: int = 40
    snippetRefreshIdleMs: int = 1500
    # Reuse the backend's KV cache across requests (off only for baselines).
    kvReuse: bool = True
    # Send partial suggestion text as `exlsp/partialCompletion` notifications.
    streamPartial: bool = True
    # Type-ahead results kept per document.
    typeAheadEntries: int = 64
    # While a suggestion is shown, generate the one after it in the background, as if
    # it were accepted (the next keystroke that needs the model cancels it).
    prefetch: bool = True
    # Count suggestions shown and accepted, per model and language, in a local file
    # (`exlsp stats` prints it); nothing is sent anywhere.
    acceptanceStats: bool = True


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
