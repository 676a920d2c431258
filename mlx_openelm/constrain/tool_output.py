"""A generic-format reply (see `tools`) back into OpenAI's shapes, whole or as it streams.

`ToolOutputParser.feed(text)` takes the reply's text piece by piece and returns OpenAI deltas: a
call's `index`, `id`, `type` and `function.name` once its name is complete, then its `arguments`
as raw JSON fragments (under the grammar they join to one balanced JSON value), or `content` (the
response string's characters, unescaped, or the raw JSON of a response_format value). `result()`
gives the message's `content` and `tool_calls` at the end; `parse_tool_output` does both at once.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Optional

_SPACE = " \t\r\n"


def new_call_id() -> str:
    """An OpenAI-style tool call id: "call_" and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    index: int
    id: str
    name: str = ""
    arguments: str = ""

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class _Scanner:
    """Walks JSON text one character at a time and reports each value's path, start and end."""

    def __init__(self, parser: "ToolOutputParser"):
        self.parser = parser
        self.stack: list[dict] = []  # containers: kind "{" or "[", the current key, what comes next
        self.started: list[tuple[tuple, int]] = []  # (path, start) of the values being read
        self.string: Optional[bool] = None  # inside a string: True for a key, False for a value
        self.escape = False
        self.scalar = False
        self.done = False

    def path(self) -> tuple:
        return tuple(frame["key"] for frame in self.stack)

    def _start(self, pos: int, char: str) -> None:
        self.started.append((self.path(), pos))
        self.parser.value_started(self.path(), pos, char)
        if char == "{":
            self.stack.append({"kind": "{", "key": None, "next": "key"})
        elif char == "[":
            self.stack.append({"kind": "[", "key": 0, "next": "value"})
        elif char == '"':
            self.string = False
        else:
            self.scalar = True

    def _end(self, end: int) -> None:
        path, start = self.started.pop()
        self.parser.value_ended(path, start, end)
        if self.stack:
            self.stack[-1]["next"] = "comma"
        else:
            self.done = True

    def feed(self, text: str, offset: int) -> None:
        for pos, char in enumerate(text, offset):
            if self.done:
                return
            if self.string is not None:
                self._string_char(pos, char)
            elif self.scalar and char in _SPACE + ",]}":
                self.scalar = False
                self._end(pos)
                self._structure(pos, char)
            elif not self.scalar:
                self._structure(pos, char)

    def _string_char(self, pos: int, char: str) -> None:
        if self.escape:
            self.escape = False
        elif char == "\\":
            self.escape = True
        elif char == '"':
            is_key, self.string = self.string, None
            if is_key:
                self.stack[-1]["next"] = "colon"
            else:
                self._end(pos + 1)

    def _structure(self, pos: int, char: str) -> None:
        if char in _SPACE:
            return
        frame = self.stack[-1] if self.stack else None
        if frame is None or frame["next"] == "value":
            if frame is not None and frame["kind"] == "[" and char == "]":
                self.stack.pop()
                self._end(pos + 1)
            else:
                self._start(pos, char)
        elif frame["next"] == "key" and char == '"':
            self.string, frame["key_start"] = True, pos
        elif frame["next"] == "colon" and char == ":":
            frame["key"] = json.loads(self.parser.text[frame["key_start"]:pos].rstrip())
            frame["next"] = "value"
        elif frame["next"] in ("comma", "key") and char in "}]":
            self.stack.pop()
            self._end(pos + 1)
        elif frame["next"] == "comma" and char == ",":
            frame["next"] = "key" if frame["kind"] == "{" else "value"
            if frame["kind"] == "[":
                frame["key"] += 1


