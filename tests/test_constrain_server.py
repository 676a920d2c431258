"""`response_format` on `mlx-openelm serve` (the trained model), through the official openai client:
`parse()` with a pydantic model, json_object streamed, truncation, and 400s naming what is wrong."""

from __future__ import annotations

import json
import signal
from typing import Literal

import pytest

openai = pytest.importorskip("openai")

from pydantic import BaseModel  # noqa: E402
from serving import KEY, start_server  # noqa: E402


class Pet(BaseModel):
    name: str
    species: Literal["cat", "dog", "bird"]
    age: int


ASK = [{"role": "user", "content": "Invent a pet and describe it as JSON with its name, species and age."}]


@pytest.fixture(scope="module")
def client(trained_model_path):
    server = start_server(trained_model_path, "--api-key", KEY, "--max-tokens", "60", "--model-id", "smol")
    yield openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0, "".join(server.log)


def test_parse_returns_the_pydantic_model(client):
    completion = client.chat.completions.parse(model="smol", messages=ASK, response_format=Pet)
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.species in ("cat", "dog", "bird")
    assert completion.choices[0].finish_reason == "stop"


def test_json_object_streams_one_json_object(client):
    stream = client.chat.completions.create(model="smol", messages=ASK, stream=True,
                                            response_format={"type": "json_object"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_reply_cut_by_max_tokens_is_length_not_stop(client):
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="smol", messages=ASK, response_format=Pet, max_tokens=4)


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                             "schema": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}, "json_schema.name must be"),
    ({"type": "yaml"}, "response_format.type must be"),
])
def test_a_bad_response_format_is_a_400_naming_it(client, response_format, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model="smol", messages=ASK, response_format=response_format)


class GetWeather(BaseModel):
    """Current weather in a city."""

    city: str
    unit: Literal["celsius", "fahrenheit"]


WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


def test_a_tool_call_comes_back_as_tool_calls_that_parse(client):
    completion = client.chat.completions.parse(model="smol", messages=WEATHER_ASK, tool_choice="required",
                                               tools=[openai.pydantic_function_tool(GetWeather)])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert call.function.parsed_arguments.city == "Paris"


def test_a_streamed_tool_call_is_what_the_client_assembles(client):
    with client.chat.completions.stream(model="smol", messages=WEATHER_ASK, tool_choice="required",
                                        tools=[openai.pydantic_function_tool(GetWeather)]) as stream:
        names = [event.name for event in stream if event.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert names == ["GetWeather"] and final.choices[0].finish_reason == "tool_calls"
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_a_tool_result_goes_back_into_the_conversation(client):
    first = client.chat.completions.create(model="smol", messages=WEATHER_ASK, tool_choice="required",
                                           tools=[openai.pydantic_function_tool(GetWeather)])
    call = first.choices[0].message.tool_calls[0]
    history = WEATHER_ASK + [first.choices[0].message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    second = client.chat.completions.create(model="smol", messages=history,
                                            tools=[openai.pydantic_function_tool(GetWeather)])
    message = second.choices[0].message
    if message.tool_calls:
        assert second.choices[0].finish_reason == "tool_calls"
        assert all(c.function.name == "GetWeather" for c in message.tool_calls)
    else:
        assert isinstance(message.content, str) and second.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra, message", [
    ({"tools": [{"type": "function", "function": {"name": "a"}}] * 2}, "two tools are named 'a'"),
    ({"messages": WEATHER_ASK + [{"role": "tool", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "a"}}]}, r"messages\[1\].tool_call_id: a tool message"),
    ({"tools": [{"type": "function", "function": {"name": "a"}}], "tool_choice": {"type": "function",
                                                                                  "function": {"name": "b"}}},
     "'b', which is not among the tools"),
])
def test_bad_tools_are_a_400_naming_them(client, extra, message):
    body = {"model": "smol", "messages": WEATHER_ASK, **extra}
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(**body)


def test_the_schema_is_told_to_the_model_when_no_message_mentions_json(json_checkpoint):
    from mlx_openelm import load
    from mlx_openelm.serve.api import SamplingDefaults, parse_chat

    tokenizer = load(json_checkpoint)[1]
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    untold = [{"role": "user", "content": "How old is Felix?"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "Age", "schema": schema}}

    def prompt(messages, response_format):
        return parse_chat({"messages": messages, "response_format": response_format}, tokenizer, 4096,
                          SamplingDefaults()).spec.prompt

    told = [{"role": "system", "content": "Respond with JSON matching this schema: " + json.dumps(schema)}, *untold]
    assert prompt(untold, fmt) == tokenizer.apply_chat_template(told)
    assert prompt(untold, {"type": "json_object"}) == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Respond with a JSON object."}, *untold])
    assert prompt(ASK, fmt) == tokenizer.apply_chat_template(ASK)  # it says JSON: left as it is
    assert prompt(untold, {"type": "text"}) == tokenizer.apply_chat_template(untold)
