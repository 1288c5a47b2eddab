"""`exlsp/stats`: figures of the last completion and the model's state."""

from __future__ import annotations

import dataclasses
from typing import Any

from exlsp.server.lsp import ExlspServer


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def stats_payload(ls: ExlspServer) -> dict[str, Any]:
    service = ls.service
    engine = service.engine if service else None
    last = engine.last_stats if engine else None
    req = engine.last_request if engine else None
    prompt = engine.last_prompt if engine else None
    backend = service.backend if service else None
    return {
        "state": service.state if service else "idle",
        "error": service.error if service else None,
        "model": dataclasses.asdict(backend.info) if backend else None,
        "fimTemplate": engine.fim.template.family if engine else None,
        "last": {_camel(k): v for k, v in dataclasses.asdict(last).items()} if last else None,
        # What serves now (`model.fallback`: a later entry when the first could not).
        "serving": service.serving_label if service else None,
        "servingIndex": service.serving if service else None,
        "failures": list(service.failures) if service else [],
        "assist": ls.assist.stats() if ls.assist is not None else None,
        "index": dataclasses.asdict(ls.index.stats()) if ls.index is not None else None,
        "lastRequest": {"line": req.line, "character": req.character} if req else None,
        "lastPromptSegments": prompt.segment_tokens if prompt else None,
        # What the model was shown, for inspection (bounded by the prompt budgets).
        "lastPromptText": {
            "prefix": prompt.prefix,
            "suffix": prompt.suffix,
            "middle": prompt.middle,
            "full": engine.tokenizer.decode(prompt.ids),
        }
        if engine and prompt
        else None,
    }


def register(server: ExlspServer) -> None:
    @server.feature("exlsp/stats")
    async def stats(ls: ExlspServer, params: Any) -> dict[str, Any]:
        return stats_payload(ls)
