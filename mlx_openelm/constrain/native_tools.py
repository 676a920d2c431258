"""Tool calling through a chat template's own tool format (Hermes/Qwen style ``<tool_call>`` JSON).

When the folder's template renders `tools` and writes calls as ``<tool_call>\\n{"name": ..., "arguments":
...}\\n</tool_call>`` (the markers mlx-lm's `json_tools` parser reads), the tools and the tool history go
through the template as transformers passes them, and the reply is constrained by a Lark grammar:
free text, or one or more such calls whose JSON follows each tool's schema (`tool_choice` and
`parallel_tool_calls` as in the generic format). A template with other markers is left to the
generic format (`tools`): `native_format` says why. `NativeToolParser` turns the reply back into
OpenAI deltas and `tool_calls`, reusing the generic parser on the calls' JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from .grammar import json_options
from .tool_output import ToolOutputParser
from .tools import ToolPlan, _hoist

# Markers of the tool formats mlx-lm knows (tokenizer_utils._infer_tool_parser) that are not the
# <tool_call> JSON family: a template holding one of them keeps the generic format.
_OTHER_FAMILIES = ("<minimax:tool_call>", "<|tool_call>", "<start_function_call>", "<longcat_tool_call>",
                   "<arg_key>", "<|tool_list_start|>", "<|tool_call_start|>", "<function=",
                   "<|tool_calls_section_begin|>", '<function name="', "[TOOL_CALLS]", "<atem:function_calls>")


@dataclass(frozen=True)
class NativeFormat:
    """A template's call markers: each call is `open` + JSON + `close`, calls joined by `between`."""

    open: str = "<tool_call>\n"
    close: str = "\n</tool_call>"
    between: str = "\n"


HERMES = NativeFormat()


def native_format(template_source: Optional[str]) -> tuple[Optional[NativeFormat], str]:
    """`(format, reason)`: the template's native tool format, or None and why the generic one is used."""
    if not template_source or "tools" not in template_source:
        return None, "the chat template does not render tools"
    other = [marker for marker in _OTHER_FAMILIES if marker in template_source]
    if other:
        return None, f"the chat template's tool markers ({other[0]}) are not the <tool_call> JSON format"
    if "<tool_call>" in template_source and "</tool_call>" in template_source:
        return HERMES, "the chat template writes <tool_call> JSON blocks"
    return None, "the chat template renders tools but its call markers are not recognised"


def _lark_string(text: str) -> str:
    return json.dumps(text)


def native_grammar(plan: ToolPlan, fmt: NativeFormat = HERMES) -> Optional[str]:
    """The Lark grammar of a reply under `plan`: free text (tool_choice "auto": not starting with the
    call marker) or calls (one, or several when parallel), each call's JSON following its tool's
    schema; None for tool_choice "none"."""
    if plan.choice == "none":
        return None
    lines, bodies = [], []
    options = json_options(False)
    for i, name in enumerate(plan.calls_allowed):
        defs: dict[str, Any] = {}
        arguments = _hoist(plan.functions[name]["parameters"], "arguments", defs)
        schema = {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
                  "required": ["name", "arguments"], "additionalProperties": False,
                  "$defs": defs, "x-guidance": options}
        lines.append(f"call_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        bodies.append(f"call_{i}")
    call = f"call: {_lark_string(fmt.open)} ({' | '.join(bodies)}) {_lark_string(fmt.close)}"
    calls = f"calls: call ({_lark_string(fmt.between)} call)*" if plan.parallel else "calls: call"
    first = fmt.open[0]
    start = "start: calls | TEXT" if plan.choice == "auto" else "start: calls"
    text = f"TEXT: /[^{json.dumps(first)[1:-1]}][\\s\\S]*/"
    return "\n".join([start, calls, call, *lines, text]) + "\n"


def template_tools(plan: ToolPlan) -> Optional[list[dict]]:
    """The tools the template shows: those the reply may call (none for tool_choice "none")."""
    tools = [{"type": "function", "function": {"name": name, **plan.functions[name]}} for name in plan.calls_allowed]
    return tools or None


class NativeToolParser:
    """The deltas and the final message of a native-format reply, with `ToolOutputParser`'s interface:
    text streams as `content`; calls (once the reply starts with the call marker) go to a generic
    parser as ``{"tool_calls": [call, ...]}``, so names come first and arguments as fragments."""

    def __init__(self, fmt: NativeFormat = HERMES):
        self.fmt = fmt
        self.text = ""
        self.mode: Optional[str] = None  # None until the reply's start decides: "text" or "calls"
        self._inner = ToolOutputParser()
        self._pos = 0  # characters of `text` handled
        self._state, self._expect = "open", fmt.open  # what comes next and the marker text it is due to hold
        self._calls = 0

    @property
    def calls(self):
        return self._inner.calls

    @property
    def complete(self) -> bool:
        """Whether the reply reads as whole: text, or calls none of which is cut short."""
        return self.mode == "text" or (self.mode == "calls" and self._calls > 0 and self._state == "open")

    def feed(self, text: str) -> list[dict]:
        """The deltas `text` (the reply's next piece) completes."""
        self.text += text
        if self.mode is None:
            if self.text.startswith(self.fmt.open):
                self.mode = "calls"
                self._inner.feed('{"tool_calls": [')
            elif self.fmt.open.startswith(self.text):
                return []
            else:
                self.mode = "text"
        if self.mode == "text":
            new, self._pos = self.text[self._pos:], len(self.text)
            return [{"content": new}] if new else []
        deltas: list[dict] = []
        for char in self.text[self._pos:]:
            self._pos += 1
            deltas += self._call_char(char)
        return deltas

    def _call_char(self, char: str) -> list[dict]:
        if self._state == "json":
            deltas = self._inner.feed(char)
            if len(self._inner._scanner.stack) == 2:  # back in the wrapper's list: the call's JSON is whole
                self._state, self._expect, self._calls = "close", self.fmt.close, self._calls + 1
            return deltas
        if self._expect:  # a marker's next character (the grammar holds the reply to them)
            self._expect = self._expect[1:] if char == self._expect[0] else self._expect
            if not self._expect and self._state == "close":
                self._state, self._expect = "open", self.fmt.between + self.fmt.open
            return []
        self._state = "json"
        return self._inner.feed(("," if self._calls else "") + char)

    def result(self) -> tuple[Optional[str], list[dict]]:
        """The message's `content` (None when tools are called) and its OpenAI `tool_calls`."""
        if self.mode == "calls" and self.calls:
            return None, [call.to_openai() for call in self.calls]
        return self.text, []


def tool_parser(plan: ToolPlan):
    """The parser of a reply under `plan`: the native one where the plan has a native format."""
    return NativeToolParser(plan.native) if plan.native is not None else ToolOutputParser()


def use_native_format(plan: Optional[ToolPlan], chat_template) -> Optional[NativeFormat]:
    """The native format a request with tools takes where `chat_template` has one (`plan` marked with
    it); None where the generic format stays: no tools, no native format, or a response_format schema
    beside tools the reply may call (only the generic format's response branch carries it)."""
    if plan is None or chat_template is None or not chat_template.supports_tools:
        return None
    if plan.response_schema is not None and plan.choice != "none":
        return None
    fmt, _reason = native_format(chat_template.templates.get("tool_use") or chat_template.source)
    plan.native = fmt
    return fmt


def native_constraint(plan: ToolPlan):
    """The validated constraint of a native-format reply under `plan` (None for tool_choice "none")."""
    from .grammar import validate_constraint

    grammar = native_grammar(plan, plan.native)
    return validate_constraint(grammar=grammar) if grammar is not None else None
