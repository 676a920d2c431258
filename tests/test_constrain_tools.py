"""Tool calling in llama.cpp's generic format (mlx_openelm.constrain.tools and tool_output): the
request's tools checked, the reply's schema (with each tool's $defs hoisted) compiled by llguidance
and holding exactly the replies it should, history rewritten, the reply parsed whole and streamed
(merged as the openai client merges deltas)."""

from __future__ import annotations

import enum
import json
from typing import Optional

import pytest
from openai import pydantic_function_tool
from openai.lib.streaming._deltas import accumulate_delta
from pydantic import BaseModel

from mlx_openelm import load
from mlx_openelm.constrain import make_constraint
from mlx_openelm.constrain.tool_output import ToolOutputParser, parse_tool_output
from mlx_openelm.constrain.tools import plan_tools, rewrite_messages
from mlx_openelm.errors import ToolError
from mlx_openelm.generation import stream_generate


class Unit(str, enum.Enum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class Place(BaseModel):
    city: str
    country: Optional[str]


class GetWeather(BaseModel):
    """Current weather at a place."""

    place: Place
    unit: Unit


WEATHER = pydantic_function_tool(GetWeather, name="get_weather")  # strict, with $defs for Place and Unit
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                        "required": ["zone"], "additionalProperties": False}}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters: an empty object
CALL = {"name": "get_weather", "arguments": {"place": {"city": "Paris", "country": None}, "unit": "celsius"}}


@pytest.fixture(scope="module")
def tokenizer(json_checkpoint):
    return load(json_checkpoint)[1]


def accepts(tokenizer, plan, reply) -> bool:
    """Whether the plan's constraint allows `reply` (a JSON value) and may end after it."""
    processor = make_constraint(tokenizer, json_schema=plan.schema())
    ids = tokenizer.encode(json.dumps(reply), add_bos=False)
    matcher = processor.matcher
    return matcher.validate_tokens(ids) == len(ids) and matcher.consume_tokens(ids) and matcher.is_accepting()


def test_the_reply_schema_holds_calls_to_the_tools_and_a_response(tokenizer):
    plan = plan_tools([WEATHER, TIME, PING])
    assert set(plan.schema()["$defs"]) == {"tool_0", "tool_0__Place", "tool_0__Unit", "tool_1", "tool_2"}
    assert accepts(tokenizer, plan, {"tool_calls": [CALL]})
    assert accepts(tokenizer, plan, {"tool_calls": [CALL, {"name": "ping", "arguments": {}}]})  # parallel
    assert accepts(tokenizer, plan, {"response": "Hello!"})
    assert not accepts(tokenizer, plan, {"tool_calls": [{"name": "get_weather", "arguments": {"unit": "kelvin"}}]})
    assert not accepts(tokenizer, plan, {"tool_calls": [{"name": "nope", "arguments": {}}]})
    assert not accepts(tokenizer, plan, {"tool_calls": []})


