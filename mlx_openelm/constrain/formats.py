"""OpenAI's `response_format` as a constraint: `text` none, `json_object` any JSON object,
`json_schema` its schema (strict: unsupported keywords are errors, not ignored)."""

from __future__ import annotations

import re
from typing import Any, Optional

from ..errors import GrammarError
from .grammar import JSON_OBJECT_SCHEMA, ConstraintSpec, validate_constraint

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def response_format_constraint(value: Any) -> Optional[ConstraintSpec]:
    """The constraint a request's `response_format` asks for (None for absent or `text`); a
    `GrammarError` naming the field otherwise wrong."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return validate_constraint(json_schema=JSON_OBJECT_SCHEMA)
    if kind != "json_schema":
        raise GrammarError("response_format.type must be 'text', 'json_object' or 'json_schema', "
                           f"got {kind if isinstance(value, dict) else value!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise GrammarError("response_format.json_schema must be an object with 'name' and 'schema'")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise GrammarError(f"response_format.json_schema.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise GrammarError("response_format.json_schema.schema must be a JSON schema object")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise GrammarError(f"response_format.json_schema.strict must be true, false or null, got {strict!r}")
    return validate_constraint(json_schema=schema, strict=bool(strict))


def request_constraint(body: dict):
    """`(tool plan or None, constraint or None)` of a chat request's `tools`/`functions`/`tool_choice`/
    `parallel_tool_calls`/`function_call` and `response_format`: with tools, the generic format's reply
    schema (its response branch the response_format schema); without, response_format's. Raises
    `ToolError` or `GrammarError` naming the field."""
    import json

    from .tools import plan_tools

    response = response_format_constraint(body.get("response_format"))
    plan = plan_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"),
                      body.get("functions"), body.get("function_call"),
                      json.loads(response.source) if response is not None else None)
    if plan is None or plan.schema() is None:
        return plan, response
    return plan, validate_constraint(json_schema=plan.schema())


def json_instruction(messages: list, response_format: Any) -> list:
    """`messages` with a short system instruction giving the response_format's schema where no message
    mentions JSON: a grammar on a model not told about the format leaves its distribution (OpenAI's
    JSON mode asks callers to say "JSON"; small models follow a prompted format much better)."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in ("json_object", "json_schema"):
        return messages
    if any("json" in str(m.get("content") or "").lower() for m in messages if isinstance(m, dict)):
        return messages
    import json

    schema = (response_format.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    line = ("Respond with JSON matching this schema: " + json.dumps(schema, ensure_ascii=False)
            if schema else "Respond with a JSON object.")
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{line}".lstrip()}, *messages[1:]]
    return [{"role": "system", "content": line}, *messages]
