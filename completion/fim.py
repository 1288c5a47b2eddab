"""Fill-in-the-middle templates of the code model families.

A template knows its control tokens by *name*; `FimTokens` resolves them to
ids with the model's tokenizer once. Prompts are then assembled from token ids
segment by segment (see `prompt.py`), never by tokenizing one big string, so a
FIM marker written in the user's file stays plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exlsp.completion.models import read_model_config
from exlsp.completion.tokenizer import Tokenizer


@dataclass(frozen=True)
class FimTemplate:
    family: str
    prefix: str
    suffix: str
    middle: str | None  # None: the model continues right after the prefix (Codestral)
    suffix_first: bool = False
    bos: bool = False
    # Extra stop tokens besides the tokenizer's EOS.
    stops: tuple[str, ...] = ()
    # Repository-level tokens: snippets are rendered as other files of the repo.
    repo_name: str | None = None
    file_sep: str | None = None
    # Text put before the prefix segment (CodeLlama's format has a space there).
    prefix_lead: str = ""
    # Architectures (config.json) that suggest this family.
    architectures: tuple[str, ...] = ()


TEMPLATES: dict[str, FimTemplate] = {
    t.family: t
    for t in (
        FimTemplate(
            "qwen2.5-coder",
            "<|fim_prefix|>",
            "<|fim_suffix|>",
            "<|fim_middle|>",
            stops=(
                "<|endoftext|>",
                "<|fim_pad|>",
                "<|file_sep|>",
                "<|repo_name|>",
                "<|im_end|>",
                "<|fim_prefix|>",
                "<|fim_suffix|>",
                "<|fim_middle|>",
            ),
            repo_name="<|repo_name|>",
            file_sep="<|file_sep|>",
            architectures=("Qwen2ForCausalLM", "Qwen3ForCausalLM"),
        ),
        FimTemplate(
            "starcoder2",
            "<fim_prefix>",
            "<fim_suffix>",
            "<fim_middle>",
            stops=(
                "<|endoftext|>",
                "<fim_pad>",
                "<file_sep>",
                "<repo_name>",
                "<fim_prefix>",
                "<fim_suffix>",
                "<fim_middle>",
            ),
            repo_name="<repo_name>",
            file_sep="<file_sep>",
            architectures=("Starcoder2ForCausalLM", "GPTBigCodeForCausalLM"),
        ),
        FimTemplate(
            "deepseek-coder",
            "<｜fim▁begin｜>",
            "<｜fim▁hole｜>",
            "<｜fim▁end｜>",
            bos=True,
            stops=(
                "<｜end▁of▁sentence｜>",
                "<|EOT|>",
                "<｜fim▁begin｜>",
                "<｜fim▁hole｜>",
                "<｜fim▁end｜>",
            ),
            architectures=("LlamaForCausalLM",),
        ),
        FimTemplate(
            "codellama",
            "▁<PRE>",
            "▁<SUF>",
            "▁<MID>",
            bos=True,
            stops=("▁<EOT>", "</s>", "▁<PRE>", "▁<SUF>", "▁<MID>"),
            prefix_lead=" ",
            architectures=("LlamaForCausalLM",),
        ),
        FimTemplate(
            "codestral",
            "[PREFIX]",
            "[SUFFIX]",
            None,
            suffix_first=True,
            bos=True,
            stops=("</s>", "[PREFIX]", "[SUFFIX]", "[MIDDLE]"),
            architectures=("MistralForCausalLM",),
        ),
        FimTemplate(
            "codegemma",
            "<|fim_prefix|>",
            "<|fim_suffix|>",
            "<|fim_middle|>",
            bos=True,
            stops=(
                "<eos>",
                "<|file_separator|>",
                "<|fim_prefix|>",
                "<|fim_suffix|>",
                "<|fim_middle|>",
            ),
            file_sep="<|file_separator|>",
            architectures=("GemmaForCausalLM", "Gemma2ForCausalLM"),
        ),
    )
}


class UnknownFamily(ValueError):
    pass


def _architectures(model_dir: Path | None) -> tuple[str, ...]:
    if model_dir is None:
        return ()
    archs = read_model_config(model_dir).get("architectures")
    return tuple(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ()


def detect_family(tokenizer: Tokenizer, model_dir: Path | None = None) -> str:
    """Pick the template whose control tokens the tokenizer has.

    Several families share markers (Qwen and CodeGemma both use ``<|fim_prefix|>``;
    DeepSeek and CodeLlama are both Llama), so the distinguishing tokens decide
    first and `config.json`'s architectures break remaining ties.
    """
    have = lambda tok: tokenizer.token_to_id(tok) is not None  # noqa: E731
    candidates = [
        t
        for t in TEMPLATES.values()
        if have(t.prefix) and have(t.suffix) and (t.middle is None or have(t.middle))
    ]
    # Distinguishing tokens.
    if have("<|file_separator|>"):
        candidates = [t for t in candidates if t.family == "codegemma"] or candidates
    elif have("<|fim_pad|>") or have("<|repo_name|>"):
        candidates = [t for t in candidates if t.family != "codegemma"] or candidates
    if len(candidates) > 1:
        archs = set(_architectures(model_dir))
        by_arch = [t for t in candidates if archs & set(t.architectures)]
        candidates = by_arch or candidates
    if not candidates:
        raise UnknownFamily(
            "the tokenizer has no known fill-in-the-middle tokens; set model.fimTemplate "
            f"to one of {', '.join(TEMPLATES)}"
        )
    return candidates[0].family


@dataclass(frozen=True)
class FimTokens:
    """A template with its control tokens resolved to ids for one tokenizer."""

    template: FimTemplate
    prefix: int
    suffix: int
    middle: int | None
    bos: int | None
    stop_ids: frozenset[int]
    repo_name: int | None
    file_sep: int | None

    @classmethod
    def resolve(cls, template: FimTemplate, tokenizer: Tokenizer) -> FimTokens:
        def need(tok: str) -> int:
            i = tokenizer.token_to_id(tok)
            if i is None:
                raise UnknownFamily(f"the tokenizer has no {tok!r} token ({template.family})")
            return i

        stops = {i for s in template.stops if (i := tokenizer.token_to_id(s)) is not None}
        stops |= set(tokenizer.eos_ids)
        bos = None
        if template.bos:
            bos = tokenizer.bos_id
            bos_token = getattr(tokenizer, "bos_token", None)
            if bos is None and bos_token:
                bos = tokenizer.token_to_id(bos_token)
        return cls(
            template=template,
            prefix=need(template.prefix),
            suffix=need(template.suffix),
            middle=need(template.middle) if template.middle else None,
            bos=bos,
            stop_ids=frozenset(stops),
            repo_name=tokenizer.token_to_id(template.repo_name) if template.repo_name else None,
            file_sep=tokenizer.token_to_id(template.file_sep) if template.file_sep else None,
        )


def resolve_template(name: str, tokenizer: Tokenizer, model_dir: Path | None = None) -> FimTokens:
    family = detect_family(tokenizer, model_dir) if name in ("", "auto") else name
    if family not in TEMPLATES:
        raise UnknownFamily(f"unknown FIM template {family!r}; one of {', '.join(TEMPLATES)}")
    return FimTokens.resolve(TEMPLATES[family], tokenizer)
