"""Constrained decoding with llguidance: JSON schemas, regular expressions and Lark grammars as
logits processors (`make_constraint`), OpenAI's response_format (`formats`) and tool calling for
models without a tool template (`tools`, `tool_output`). `vocabulary.py` gives the matcher its
tokenizer, `grammar.py` checks and compiles what a constraint says, `processor.py` applies it token
by token. Loaded lazily: importing the package (or `grammar`, `formats`, `tools`) loads neither MLX
nor llguidance."""

from importlib import import_module
from typing import Any

_API = {
    "ConstraintError": "processor",
    "GrammarProcessor": "processor",
    "make_constraint": "processor",
    "ConstraintSpec": "grammar",
    "validate_constraint": "grammar",
    "response_format_constraint": "formats",
    "plan_tools": "tools",
    "rewrite_messages": "tools",
    "ToolPlan": "tools",
    "ToolOutputParser": "tool_output",
    "parse_tool_output": "tool_output",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'mlx_openelm.constrain' has no attribute {name!r}")