class ToolOutputParser:
    """The deltas and the final message of one generic-format reply (see the module docstring)."""

    def __init__(self):
        self.text = ""
        self.calls: list[ToolCall] = []
        self.content: Optional[str] = None
        self._scanner = _Scanner(self)
        self._deltas: list[dict] = []
        self._stream: Optional[tuple[str, int, int]] = None  # (what, value start, emitted up to)

    @property
    def complete(self) -> bool:
        """Whether the whole JSON object has been read."""
        return self._scanner.done

    def value_started(self, path: tuple, pos: int, char: str) -> None:
        if len(path) == 3 and path[0] == "tool_calls" and path[2] == "arguments":
            self._stream = ("arguments", pos, pos)
        elif path == ("response",):
            self.content = ""
            self._stream = ("string" if char == '"' else "raw", pos, pos + (char == '"'))

    def value_ended(self, path: tuple, start: int, end: int) -> None:
        if len(path) == 3 and path[0] == "tool_calls" and path[2] == "name":
            call = ToolCall(path[1], new_call_id(), json.loads(self.text[start:end]))
            self.calls.append(call)
            self._deltas.append({"tool_calls": [{"index": call.index, "id": call.id, "type": "function",
                                                 "function": {"name": call.name, "arguments": ""}}]})
        elif self._stream is not None and self._stream[1] == start:
            self._flush(end, final=True)
            self._stream = None

    def _flush(self, end: int, final: bool = False) -> None:
        """Hand out what the streamed value holds up to `end` (`final`: `end` is just past its last character)."""
        what, start, done = self._stream
        if what == "string":  # the characters so far, unescaped, held back where an escape is cut
            raw = self.text[start + 1 : end - 1] if final else _decodable_prefix(self.text[start + 1 : end])
            new = json.loads('"' + raw + '"')[len(self.content):]
            if new:
                self.content += new
                self._deltas.append({"content": new})
            return
        fragment = self.text[done:end]
        self._stream = (what, start, end)
        if not fragment:
            return
        if what == "raw":
            self.content += fragment
            self._deltas.append({"content": fragment})
        else:
            call = self.calls[-1]
            call.arguments += fragment
            self._deltas.append({"tool_calls": [{"index": call.index, "function": {"arguments": fragment}}]})

    def feed(self, text: str) -> list[dict]:
        """The deltas `text` (the reply's next piece) completes."""
        offset = len(self.text)
        self.text += text
        self._scanner.feed(text, offset)
        if self._stream is not None:
            self._flush(len(self.text))
        deltas, self._deltas = self._deltas, []
        return deltas

    def result(self) -> tuple[Optional[str], list[dict]]:
        """The message's `content` (None when tools are called) and its OpenAI `tool_calls`."""
        if self.calls:
            return None, [call.to_openai() for call in self.calls]
        return self.content if self.content is not None else self.text, []


def _decodable_prefix(raw: str) -> str:
    """The longest prefix of a JSON string's raw characters that decodes on its own: no escape cut
    short, and no high-surrogate escape whose low half may follow."""
    for back in range(1, min(len(raw), 12) + 1):
        head = raw[: len(raw) - back + 1] if back > 1 else raw
        try:
            decoded = json.loads('"' + head + '"')
        except ValueError:
            continue
        if decoded and "\ud800" <= decoded[-1] <= "\udbff":
            continue
        return head
    return ""

def parse_tool_output(text: str) -> tuple[Optional[str], list[dict]]:
    """`(content, tool_calls)` of a whole generic-format reply (see `ToolOutputParser.result`)."""
    parser = ToolOutputParser()
    parser.feed(text)
    return parser.result()


def tool_finish(parser: ToolOutputParser, finish: Optional[str]) -> Optional[str]:
    """OpenAI's finish reason for a reply that ended with `finish`: "tool_calls" when it completed calls."""
    return "tool_calls" if finish == "stop" and parser.calls and parser.complete else finish


def tool_reply(text: str, finish: Optional[str], parser=None) -> tuple[Optional[str], list[dict], Optional[str]]:
    """`(content, tool_calls, finish_reason)` of a whole reply (read by `parser`, by default the generic
    format's); a reply cut short (finish "length") keeps its raw text as content and no calls."""
    parser = parser if parser is not None else ToolOutputParser()
    parser.feed(text)
    if not parser.complete:
        return text, [], finish
    content, calls = parser.result()
    return content, calls, tool_finish(parser, finish)
