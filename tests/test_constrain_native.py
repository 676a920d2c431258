"""Tool calling through a chat template's own format (Hermes/Qwen ``<tool_call>`` JSON): detection,
the Lark grammar, the prompt against transformers' rendering, the parser against the openai client's
delta merging, and the trained model through the server and the openai client."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

openai = pytest.importorskip("openai")

from openai.lib.streaming._deltas import accumulate_delta  # noqa: E402

from mlx_openelm import load  # noqa: E402
from mlx_openelm.constrain import make_constraint  # noqa: E402
from mlx_openelm.constrain.native_tools import (HERMES, NativeToolParser, native_format,  # noqa: E402
                                                native_grammar)
from mlx_openelm.constrain.tool_output import tool_reply  # noqa: E402
from mlx_openelm.constrain.tools import plan_tools  # noqa: E402
from mlx_openelm.serve.api import SamplingDefaults, parse_chat  # noqa: E402
from mlx_openelm.tokenizer import Tokenizer  # noqa: E402

# Qwen2.5's tool format (tools in <tools>, calls as <tool_call> JSON, results in <tool_response>), trimmed.
TOOL_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}You are helpful.{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions. Signatures in <tools></tools>:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nReturn each call in <tool_call></tool_call> tags as JSON with name and arguments.<|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == "user" or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city, now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}]
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"$ref": "#/$defs/Zone"}}, "required": ["zone"], "additionalProperties": False,
    "$defs": {"Zone": {"enum": ["UTC", "CET"]}}}}}


def transformers_ids(hf, messages, **kwargs):
    out = hf.apply_chat_template(messages, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def call(name, arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def test_the_tool_call_json_family_is_recognised_and_others_fall_back():
    assert native_format(TOOL_TEMPLATE)[0] == HERMES
    coder = TOOL_TEMPLATE.replace('<tool_call>\\n{"name"', '<tool_call>\\n<function=')
    assert native_format(coder) == (None, "the chat template's tool markers (<function=) are not the "
                                          "<tool_call> JSON format")
    assert native_format("{{ tools }}[CALL]")[0] is None
    assert native_format("{{ messages }}")[1] == "the chat template does not render tools"


@pytest.fixture(scope="module")
def tokenizer(json_checkpoint):
    return load(json_checkpoint)[1]


def accepts(tokenizer, plan, reply: str) -> bool:
    matcher = make_constraint(tokenizer, grammar=native_grammar(plan)).matcher
    ids = tokenizer.encode(reply, add_bos=False)
    return matcher.validate_tokens(ids) == len(ids) and matcher.consume_tokens(ids) and matcher.is_accepting()


@pytest.mark.parametrize("choice, parallel, reply, ok", [
    ("auto", None, "It is sunny.", True),
    ("auto", None, call("get_weather", {"city": "Paris", "unit": "C"}), True),
    ("auto", None, call("get_weather", {"city": "Paris", "unit": "K"}), False),  # not in the enum
    ("auto", None, call("get_weather", {"unit": "C"}), False),  # city is required
    ("auto", None, call("get_time", {"zone": "CET"}) + "\n" + call("get_weather", {"city": "Rome"}), True),
    ("auto", False, call("get_time", {"zone": "CET"}) + "\n" + call("get_weather", {"city": "Rome"}), False),
    ("auto", None, call("get_time", {"zone": "PST"}), False),  # the hoisted $ref still holds
    ("required", None, "It is sunny.", False),
    ("required", None, call("get_time", {"zone": "UTC"}), True),
    ({"type": "function", "function": {"name": "get_time"}}, None, call("get_weather", {"city": "Rome"}), False),
    ({"type": "function", "function": {"name": "get_time"}}, None, call("get_time", {"zone": "UTC"}), True),
])
def test_the_grammar_holds_text_or_calls_that_follow_each_schema(tokenizer, choice, parallel, reply, ok):
    assert accepts(tokenizer, plan_tools(TOOLS + [TIME], choice, parallel), reply) is ok


def test_a_streamed_reply_merges_as_the_openai_client_merges_it():
    reply = call("get_weather", {"city": "Z\u00fcrich \\\"}", "unit": "C"}) + "\n" + call("get_time", {"zone": "UTC"})
    parser, merged = NativeToolParser(), {}
    for i in range(0, len(reply), 3):
        for delta in parser.feed(reply[i:i + 3]):
            merged = accumulate_delta(merged, delta)
    content, calls = parser.result()
    assert content is None and parser.complete
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Z\u00fcrich \\\"}", "unit": "C"}
    assert [(c["index"], c["id"], c["function"]) for c in merged["tool_calls"]] == [
        (i, c["id"], c["function"]) for i, c in enumerate(calls)]
    assert tool_reply(reply, "stop", NativeToolParser())[2] == "tool_calls"
    cut = tool_reply(reply[:30], "length", NativeToolParser())
    assert cut == (reply[:30], [], "length")
    text = NativeToolParser()
    assert text.feed("<to") == [] and text.feed("day") == [{"content": "<today"}] and text.result() == ("<today", [])


def tool_conversation(arguments):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Z\u00fcrich?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 degrees."}, {"role": "user", "content": "And tomorrow?"}]


def test_the_prompt_is_transformers_rendering_of_the_same_request(tmp_path, tokenizer_json_path):
    transformers = pytest.importorskip("transformers")
    shutil.copyfile(tokenizer_json_path, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": TOOL_TEMPLATE}))
    folder = tmp_path
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = Tokenizer(folder / "tokenizer.json", bos_id=1, eos_id=2)
    messages = tool_conversation('{"city": "Z\u00fcrich"}')  # OpenAI's JSON string, parsed before templating
    request = parse_chat({"messages": messages, "tools": TOOLS}, tok, 4096, SamplingDefaults())
    theirs = tool_conversation({"city": "Z\u00fcrich"})
    text = hf.apply_chat_template(theirs, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Z\u00fcrich"}}' in text
    assert request.spec.prompt == transformers_ids(hf, theirs, tools=TOOLS, add_generation_prompt=True)
    assert request.tools.native == HERMES and request.spec.constraint.kind == "grammar"
    assert "<tool_call>" in request.spec.constraint.source
    none = parse_chat({"messages": messages, "tools": TOOLS, "tool_choice": "none"}, tok, 4096, SamplingDefaults())
    assert none.tools is None and none.spec.constraint is None
    assert none.spec.prompt == transformers_ids(hf, theirs, add_generation_prompt=True)


@pytest.fixture(scope="module")
def client(trained_model_path, tmp_path_factory):
    from serving import KEY, start_server

    template = tmp_path_factory.mktemp("native") / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    server = start_server(trained_model_path, "--api-key", KEY, "--max-tokens", "80", "--model-id", "smol",
                          "--chat-template", str(template))
    yield openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0, "".join(server.log)


ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
STRICT = [{"type": "function", "function": {**TOOLS[0]["function"], "parameters": {
    **TOOLS[0]["function"]["parameters"], "additionalProperties": False}}}]


def test_the_trained_model_calls_a_tool_in_the_templates_format(client):
    completion = client.chat.completions.create(model="smol", messages=ASK, tools=STRICT, tool_choice="required",
                                                parallel_tool_calls=False)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    assert choice.message.content is None
    arguments = json.loads(choice.message.tool_calls[0].function.arguments)
    assert choice.message.tool_calls[0].function.name == "get_weather" and isinstance(arguments["city"], str)
    assert arguments.get("unit", "C") in ("C", "F")


def test_a_streamed_native_call_merges_to_the_whole_reply(client):
    stream = client.chat.completions.create(model="smol", messages=ASK, tools=STRICT + [TIME], stream=True,
                                            parallel_tool_calls=False,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}})
    merged, finish = {}, None
    for chunk in stream:
        if chunk.choices:
            merged = accumulate_delta(merged, chunk.choices[0].delta.model_dump(exclude_none=True))
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and not merged.get("content"), merged
    (only,) = merged["tool_calls"]
    assert only["index"] == 0 and only["function"]["name"] == "get_time"
    assert json.loads(only["function"]["arguments"])["zone"] in ("UTC", "CET")
