"""`generate` and `chat` under --json-schema, --regex and --grammar, through the in-process CLI runner."""

from __future__ import annotations

import json

import pytest

SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}, "ok": {"type": "boolean"}},
          "required": ["mood", "ok"], "additionalProperties": False}


@pytest.mark.parametrize("how", ["file", "text"])
def test_generate_json_schema_prints_json_that_follows_it(any_checkpoint, invoke_cli, tmp_path, how):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    result = invoke_cli("generate", "--model", any_checkpoint, "-p", "JSON please:", "-m", 80, "--json",
                        "--json-schema", schema if how == "file" else json.dumps(SCHEMA))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["finish_reason"] == "stop"
    document = json.loads(out["text"])
    assert document["mood"] in ("happy", "sad") and isinstance(document["ok"], bool)


def test_generate_regex_and_grammar_shape_the_reply(any_checkpoint, invoke_cli, tmp_path):
    result = invoke_cli("generate", "--model", any_checkpoint, "-p", "Answer:", "-m", 10, "--quiet",
                        "--regex", "(yes|no)")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() in ("yes", "no")
    grammar = tmp_path / "answer.lark"
    grammar.write_text('start: "maybe " NUMBER\nNUMBER: /[0-9]/\n')
    result = invoke_cli("generate", "--model", any_checkpoint, "-p", "Answer:", "-m", 10, "--quiet",
                        "--grammar", grammar)
    assert result.exit_code == 0, result.output
    text = result.stdout.strip()
    assert text.startswith("maybe ") and text[-1].isdigit() and len(text) == 7


def test_chat_keeps_every_reply_inside_the_grammar(hf_checkpoint, invoke_cli):
    result = invoke_cli("chat", "--model", hf_checkpoint, "-m", 10, "-q", "--regex", "(yes|no)",
                        input="first\nsecond\nthird\n")
    assert result.exit_code == 0, result.output
    assert [line.strip() for line in result.stdout.strip().splitlines()] in \
        [[a, b, c] for a in ("yes", "no") for b in ("yes", "no") for c in ("yes", "no")]


@pytest.mark.parametrize("args, message", [
    (["--json-schema", "{}", "--regex", "a"], "give one constraint, not --json-schema and --regex"),
    (["--json-schema", "{oops"], "--json-schema: not valid JSON"),
    (["--json-schema", "missing.json"], "--json-schema: missing.json: cannot read the schema file"),
    (["--regex", "(ab"], "--regex: .*unclosed group"),
    (["--grammar", "missing.lark"], "--grammar: missing.lark: cannot read the grammar file"),
])
def test_bad_constraints_are_one_clear_line(hf_checkpoint, invoke_cli, args, message):
    result = invoke_cli("generate", "--model", hf_checkpoint, "-p", "hi", *args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ")
    import re

    assert re.search(message, lines[-1]), lines[-1]
