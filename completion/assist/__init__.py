"""Hover explanations and refactor edits from the resident model.

`syntax` (what to explain, tree-sitter), `prompts` (chat template or FIM
docstring prompts, and output parsing), `edits` (the refactors on offer and
minimal, parse-checked edits), `assistant` (runs them as background jobs with
a deadline and a cache) and `service` (`AssistService`: the model behind hover
and code actions, which owns the one `Assistant`).
"""