@pytest.mark.parametrize("options, call_ok, two_ok, response_ok", [
    ({"tool_choice": "required"}, True, True, False),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, False, False, False),
    ({"parallel_tool_calls": False}, True, False, True),
])
def test_tool_choice_and_parallel_calls_shape_the_schema(tokenizer, options, call_ok, two_ok, response_ok):
    plan = plan_tools([WEATHER, TIME, PING], **options)
    assert accepts(tokenizer, plan, {"tool_calls": [CALL]}) == call_ok
    assert accepts(tokenizer, plan, {"tool_calls": [CALL, CALL]}) == two_ok
    assert accepts(tokenizer, plan, {"response": "hi"}) == response_ok
    if "tool_choice" in options and not call_ok:
        assert accepts(tokenizer, plan, {"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]})


def test_a_response_format_schema_becomes_the_response_branch(tokenizer):
    answer = {"type": "object", "properties": {"n": {"$ref": "#/$defs/N"}}, "required": ["n"],
              "additionalProperties": False, "$defs": {"N": {"type": "integer"}}}
    plan = plan_tools([TIME], response_schema=answer)
    assert accepts(tokenizer, plan, {"response": {"n": 3}})
    assert not accepts(tokenizer, plan, {"response": "three"})


def test_no_tools_and_tool_choice_none_make_no_tool_format():
    assert plan_tools() is None and plan_tools([], tool_choice="none") is None
    plan = plan_tools([TIME], tool_choice="none")
    assert plan.schema() is None and plan.system_prompt() == ""


def test_deprecated_functions_are_tools_called_one_at_a_time(tokenizer):
    plan = plan_tools(functions=[TIME["function"]], function_call={"name": "get_time"})
    assert plan.choice == "get_time" and not plan.parallel


@pytest.mark.parametrize("options, message", [
    ({"tools": [TIME, TIME]}, r"tools\[1\].function.name: two tools are named 'get_time'"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, r"tools\[0\].type must be 'function'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, r"tools\[0\].function.name must be"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "parameters must be a JSON"),
    ({"tools": {"a": 1}}, "tools must be a list"),
    ({"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope', which is not"),
    ({"tools": [TIME], "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tool_choice": "required"}, "no tools are given"),
    ({"tools": [TIME], "parallel_tool_calls": "yes"}, "parallel_tool_calls must be true or false"),
])
def test_bad_tool_fields_are_tool_errors_naming_the_field(options, message):
    with pytest.raises(ToolError, match=message):
        plan_tools(**options)


def test_history_is_rewritten_for_a_template_without_tools():
    plan = plan_tools([TIME])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Time in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_time", "arguments": '{"zone": "Europe/Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "10:00"}]}]
    out = rewrite_messages(messages, plan)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n") and '"get_time"' in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"tool_calls": [{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}]}
    assert json.loads(out[3]["content"]) == {"tool_response": {"tool": "get_time", "tool_call_id": "call_1",
                                                               "content": "10:00"}}
    with pytest.raises(ToolError, match=r"messages\[1\].tool_call_id: a tool message needs the id"):
        rewrite_messages([messages[0], {"role": "tool", "content": "x"}], plan)


def test_a_streamed_reply_merges_as_the_openai_client_merges_it():
    reply = json.dumps({"tool_calls": [CALL, {"name": "ping", "arguments": {}}]}, indent=1)
    parser, merged, names_first = ToolOutputParser(), {}, []
    for i in range(0, len(reply), 3):
        for delta in parser.feed(reply[i : i + 3]):
            for call in delta.get("tool_calls", []):
                if "id" in call:
                    names_first.append(call["function"]["arguments"] == "")
            merged = accumulate_delta(merged, delta)
    content, calls = parser.result()
    assert content is None and all(names_first) and len(names_first) == 2
    assert [c["id"] for c in merged["tool_calls"]] == [c["id"] for c in calls]
    assert all(c["id"].startswith("call_") and len(c["id"]) == 29 for c in calls)
    assert [json.loads(c["function"]["arguments"]) for c in merged["tool_calls"]] == [CALL["arguments"], {}]
    assert [c["function"]["name"] for c in merged["tool_calls"]] == ["get_weather", "ping"]


@pytest.mark.parametrize("text", ["plain", 'with "quotes", \\ and \n', "café 😀 日本"])
def test_a_streamed_response_is_its_string_unescaped(text):
    reply = json.dumps({"response": text})  # \u escapes, surrogate pairs cut anywhere
    parser, streamed = ToolOutputParser(), ""
    for char in reply:
        streamed += "".join(d.get("content", "") for d in parser.feed(char))
    assert streamed == text and parse_tool_output(reply) == (text, [])


def test_the_trained_model_calls_the_tool_it_is_asked_for(trained_model_path):
    model, tokenizer = load(trained_model_path)
    plan = plan_tools([WEATHER, TIME], tool_choice="required")
    messages = rewrite_messages([{"role": "user", "content": "What is the weather in Paris, in celsius?"}], plan)
    constraint = make_constraint(tokenizer, json_schema=plan.schema(), vocab_size=model.args.vocab_size)
    responses = list(stream_generate(model, tokenizer, tokenizer.apply_chat_template(messages), max_tokens=60,
                                     logits_processors=[constraint]))
    assert responses[-1].finish_reason == "stop"
    content, calls = parse_tool_output("".join(r.text for r in responses))
    assert content is None and calls[0]["function"]["name"] == "get_weather"
    arguments = json.loads(calls[0]["function"]["arguments"])
    assert arguments["place"]["city"] == "Paris" and arguments["unit"] == "celsius"
