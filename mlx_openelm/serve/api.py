"""OpenAI's wire format for the server: request bodies in, response bodies out.

Pure Python (no MLX, no HTTP): `parse_chat` / `parse_completion` validate a decoded
JSON body into a `ParsedRequest` or raise `APIError`; the other functions build the
response objects in the shapes the official `openai` client expects.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

from ..constrain.formats import json_instruction, request_constraint
from ..constrain.grammar import ConstraintSpec
from ..constrain.native_tools import native_constraint, template_tools, use_native_format
from ..constrain.tools import ToolPlan, rewrite_messages
from ..errors import ChatTemplateError, GrammarError, PromptError, ToolError
from ..stopping import normalize_stops

MAX_STOPS = 4  # as OpenAI
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for the sampling fields it leaves out (the `serve` options)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.2
    seed: Optional[int] = None


@dataclass
class GenerationSpec:
    """Everything the scheduler needs to run one request."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    top_logprobs: Optional[int] = None  # None: no logprobs; else how many alternatives per token
    constraint: Optional[ConstraintSpec] = None  # response_format's JSON schema (json_object: any object)


@dataclass
class ParsedRequest:
    kind: str  # "chat" or "completion"
    spec: GenerationSpec
    stream: bool = False
    include_usage: bool = False
    tools: Optional[ToolPlan] = None  # tool calling in the generic format: the reply is parsed into tool_calls
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


# ---- field readers -------------------------------------------------------------------

def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"'{param}': {message}", param=param)


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False, lo_open=False, hi_open=False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _bad(name, f"must be {kind}, got {value!r}")
    if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and (value >= hi if hi_open else value > hi)):
        low = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        high = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
        raise _bad(name, f"must be {' and '.join(p for p in (low, high) if p)}, got {value!r}")
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {value!r}")
    return value


def _refuse_unsupported(body: dict, extra: tuple[tuple[str, Any], ...] = ()) -> None:
    """400 for options this server does not implement, rather than silently ignoring them."""
    if _number(body, "n", 1, lo=1, integer=True) != 1:
        raise _bad("n", "only n = 1 is supported (one choice per request)")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "is not supported by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, lo=-2.0, hi=2.0) != 0:
            raise _bad(name, "is not supported; use 'repetition_penalty' (OpenELM's recommended 1.2 is the default)")
    for name, allowed in extra:
        if body.get(name) not in (None, allowed):
            raise _bad(name, "is not supported by this server")


def _stops(body: dict) -> tuple[str, ...]:
    try:
        stops = normalize_stops(body.get("stop"))
    except (TypeError, ValueError):
        raise _bad("stop", "must be a non-empty string or a list of them") from None
    if len(stops) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    return stops


def _field(error: Exception, default: str) -> APIError:
    """A 400 for a library error whose message leads with the field at fault (`tools[1].function.name: ...`)."""
    leading = re.match(r"([A-Za-z_]+)[\w.\[\]]*", str(error))
    fields = ("messages", "tools", "functions", "tool_choice", "function_call", "parallel_tool_calls", "response_format")
    return APIError(400, str(error), param=leading.group(0) if leading and leading.group(1) in fields else default)


def _constraint(body: dict) -> tuple[Optional[ToolPlan], Optional[ConstraintSpec]]:
    try:
        return request_constraint(body)
    except ToolError as e:
        raise _field(e, "tools") from None
    except GrammarError as e:
        raise _field(e, "response_format") from None


def _spec(body: dict, prompt: list[int], defaults: SamplingDefaults, top_logprobs: Optional[int],
          constraint: Optional[ConstraintSpec] = None) -> GenerationSpec:
    # Under a constraint the penalty is off unless the request sets it: it steers a grammar's choices.
    penalty = 1.0 if constraint is not None else defaults.repetition_penalty
    max_tokens = _number(body, "max_completion_tokens", None, lo=1, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", defaults.max_tokens, lo=1, integer=True)
    seed = _number(body, "seed", defaults.seed, integer=True)
    return GenerationSpec(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", defaults.temperature, lo=0, hi=2)),
        top_p=float(_number(body, "top_p", defaults.top_p, lo=0, hi=1, lo_open=True)),
        top_k=_number(body, "top_k", defaults.top_k, lo=0, integer=True),
        min_p=float(_number(body, "min_p", defaults.min_p, lo=0, hi=1, hi_open=True)),
        repetition_penalty=float(_number(body, "repetition_penalty", penalty, lo=0, lo_open=True)),
        seed=None if seed is None else seed % 2**63,
        stop=_stops(body),
        top_logprobs=top_logprobs,
        constraint=constraint,
    )


def _streaming(body: dict) -> tuple[bool, bool]:
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    return stream, _flag(options, "include_usage")


def _check_context(prompt: list[int], context: int, param: str) -> None:
    if len(prompt) > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the {param} has "
                            f"{len(prompt)} tokens. Shorten the {param}.", param=param, code="context_length_exceeded")


