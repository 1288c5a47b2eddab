"""Where the index's chunker finds definitions, per language: the tree-sitter node
types that are definitions (and of what kind), the nodes that wrap or contain them,
the comment nodes, and how a definition node is named."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from exlsp.completion import languages


@dataclass(frozen=True)
class DefinitionNodes:
    """How to find definitions in one language's tree-sitter grammar.

    The language's id, extensions and grammar come from the language table
    (`exlsp.completion.languages`); this is what only the chunker needs.
    """

    name: str  # the language id
    definitions: dict[str, str]  # node type -> kind
    # Nodes that wrap a definition and belong to it (decorators, `export`, `template<>`).
    wrappers: frozenset[str] = frozenset()
    # Class-like definitions whose functions are members ("method" instead of "function").
    containers: frozenset[str] = frozenset()
    comments: frozenset[str] = frozenset({"comment"})


_JS_DEFS = {
    "function_declaration": "function",
    "generator_function_declaration": "function",
    "class_declaration": "class",
    "class": "class",
    "method_definition": "method",
    "lexical_declaration": "function",  # only `const f = () => ...` (see definition_name)
    "variable_declaration": "function",
}
_TS_DEFS = {
    **_JS_DEFS,
    "abstract_class_declaration": "class",
    "interface_declaration": "interface",
    "type_alias_declaration": "type",
    "enum_declaration": "enum",
    "internal_module": "namespace",
    "module": "namespace",
    "function_signature": "function",
}
_C_DEFS = {
    "function_definition": "function",
    "struct_specifier": "struct",
    "union_specifier": "union",
    "enum_specifier": "enum",
    "type_definition": "type",
}

_JS = DefinitionNodes(
    "javascript",
    _JS_DEFS,
    wrappers=frozenset({"export_statement"}),
    containers=frozenset({"class_declaration", "class"}),
)
_TS = DefinitionNodes(
    "typescript",
    _TS_DEFS,
    wrappers=frozenset({"export_statement"}),
    containers=frozenset(
        {"class_declaration", "abstract_class_declaration", "class", "interface_declaration"}
    ),
)

_NODES: tuple[DefinitionNodes, ...] = (
    DefinitionNodes(
        "python",
        {"function_definition": "function", "class_definition": "class"},
        wrappers=frozenset({"decorated_definition"}),
        containers=frozenset({"class_definition"}),
    ),
    _JS,
    replace(_JS, name="javascriptreact"),  # .jsx and .tsx: the same node types
    _TS,
    replace(_TS, name="typescriptreact"),
    DefinitionNodes(
        "go",
        {
            "function_declaration": "function",
            "method_declaration": "method",
            "type_declaration": "type",
        },
    ),
    DefinitionNodes(
        "rust",
        {
            "function_item": "function",
            "function_signature_item": "function",
            "struct_item": "struct",
            "enum_item": "enum",
            "union_item": "union",
            "trait_item": "trait",
            "impl_item": "impl",
            "mod_item": "module",
            "macro_definition": "macro",
            "type_item": "type",
        },
        containers=frozenset({"impl_item", "trait_item"}),
        comments=frozenset({"line_comment", "block_comment"}),
    ),
    DefinitionNodes(
        "java",
        {
            "class_declaration": "class",
            "interface_declaration": "interface",
            "enum_declaration": "enum",
            "record_declaration": "record",
            "annotation_type_declaration": "interface",
            "method_declaration": "method",
            "constructor_declaration": "method",
        },
        containers=frozenset(
            {"class_declaration", "interface_declaration", "enum_declaration", "record_declaration"}
        ),
        comments=frozenset({"line_comment", "block_comment"}),
    ),
    DefinitionNodes(
        "c",
        _C_DEFS,
    ),
    DefinitionNodes(
        "cpp",
        {
            **_C_DEFS,
            "class_specifier": "class",
            "namespace_definition": "namespace",
        },
        wrappers=frozenset({"template_declaration"}),
        containers=frozenset({"class_specifier", "struct_specifier"}),
    ),
)

_BY_NAME: dict[str, DefinitionNodes] = {spec.name: spec for spec in _NODES}


def definition_nodes(language: str) -> DefinitionNodes | None:
    """The definition nodes of a language id; None where the chunker finds none."""
    return _BY_NAME.get(language)


def language_for_path(path: str) -> str:
    """The language id of a path when the chunker finds definitions in it, else ""."""
    lang = languages.language_for_path(path)
    return lang.id if lang is not None and lang.id in _BY_NAME else ""


def _text(node: Any) -> str:
    raw = node.text
    return raw.decode("utf-8", errors="replace") if raw is not None else ""


def _declarator_name(node: Any) -> str:
    """Name of a C/C++ declarator chain: `int *(*f)(int)` -> `f`, `A::b` -> `A::b`."""
    current = node
    for _ in range(16):
        if current is None:
            return ""
        if current.type in {
            "identifier",
            "field_identifier",
            "qualified_identifier",
            "destructor_name",
            "operator_name",
            "type_identifier",
            "primitive_type",
        }:
            return _text(current)
        nxt = current.child_by_field_name("declarator")
        if nxt is None:
            named = [c for c in current.named_children if c.type != "parameter_list"]
            nxt = named[0] if named else None
        current = nxt
    return ""


_FUNCTION_VALUES = frozenset(
    {"arrow_function", "function_expression", "function", "generator_function", "class"}
)


def definition_name(node: Any, spec: DefinitionNodes) -> str | None:
    """The definition's name; None when the node is not a definition after all."""
    t = node.type
    if t in {"lexical_declaration", "variable_declaration"}:
        for child in node.named_children:
            if child.type == "variable_declarator":
                value = child.child_by_field_name("value")
                if value is not None and value.type in _FUNCTION_VALUES:
                    ident = child.child_by_field_name("name")
                    return _text(ident) if ident is not None else ""
        return None
    if t in {"struct_specifier", "union_specifier", "enum_specifier", "class_specifier"}:
        if node.child_by_field_name("body") is None:
            return None  # `struct point p;` uses a type, it does not define one
        ident = node.child_by_field_name("name")
        return _text(ident) if ident is not None else ""
    if t == "function_definition" and spec.name in {"c", "cpp"}:
        return _declarator_name(node.child_by_field_name("declarator"))
    if t == "type_definition":
        decl = node.child_by_field_name("declarator")
        return _declarator_name(decl) if decl is not None else ""
    if t == "type_declaration":
        names = []
        for child in node.named_children:
            ident = child.child_by_field_name("name")
            if ident is not None:
                names.append(_text(ident))
        return ", ".join(names)
    if t == "method_declaration" and spec.name == "go":
        ident = node.child_by_field_name("name")
        receiver = node.child_by_field_name("receiver")
        recv = ""
        if receiver is not None:
            words = _text(receiver).replace("*", " ").strip("() ").split()
            idents = [w for w in words if w.isidentifier()]
            recv = idents[-1] if idents else ""
        base = _text(ident) if ident is not None else ""
        return f"{recv}.{base}" if recv else base
    if t == "impl_item":
        typ = node.child_by_field_name("type")
        trait = node.child_by_field_name("trait")
        name = _text(typ) if typ is not None else ""
        return f"{_text(trait)} for {name}" if trait is not None else name
    ident = node.child_by_field_name("name")
    if ident is not None:
        return _text(ident)
    return ""


def member_prefix(node: Any, name: str) -> str:
    """The prefix of the symbols of a container's members (an impl's type)."""
    if node.type == "impl_item":
        typ = node.child_by_field_name("type")
        return _text(typ) if typ is not None else name
    return name
