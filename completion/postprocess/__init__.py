"""Post-processing: raw model output at the cursor -> the suggestion shown as ghost text.

`scanner` knows just enough syntax to find brackets that are code; `context`
holds what the filters know about the cursor; one module per filter; `pipeline`
runs them, while streaming and at the end (see its docstring).
"""

from exlsp.completion.postprocess.context import FilterContext, decide_multiline
from exlsp.completion.postprocess.drop_only_closers import drop_only_closers
from exlsp.completion.postprocess.pipeline import FILTERS, FINAL_ONLY, Processed, postprocess
from exlsp.completion.postprocess.repetition import repetition
from exlsp.completion.postprocess.scope_end import scope_end
from exlsp.completion.postprocess.single_line import single_line
from exlsp.completion.postprocess.suffix_overlap import suffix_overlap
from exlsp.completion.postprocess.trim_trailing_whitespace import trim_trailing_whitespace
from exlsp.completion.postprocess.unmatched_bracket import unmatched_bracket

__all__ = [
    "FILTERS",
    "FINAL_ONLY",
    "FilterContext",
    "Processed",
    "decide_multiline",
    "drop_only_closers",
    "postprocess",
    "repetition",
    "scope_end",
    "single_line",
    "suffix_overlap",
    "trim_trailing_whitespace",
    "unmatched_bracket",
]