# ---- requests --------------------------------------------------------------------------

def _message_text(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is understood
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")


TEMPLATE_ROLES = ("system", "user", "assistant", "tool")  # a chat template decides what it renders
OPENELM_ROLES = ("system", "user", "assistant")  # OpenELM-Instruct's format
MESSAGE_EXTRAS = ("name", "tool_calls", "tool_call_id")  # kept for templates that render them


def chat_messages(body: dict, roles: tuple[str, ...] = TEMPLATE_ROLES, tools: Optional[ToolPlan] = None) -> list[dict]:
    """The request's messages as the chat template takes them: text content (an assistant message with
    `tool_calls` may have none), and the tool-call fields kept; a role outside `roles` is a 400. With
    `tools` (the generic tool format), tools go into the system prompt and tool turns become text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    tool_turns = any(isinstance(m, dict) and (m.get("role") in ("tool", "function") or m.get("tool_calls"))
                     for m in messages)
    if tools is not None or (tool_turns and "tool" not in roles):  # the generic format: tool turns as text
        try:
            messages = rewrite_messages([{**m, "role": ROLE_ALIASES.get(m.get("role"), m.get("role"))}
                                         if isinstance(m, dict) else m for m in messages], tools)
        except ToolError as e:
            raise _field(e, "messages") from None
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", "must be an object with 'role' and 'content'")
        role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
        if role not in roles:
            raise _bad(f"messages[{i}].role", f"must be one of {', '.join(roles)}, got {message.get('role')!r}")
        content = message.get("content")
        if not (content is None and role == "assistant" and message.get("tool_calls")):
            content = _message_text(i, content)
        extras = {key: message[key] for key in MESSAGE_EXTRAS if message.get(key) is not None}
        out.append({"role": role, "content": content, **extras})
    return out


@contextmanager
def _prompt_errors(param: str):
    """Text the tokenizer refuses (JSON can carry lone surrogates, which are not UTF-8), or messages the chat
    template refuses, is a 400 naming `param`."""
    try:
        yield
    except (PromptError, ChatTemplateError, ValueError) as e:
        raise _bad(param, str(e)) from None


def parse_chat(body: Any, tokenizer, context: int, defaults: SamplingDefaults) -> ParsedRequest:
    """A `/v1/chat/completions` body -> `ParsedRequest` (the tokenizer's chat template applied)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _refuse_unsupported(body)
    tools, constraint = _constraint(body)
    native = use_native_format(tools, tokenizer.chat_template)  # the template's own tool format
    if native is not None and tools.choice != "none":
        constraint = native_constraint(tools)
    roles = TEMPLATE_ROLES if tokenizer.chat_template is not None else OPENELM_ROLES
    messages = chat_messages(body, roles, None if native is not None else tools)
    if tools is None or tools.choice == "none":  # tell the model the format (no instruction when it is told)
        messages = json_instruction(messages, body.get("response_format"))
    with _prompt_errors("messages"):
        prompt = tokenizer.apply_chat_template(messages, tools=template_tools(tools) if native else None)
    _check_context(prompt, context, "messages")
    top = None
    if _flag(body, "logprobs"):
        top = _number(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS_CHAT, integer=True)
    elif body.get("top_logprobs") is not None:
        raise _bad("top_logprobs", "needs 'logprobs': true")
    stream, include_usage = _streaming(body)
    return ParsedRequest("chat", _spec(body, prompt, defaults, top, constraint), stream, include_usage,
                         tools=tools if tools is not None and tools.schema() is not None else None)


def completion_prompt(body: dict, tokenizer, vocab_size: int) -> list[int]:
    """Prompt text (BOS first where the tokenizer adds one, as `generate` does) or token ids (taken as they are)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        with _prompt_errors("prompt"):
            return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise _bad("prompt", f"token ids must be in [0, {vocab_size})")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("prompt", "only one prompt per request is supported")
    raise _bad("prompt", "must be a string or a non-empty list of token ids")


def parse_completion(body: Any, tokenizer, context: int, vocab_size: int, defaults: SamplingDefaults) -> ParsedRequest:
    """A `/v1/completions` body -> `ParsedRequest`."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _refuse_unsupported(body, extra=(("echo", False), ("suffix", ""), ("best_of", 1)))
    for name in ("response_format", "tools", "functions"):
        if body.get(name) is not None and body.get(name) != {"type": "text"}:
            raise _bad(name, "is for chat completions; /v1/completions takes none")
    prompt = completion_prompt(body, tokenizer, vocab_size)
    _check_context(prompt, context, "prompt")
    top = _number(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS_COMPLETION, integer=True)
    stream, include_usage = _streaming(body)
    return ParsedRequest("completion", _spec(body, prompt, defaults, top), stream, include_usage)


# ---- responses -------------------------------------------------------------------------

def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as logprobs show it: its piece as text (control pieces by name) and its bytes."""
    raw = tokenizer.piece_bytes(token)
    if raw or not 0 <= token < tokenizer.vocab_size:
        return raw.decode("utf-8", errors="replace"), list(raw)
    return tokenizer.piece(token), []


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_logprobs(tokenizer, steps) -> dict:
    """`choices[0].logprobs` of a chat completion for `steps` (each with token, logprob, top_logprobs)."""

    def entry(token: int, logprob: float) -> dict:
        text, raw = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [
        {**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs]} for s in steps
    ], "refusal": None}


def completion_logprobs(tokenizer, steps, offsets: list[int]) -> dict:
    """`choices[0].logprobs` of a text completion (the legacy shape); `offsets`: text offset of each step."""
    tops = [{token_text(tokenizer, t)[0]: lp for t, lp in s.top_logprobs} for s in steps]
    return {
        "tokens": [token_text(tokenizer, s.token)[0] for s in steps],
        "token_logprobs": [s.logprob for s in steps],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _envelope(request: ParsedRequest, model_id: str, chunk: bool) -> dict:
    if request.kind == "chat":
        kind, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl-"
    else:
        kind, prefix = "text_completion", "cmpl-"
    return {"id": prefix + request.id, "object": kind, "created": request.created, "model": model_id,
            "system_fingerprint": None}


def response_body(request: ParsedRequest, model_id: str, text: Optional[str], finish: Optional[str],
                  logprobs: Optional[dict], usage_: dict, tool_calls: Optional[list] = None) -> dict:
    """The whole (non-streamed) response (`tool_calls`: the message's, with `content` None)."""
    if request.kind == "chat":
        message = {"role": "assistant", "content": text, "refusal": None, **({"tool_calls": tool_calls}
                                                                             if tool_calls else {})}
        choice = {"index": 0, "message": message,
                  "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return {**_envelope(request, model_id, chunk=False), "choices": [choice], "usage": usage_}


def chunk_body(request: ParsedRequest, model_id: str, text: Optional[str], finish: Optional[str],
               logprobs: Optional[dict], role: bool = False, delta: Optional[dict] = None) -> dict:
    """One server-sent event of a streamed response (`role`: the chat stream's first chunk; `delta`:
    a chat delta as it is, such as one with `tool_calls`)."""
    if request.kind == "chat" and delta is None:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
    if request.kind == "chat":
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    body = {**_envelope(request, model_id, chunk=True), "choices": [choice]}
    if request.include_usage:
        body["usage"] = None
    return body


def usage_chunk(request: ParsedRequest, model_id: str, usage_: dict) -> dict:
    """The extra last chunk of a stream with `stream_options.include_usage`."""
    return {**_envelope(request, model_id, chunk=True), "choices": [], "usage": usage_}


def models_body(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "mlx-openelm"}]}
