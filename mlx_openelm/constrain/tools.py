"""OpenAI tool calling for models whose chat template knows no tools (OpenELM, Llama-2, SmolLM2), in
llama.cpp's "generic" format.

The tools go into the system prompt (their JSON, an instruction, an example), and the whole reply
is constrained to one JSON object: either ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``,
each call's arguments following that tool's parameters schema, or ``{"response": ...}`` (a string,
or the request's response_format schema). Earlier turns are rewritten the same way: an assistant's
`tool_calls` become that JSON as its content, a `tool` message a user message holding
``{"tool_response": ...}``. `tool_output` turns the reply back into OpenAI `tool_calls`.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from ..errors import ToolError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
INSTRUCTION = ("Reply with one JSON object: either {\"tool_calls\": [...]} to call tools, each call with the "
               "tool's \"name\" and its \"arguments\", or {\"response\": ...} to answer the user directly.")


@dataclass
class ToolPlan:
    """What a request's tools ask for: the functions (name -> {"description", "parameters"}), the
    choice ("none", "auto", "required" or one function's name), whether calls may come several at
    a time, and the schema of a direct response (None: free text)."""

    functions: dict[str, dict] = field(default_factory=dict)
    choice: str = "auto"
    parallel: bool = True
    response_schema: Optional[dict] = None
    native: Any = None  # the chat template's own call format (`native_tools.NativeFormat`); None: generic

    @property
    def calls_allowed(self) -> list[str]:
        """The functions the reply may call."""
        if self.choice == "none":
            return []
        if self.choice in ("auto", "required"):
            return list(self.functions)
        return [self.choice]

    def schema(self) -> Optional[dict]:
        """The constraint on the whole reply (see the module docstring), `$defs` hoisted to its root; None
        for tool_choice "none" (no tool format at all: the reply is constrained only by response_format)."""
        if self.choice == "none":
            return None
        defs: dict[str, Any] = {}
        branches = []
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": _hoist(
                     self.functions[name]["parameters"], f"tool_{i}", defs)},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for i, name in enumerate(self.calls_allowed)]
        if calls:
            array = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
            if not self.parallel:
                array["maxItems"] = 1
            branches.append({"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"],
                             "additionalProperties": False})
        if self.choice == "auto":
            response = {"type": "string"} if self.response_schema is None else _hoist(self.response_schema,
                                                                                         "response", defs)
            branches.append({"type": "object", "properties": {"response": response}, "required": ["response"],
                             "additionalProperties": False})
        schema: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
        return {**schema, "$defs": defs} if defs else schema

    def system_prompt(self) -> str:
        """The tools' part of the system prompt: their JSON, the instruction and an example call."""
        if not self.calls_allowed:
            return ""
        tools = [{"name": name, **self.functions[name]} for name in self.calls_allowed]
        example = {"tool_calls": [{"name": self.calls_allowed[0], "arguments": {"...": "..."}}]}
        return (f"You can call these tools to answer the user:\n{json.dumps(tools, indent=2, ensure_ascii=False)}\n\n"
                f"{INSTRUCTION}\nExample of a tool call:\n{json.dumps(example, ensure_ascii=False)}")


def _rewrite_refs(node: Any, prefix: str, name: str) -> Any:
    """`node` with every local `$ref` pointing into the hoisted copy: "#/$defs/X" -> "#/$defs/{prefix}__X",
    any other "#..." -> "#/$defs/{name}..." (the schema itself sits at `$defs[name]`)."""
    if isinstance(node, list):
        return [_rewrite_refs(item, prefix, name) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            match = re.match(r"#/(\$defs|definitions)/(.*)", value)
            value = f"#/$defs/{prefix}__{match.group(2)}" if match else f"#/$defs/{name}{value[1:]}"
        out[key] = _rewrite_refs(value, prefix, name) if key not in ("const", "enum", "default", "examples") else value
    return out


def _hoist(schema: dict, name: str, defs: dict) -> dict:
    """Place `schema` at `defs[name]` (its own `$defs`/`definitions` beside it, renamed) and return a
    reference to it, so refs inside it still resolve once it is nested in the reply's schema."""
    schema = copy.deepcopy(schema)
    own = {**schema.pop("definitions", {}), **schema.pop("$defs", {})}
    for key, value in own.items():
        defs[f"{name}__{key}"] = _rewrite_refs(value, name, name)
    defs[name] = _rewrite_refs(schema, name, name)
    return {"$ref": f"#/$defs/{name}"}


def _function(entry: Any, where: str) -> tuple[str, dict]:
    if not isinstance(entry, Mapping):
        raise ToolError(f"{where} must be an object, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolError(f"{where}.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
    parameters = entry.get("parameters", _NO_PARAMETERS)
    if not isinstance(parameters, Mapping):
        raise ToolError(f"{where}.parameters must be a JSON schema object, got {type(parameters).__name__}")
    description = entry.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolError(f"{where}.description must be a string")
    return name, {**({"description": description} if description else {}), "parameters": dict(parameters)}


def _functions(tools: Any, functions: Any) -> dict[str, dict]:
    entries = []
    if tools is not None:
        if not isinstance(tools, list):
            raise ToolError(f"tools must be a list, got {type(tools).__name__}")
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, Mapping) else type(tool).__name__
                raise ToolError(f"tools[{i}].type must be 'function' (the only kind supported), got {kind!r}")
            entries.append((tool.get("function"), f"tools[{i}].function"))
    if functions is not None:
        if not isinstance(functions, list):
            raise ToolError(f"functions must be a list, got {type(functions).__name__}")
        entries += [(f, f"functions[{i}]") for i, f in enumerate(functions)]
    found: dict[str, dict] = {}
    for entry, where in entries:
        name, spec = _function(entry, where)
        if name in found:
            raise ToolError(f"{where}.name: two tools are named {name!r}")
        found[name] = spec
    return found


def _choice(tool_choice: Any, function_call: Any, names: dict) -> str:
    choice = tool_choice if tool_choice is not None else function_call
    if choice is None:
        return "auto" if names else "none"
    field_name = "tool_choice" if tool_choice is not None else "function_call"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required") or (choice == "required" and field_name == "function_call"):
            raise ToolError(f"{field_name} must be 'none', 'auto', 'required' or a function, got {choice!r}")
        if choice != "none" and not names:
            raise ToolError(f"{field_name} is {choice!r} but no tools are given")
        return choice
    target = choice.get("function", choice) if isinstance(choice, Mapping) else None
    name = target.get("name") if isinstance(target, Mapping) else None
    if name not in names:
        raise ToolError(f"{field_name} names the function {name!r}, which is not among the tools")
    return name


def plan_tools(tools=None, tool_choice=None, parallel_tool_calls=None, functions=None, function_call=None,
               response_schema: Optional[dict] = None) -> Optional[ToolPlan]:
    """The one validator of a request's tool fields (OpenAI's, the deprecated `functions` and
    `function_call` included); None when the request has no tools. Raises `ToolError`."""
    names = _functions(tools, functions)
    if not names and tool_choice in (None, "none") and function_call in (None, "none"):
        return None
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError(f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}")
    parallel = parallel_tool_calls is not False and functions is None  # `functions` make one call at a time
    return ToolPlan(names, _choice(tool_choice, function_call, names), parallel, response_schema)


def _text(content: Any, where: str) -> str:
    """A message's content as text (a list of text parts joined); None is empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ToolError(f"{where}.content must be a string or a list of text parts")


def _call_json(calls: Any, where: str, names: dict[str, str]) -> str:
    if not isinstance(calls, list):
        raise ToolError(f"{where}.tool_calls must be a list")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ToolError(f"{where}.tool_calls[{i}].function.name is missing")
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            raise ToolError(f"{where}.tool_calls[{i}].function.arguments is not valid JSON") from None
        if isinstance(call.get("id"), str):
            names[call["id"]] = function["name"]
        out.append({"name": function["name"], "arguments": arguments})
    return json.dumps({"tool_calls": out}, ensure_ascii=False)


def rewrite_messages(messages: Sequence[Mapping], plan: Optional[ToolPlan]) -> list[dict]:
    """`messages` as plain role/content turns a template without tools can render: the tools' system
    prompt first (in the system message), assistant `tool_calls` as JSON, `tool` results as user turns."""
    out: list[dict] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, Mapping) else None
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ToolError(f"{where}.tool_call_id: a tool message needs the id of the call it answers")
            response = {"tool": call_names.get(call_id), "tool_call_id": call_id,
                        "content": _text(message.get("content"), where)}
            out.append({"role": "user", "content": json.dumps({"tool_response": response}, ensure_ascii=False)})
        elif role == "function":  # the deprecated functions API's result message
            response = {"tool": message.get("name"), "content": _text(message.get("content"), where)}
            out.append({"role": "user", "content": json.dumps({"tool_response": response}, ensure_ascii=False)})
        elif role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            calls = message.get("tool_calls") or [{"function": message.get("function_call")}]
            out.append({"role": "assistant", "content": _call_json(calls, where, call_names)})
        else:
            out.append({"role": role, "content": _text(message.get("content") if isinstance(message, Mapping)
                                                       else None, where)})
    if plan is not None and plan.system_prompt():
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{plan.system_prompt()}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": plan.system_prompt()})
    return out
