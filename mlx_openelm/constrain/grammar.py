"""What a constraint may say, checked once: a JSON schema, a regular expression or a Lark grammar,
turned into the llguidance grammar text the matcher compiles (cached per distinct constraint).

JSON schemas get bounded whitespace by default (llama.cpp's rule: one space, or one or two
newlines and up to 20 spaces or tabs), so a model that "wants" spaces cannot loop on them. With
`strict`, a keyword llguidance does not implement is an error naming it; otherwise it is ignored
(`lenient`). For SentencePiece vocabularies the JSON may start with one space, so that the
model's usual "▁{" token is allowed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import GrammarError

WHITESPACE_PATTERN = r"(?:\x20|\n{1,2}[\x20\t]{0,20})?"
JSON_OBJECT_SCHEMA = {"type": "object"}
MAX_SOURCE_CHARS = 256 * 1024  # a schema, regex or grammar longer than this is refused before compiling
MAX_SCHEMA_DEPTH = 64  # nesting of objects/arrays in a schema


@dataclass(frozen=True)
class ConstraintSpec:
    """One validated constraint: `kind` is "json_schema", "regex" or "grammar" (Lark); `source`
    is the schema as canonical JSON text, or the regex / grammar text; `strict` for schemas."""

    kind: str
    source: str
    strict: bool = False

    def grammar(self, sentencepiece: bool = False) -> str:
        """The llguidance grammar text (`sentencepiece`: allow one leading space before a JSON value)."""
        return _grammar_text(self, sentencepiece)


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (a hostile schema cannot overflow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_SCHEMA_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def read_json_schema(value: Union[dict, bool, str, os.PathLike]) -> Union[dict, bool]:
    """A JSON schema given as a dict (or bool), as JSON text, or as the path of a JSON file."""
    if isinstance(value, (dict, bool)):
        return value
    where = "json_schema"
    looks_like_json = isinstance(value, str) and value.lstrip().startswith(("{", "[", "true", "false"))
    if isinstance(value, os.PathLike) or (isinstance(value, str) and not looks_like_json):
        path = Path(value)
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise GrammarError(f"json_schema: {path}: cannot read the schema file ({reason}); give a file or "
                               "the schema's JSON text") from None
        where = f"json_schema {path}"
    if not isinstance(value, str):
        raise GrammarError(f"json_schema must be a dict, JSON text or a file path, got {type(value).__name__}")
    if len(value) > MAX_SOURCE_CHARS:
        raise GrammarError(f"{where}: the schema is {len(value)} characters, more than {MAX_SOURCE_CHARS}")
    try:
        schema = json.loads(value)
    except RecursionError:
        raise GrammarError(f"{where}: nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except ValueError as e:
        raise GrammarError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"{where}: a JSON schema is an object (or true/false), got {type(schema).__name__}")
    return schema


def validate_constraint(json_schema=None, regex: Optional[str] = None, grammar=None,
                        strict: bool = False) -> Optional[ConstraintSpec]:
    """The one validator of constraint options: at most one of `json_schema` (dict, JSON text or a
    file path), `regex` (matched against the whole output) and `grammar` (Lark text, or the path of
    a Lark file as a `pathlib.Path`); None when none is given. Raises `GrammarError`, also for what
    does not compile (checked here, without a tokenizer)."""
    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
             if value is not None]
    if len(given) > 1:
        raise GrammarError(f"give one constraint, not {' and '.join(f'`{name}`' for name in given)}")
    if not isinstance(strict, bool):
        raise GrammarError(f"strict must be true or false, got {strict!r}")
    if not given:
        return None
    if json_schema is not None:
        schema = read_json_schema(json_schema)
        if _depth(schema) > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"json_schema: nested deeper than {MAX_SCHEMA_DEPTH} levels")
        source = json.dumps(schema, ensure_ascii=False)  # property order is output order
        if len(source) > MAX_SOURCE_CHARS:
            raise GrammarError(f"json_schema: the schema is {len(source)} characters, more than {MAX_SOURCE_CHARS}")
        return _compiled(ConstraintSpec("json_schema", source, strict))
    kind, text = ("regex", regex) if regex is not None else ("grammar", grammar)
    if kind == "grammar" and isinstance(text, os.PathLike):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise GrammarError(f"grammar: {grammar}: cannot read the grammar file ({reason})") from None
    if not isinstance(text, str) or not text:
        raise GrammarError(f"{kind} must be a non-empty string, got {text!r}")
    if len(text) > MAX_SOURCE_CHARS:
        raise GrammarError(f"{kind}: {len(text)} characters, more than {MAX_SOURCE_CHARS}")
    return _compiled(ConstraintSpec(kind, text, False))


def _compiled(spec: ConstraintSpec) -> ConstraintSpec:
    """`spec`, once llguidance compiles it (without a tokenizer: before any model loads); else a
    `GrammarError` naming the keyword or line."""
    from llguidance import LLMatcher, LLParserLimits

    error = LLMatcher.validate_grammar(spec.grammar(), None, limits=LLParserLimits(verbose_errors=False))
    if error:
        raise GrammarError(f"{spec.kind}: {first_line(error)}")
    return spec


def json_options(strict: bool) -> dict:
    """llguidance's JSON compile options for a schema (the bounded whitespace; `lenient` unless strict)."""
    return {"whitespace_pattern": WHITESPACE_PATTERN, "lenient": not strict}


@lru_cache(maxsize=256)
def _grammar_text(spec: ConstraintSpec, sentencepiece: bool) -> str:
    from llguidance import LLMatcher

    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "grammar":
        return LLMatcher.grammar_from_lark(spec.source)
    schema = json.loads(spec.source)
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    schema = {**schema, "x-guidance": {**schema.get("x-guidance", {}), **json_options(spec.strict)}}
    if sentencepiece:  # "▁{": one leading space, which SentencePiece decoding drops at the start
        return LLMatcher.grammar_from_lark('start: " "? value\nvalue: %json ' + json.dumps(schema))
    return LLMatcher.grammar_from_json_schema(schema)


def first_line(message: str) -> str:
    """llguidance's error on one line, without the parser-state dump or caret lines that may follow it."""
    lines = [line.strip() for line in message.split("<state>")[0].split("<non-verbose/>")[0].splitlines()]
    return " ".join(line for line in lines if line and set(line) != {"^"})
