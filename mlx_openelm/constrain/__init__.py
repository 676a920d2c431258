"""Constrained decoding with llguidance: JSON schemas, regular expressions and Lark grammars as
logits processors (`make_constraint`), and OpenAI tool calling for models without a tool template
(`tools`). `vocabulary.py` gives the matcher its tokenizer, `grammar.py` checks and compiles what a
constraint says, `processor.py` applies it token by token. llguidance is imported only when used."""

from .grammar import ConstraintSpec, validate_constraint
from .processor import ConstraintError, GrammarProcessor, make_constraint

__all__ = ["ConstraintError", "ConstraintSpec", "GrammarProcessor", "make_constraint", "validate_constraint"]
