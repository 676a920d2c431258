"""The constraint options `generate` and `chat` share: `--json-schema`, `--regex`, `--grammar`."""

from __future__ import annotations

from pathlib import Path

import click


def constraint_options(fn):
    """`--json-schema`, `--regex` and `--grammar`: keep the output inside a grammar (one of them)."""
    options = [
        click.option("--json-schema", "json_schema", default=None, metavar="FILE|JSON",
                     help="Reply with JSON following this JSON schema (a file, or the schema's JSON text)."),
        click.option("--regex", default=None, metavar="REGEX", help="The whole reply matches this regular expression."),
        click.option("--grammar", default=None, type=click.Path(path_type=Path), metavar="FILE",
                     help="The reply follows this Lark grammar (llguidance's dialect)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def validate_constraint_options(json_schema, regex, grammar):
    """The constraint the options ask for (validated by the library), or None; before any model loads."""
    from .grammar import validate_constraint

    return validate_constraint(json_schema=json_schema, regex=regex, grammar=grammar)
