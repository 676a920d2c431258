"""The folder's chat template against transformers' `apply_chat_template` (text and ids), hostile
templates, and the folder's other conventions: BOS, generation_config.json, every EOS id."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from mlx_openelm.errors import ChatTemplateError, ConfigError
from mlx_openelm.generation_config import read_generation_defaults
from mlx_openelm.tokenizer import ChatTemplate, Tokenizer
from mlx_openelm.tokenizer.common import OPENELM_CHAT_TEMPLATE

CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is the capital of France? Say it with \"quotes\" & <b>tags</b>, é."},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]

# Hermes/Qwen style: tools as JSON in the system turn, <tool_call> blocks, tool results as user turns.
TOOL_TEMPLATE = """\
{%- set ns = namespace(system=none, tool_turns=0) %}
{%- if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] %}{% endif %}
{{- '<|im_start|>system\\n' + (ns.system or 'You are helpful.') }}
{%- if tools %}
{{- '\\n# Tools\\n<tools>' }}
{%- for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}
{{- '\\n</tools>' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in messages %}
{%- if message['role'] == 'system' %}{% continue %}{% endif %}
{%- if message['role'] not in ['user', 'assistant', 'tool'] %}
{{- raise_exception('unknown role ' + message['role']) }}
{%- endif %}
{%- if message['role'] == 'tool' %}
{%- set ns.tool_turns = ns.tool_turns + 1 %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] if message['content'] is defined else '') }}
{%- for call in message.get('tool_calls', []) %}
{{- '<tool_call>\\n' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}
{{- '\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city, now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}]


def tool_conversation(arguments):
    return [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    ]


def folder_with(tmp_path, tokenizer_json_path, config: dict, name="folder"):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copyfile(tokenizer_json_path, folder / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def transformers_ids(hf, messages, **kwargs):
    out = hf.apply_chat_template(messages, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


# ---- rendering as transformers does -----------------------------------------------------------------

@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("turns", [1, 2, 4])
def test_smollm2_template_equals_transformers(trained_model_path, turns, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(trained_model_path))
    tok = Tokenizer(trained_model_path / "tokenizer.json", bos_id=1, eos_id=2)
    assert tok.chat_template.origin == str(trained_model_path / "tokenizer_config.json")
    messages = CONVERSATION[1:turns + 1] if turns < 4 else CONVERSATION  # without and with a system message
    text = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == transformers_ids(hf, messages, add_generation_prompt=add_generation_prompt)
    assert ids.count(1) == ids.count(2) + add_generation_prompt  # <|im_start|> ... <|im_end|>, no extra BOS


def test_tool_template_equals_transformers(tmp_path, tokenizer_json_path):
    transformers = pytest.importorskip("transformers")
    folder = folder_with(tmp_path, tokenizer_json_path, {"chat_template": TOOL_TEMPLATE})
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = Tokenizer(folder / "tokenizer.json", bos_id=1, eos_id=2)
    assert tok.chat_template.supports_tools
    theirs = tool_conversation({"city": "Zürich", "unit": "C"})
    ours = tool_conversation('{"city": "Zürich", "unit": "C"}')  # OpenAI's JSON string, parsed before templating
    text = tok.render_chat(ours, tools=TOOLS)
    assert text == hf.apply_chat_template(theirs, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '"city": "Zürich"' in text and "<tool_response>" in text and "# Tools" in text
    assert tok.apply_chat_template(ours, tools=TOOLS) == transformers_ids(hf, theirs, tools=TOOLS,
                                                                          add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config.json: the chat template refused the messages: "
                                                r"unknown role critic$"):
        tok.apply_chat_template([{"role": "critic", "content": "no"}])


def test_named_templates_pick_tool_use_when_tools_are_given(tmp_path, tokenizer_json_path):
    transformers = pytest.importorskip("transformers")
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    folder = folder_with(tmp_path, tokenizer_json_path, {"chat_template": [
        {"name": "default", "template": plain}, {"name": "tool_use", "template": TOOL_TEMPLATE}]})
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = Tokenizer(folder / "tokenizer.json", bos_id=1, eos_id=2)
    messages = CONVERSATION[1:2]
    for tools in (None, TOOLS):
        assert tok.render_chat(messages, tools=tools) == hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(messages).startswith("user: ") and tok.chat_template.supports_tools


def test_chat_template_jinja_file_wins_over_tokenizer_config(tmp_path, tokenizer_json_path):
    folder = folder_with(tmp_path, tokenizer_json_path, {"chat_template": TOOL_TEMPLATE})
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tok = Tokenizer(folder / "tokenizer.json", bos_id=1, eos_id=2)
    assert tok.render_chat(CONVERSATION[1:3]) == f"[{CONVERSATION[1]['content']}][Paris.]"
    assert tok.chat_template.origin == str(folder / "chat_template.jinja") and not tok.chat_template.supports_tools


def test_openelm_template_equals_transformers_and_the_builtin_format(tmp_path, tokenizer_path):
    """The converter's OpenELM-Instruct template, rendered by Jinja, gives the built-in format's ids
    (which a folder without a template uses, exactly as before) and transformers' own."""
    transformers = pytest.importorskip("transformers")
    from mlx_openelm.hf_files import CHAT_TEMPLATE, write_tokenizer_files

    folder = tmp_path / "openelm"
    folder.mkdir()
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    bare = Tokenizer(folder / "tokenizer.model")
    assert bare.chat_template is None and bare.add_bos
    builtin = bare.apply_chat_template(CONVERSATION)
    write_tokenizer_files(folder)
    tok = Tokenizer(folder / "tokenizer.model")
    assert tok.chat_template is None  # our own template: the built-in format renders the folder
    jinja = Tokenizer(folder / "tokenizer.model")
    jinja.chat_template = ChatTemplate(CHAT_TEMPLATE, folder / "tokenizer_config.json")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert jinja.render_chat(CONVERSATION) == hf.apply_chat_template(CONVERSATION, tokenize=False,
                                                                     add_generation_prompt=True)
    assert tok.apply_chat_template(CONVERSATION) == jinja.apply_chat_template(CONVERSATION) == builtin \
        == transformers_ids(hf, CONVERSATION, add_generation_prompt=True)
    with pytest.raises(ValueError, match="no tools"):
        bare.apply_chat_template(CONVERSATION, tools=TOOLS)


# ---- hostile templates ---------------------------------------------------------------------------------

HOSTILE = {
    "sandbox": ("{{ ''.__class__.__mro__ }}", "sandbox forbids"),
    "endless loop": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "took more than 0.5 s"),
    "gigabyte loop": ("{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 100 }}{% endfor %}"
                      "{% endfor %}", "exceeds 1000000 characters|took more than"),
    "gigabyte string": ("{{ 'x' * 1000000000 }}", "repetition would exceed"),
    "wide filter": ("{{ 'x' | center(1000000000) }}", "center filter would exceed"),
    "wide method": ("{{ 'x'.ljust(1000000000) }}", "ljust would exceed"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    "syntax": ("{% for %}", "not valid Jinja"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_template_is_a_one_line_error_in_bounded_time(tmp_path, case):
    source, reason = HOSTILE[case]
    path = tmp_path / "evil.jinja"
    path.write_text(source)
    # A short clock where the clock is the guard under test; elsewhere room for a loaded machine, so
    # the guard named in `reason` (not the clock) is the one that stops the template.
    max_seconds = 0.5 if "took more than" in reason else 3.0
    start = time.monotonic()
    with pytest.raises(ChatTemplateError) as raised:
        ChatTemplate.from_file(path, max_seconds=max_seconds, max_chars=1_000_000).render(CONVERSATION)
    message = str(raised.value)
    assert time.monotonic() - start < 5
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400, message
    assert __import__("re").search(reason, message), message


def test_a_hostile_folder_template_fails_the_command_with_one_line(invoke_cli, tmp_path, json_checkpoint):
    folder = tmp_path / "model"
    shutil.copytree(json_checkpoint, folder)
    (folder / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")
    result = invoke_cli("generate", "--model", str(folder), "--chat", "-p", "hi", "-m", "2", "-q")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {folder / 'chat_template.jinja'}: the chat template did something its sandbox forbids "
        "(access to attribute '__class__' of 'str' object is unsafe.)"], result.output


def test_chat_template_option_overrides_the_folder(invoke_cli, tmp_path, json_checkpoint):
    """... and an OpenELM folder (config.json's architectures) keeps Apple's 1.2 repetition penalty by default."""
    from mlx_openelm import load
    from mlx_openelm.generation import generate
    from mlx_openelm.sampling import make_logits_processors

    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
                        "{% endfor %}<|im_start|>")
    model, tok = load(json_checkpoint, chat_template=template)
    ids = tok.apply_chat_template([{"role": "user", "content": "Once upon"}])
    assert ids[:1] == [1] and ids[-1] == 1 and tok.chat_template.origin == str(template)
    expected = generate(model, tok, ids, max_tokens=6, logits_processors=make_logits_processors(1.2))
    assert expected != generate(model, tok, ids, max_tokens=6)  # the penalty matters here
    result = invoke_cli("generate", "--model", str(json_checkpoint), "--chat-template", str(template), "-p",
                        "Once upon", "-m", "6", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["text"] == expected and out["prompt_tokens"] == len(ids)
    missing = invoke_cli("chat", "--model", str(json_checkpoint), "--chat-template", str(tmp_path / "nope.jinja"))
    assert missing.exit_code != 0 and "nope.jinja" in missing.output


# ---- generation_config.json and EOS ids ------------------------------------------------------------

def write_folder(tmp_path, config: dict, generation: dict | None = None):
    folder = tmp_path / "f"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_generation_defaults_follow_transformers_and_openelm_keeps_its_penalty(tmp_path, tiny_config):
    other = {**tiny_config, "architectures": ["LlamaForCausalLM"]}
    unnamed = {k: v for k, v in tiny_config.items() if k != "architectures"}  # converted before the key was kept
    assert read_generation_defaults(write_folder(tmp_path, tiny_config)).repetition_penalty == 1.2
    assert read_generation_defaults(write_folder(tmp_path, unnamed)).repetition_penalty == 1.2
    plain = read_generation_defaults(write_folder(tmp_path, other, {"temperature": 0.7, "eos_token_id": [2, 0]}))
    # no do_sample: greedy, as transformers (temperature unused); every EOS id listed
    assert (plain.temperature, plain.repetition_penalty, plain.eos_token_ids) == (0.0, 1.0, frozenset({0, 2}))
    sampled = read_generation_defaults(write_folder(tmp_path, tiny_config, {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.05, "max_new_tokens": 64}))
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.repetition_penalty, sampled.max_tokens) == \
        (0.7, 0.9, 50, 1.05, 64)
    folder = write_folder(tmp_path, other, {"top_p": 2})
    with pytest.raises(ConfigError, match=r"generation_config.json: 'top_p' must be a number > 0 and <= 1, got 2"):
        read_generation_defaults(folder)


def test_every_eos_id_of_generation_config_ends_a_reply(tmp_path, json_checkpoint):
    from mlx_openelm import load
    from mlx_openelm.generation import generate_step, stream_generate

    _model, tok = load(json_checkpoint)
    model = _model
    prompt = tok.encode("Once upon a time", add_bos=True)
    greedy = [s.token for s in generate_step(prompt, model, max_tokens=8)]
    stop_at = next(i for i, t in enumerate(greedy) if t not in greedy[:i] and t != tok.eos_id)
    folder = tmp_path / "model"
    shutil.copytree(json_checkpoint, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, greedy[stop_at]]}))
    model, tok = load(folder)
    assert tok.eos_ids == {2, greedy[stop_at]}
    steps = list(stream_generate(model, tok, prompt, max_tokens=8))
    assert [s.token for s in steps] == greedy[:stop_at + 1] and steps[-1].finish_reason == "stop"


# ---- the trained model: its own BOS rule and template --------------------------------------------

def test_greedy_continuation_equals_mlx_lm_on_the_trained_model(invoke_cli, trained_model_path):
    """SmolLM2's tokenizer adds no BOS: our `generate` of a plain prompt is mlx-lm's greedy continuation."""
    mlx_lm = pytest.importorskip("mlx_lm")
    prompt = "def fibonacci(n):\n    \"\"\""
    model, tokenizer = mlx_lm.load(str(trained_model_path))
    theirs = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12, verbose=False)
    result = invoke_cli("generate", "--model", str(trained_model_path), "-p", prompt, "-m", "12", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["text"] == theirs and out["prompt_tokens"] == len(tokenizer.encode(prompt))


def test_server_messages_go_through_the_template_tool_calls_included(tmp_path, tokenizer_json_path):
    from mlx_openelm.serve.api import APIError, SamplingDefaults, parse_chat

    folder = folder_with(tmp_path, tokenizer_json_path, {"chat_template": TOOL_TEMPLATE})
    tok = Tokenizer(folder / "tokenizer.json", bos_id=1, eos_id=2)
    messages = tool_conversation('{"city": "Zürich"}')
    messages[2]["content"] = None  # OpenAI's assistant turn that only calls tools
    request = parse_chat({"messages": messages}, tok, 2048, SamplingDefaults())
    assert request.spec.prompt == tok.apply_chat_template(tool_conversation({"city": "Zürich"}))
    with pytest.raises(APIError) as refused:
        parse_chat({"messages": [{"role": "developer", "content": "x"}, {"role": "tool", "content": "y"},
                                 {"role": "critic", "content": "z"}]}, tok, 2048, SamplingDefaults())
    assert refused.value.status == 400 and refused.value.param == "messages[2].role"
    bare = Tokenizer(tokenizer_json_path, bos_id=1, eos_id=2)  # no template: OpenELM's roles only
    with pytest.raises(APIError, match="must be one of system, user, assistant, got 'critic'"):
        parse_chat({"messages": [{"role": "critic", "content": "y"}]}, bare, 2048, SamplingDefaults())
    with pytest.raises(APIError, match="a tool message needs the id of the call it answers"):  # generic format
        parse_chat({"messages": [{"role": "tool", "content": "y"}]}, bare, 2048, SamplingDefaults())


def test_convert_keeps_the_folders_conventions(tmp_path, json_checkpoint, hf_checkpoint):
    """A tokenizer.json folder's template files and generation_config.json travel; config.json keeps
    `architectures` (so an OpenELM stays one); a tokenizer.model folder gets OpenELM's template written."""
    from mlx_openelm import load
    from mlx_openelm.convert import convert

    source = tmp_path / "source"
    shutil.copytree(json_checkpoint, source)
    (source / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "repetition_penalty": 1.1}))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "architectures"}))
    out = tmp_path / "out"
    convert(source, out, dtype="float32", evaluate=False)
    _model, tok = load(out)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<hi>" and tok.eos_ids == {0, 2}
    assert read_generation_defaults(out).repetition_penalty == 1.1
    assert "architectures" not in json.loads((out / "config.json").read_text())
    openelm = tmp_path / "openelm"
    convert(hf_checkpoint, openelm, dtype="float32", evaluate=False)
    assert json.loads((openelm / "config.json").read_text())["architectures"] == ["OpenELMForCausalLM"]
    assert read_generation_defaults(openelm).repetition_penalty == 1.2
    _model, tok = load(openelm)
    config = json.loads((openelm / "tokenizer_config.json").read_text())
    assert config["chat_template"] == OPENELM_CHAT_TEMPLATE  # written for other tools ...
    assert tok.chat_template is None and tok.add_bos  # ... rendered by the built-in format here


def test_generation_blocks_render_as_transformers_renders_them(tmp_path, tokenizer_json_path):
    transformers = pytest.importorskip("transformers")
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}"
                "<|im_end|>{% endif %}\n{% endfor %}")
    folder = folder_with(tmp_path, tokenizer_json_path, {"chat_template": template})
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = Tokenizer(folder / "tokenizer.json", bos_id=1, eos_id=2)
    text = tok.render_chat(CONVERSATION, add_generation_prompt=False)
    assert "Paris.<|im_end|>" in text
    assert text == hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=False)


def test_smollm2_conversations_grow_by_appending_so_caches_hit(trained_model_path):
    """The server's prompt cache and ChatSession reuse the previous turn's tokens: with the folder's
    ChatML template, a turn's prompt plus the reply and its EOS is a prefix of the next turn's prompt."""
    tok = Tokenizer(trained_model_path / "tokenizer.json", bos_id=1, eos_id=2)
    messages = CONVERSATION[:2]
    for reply, question in [("Paris, of course.", "And of Italy?"), ("Rome.\n\nIt is.", "Why?")]:
        prompt = tok.apply_chat_template(messages)
        messages = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": question}]
        following = tok.apply_chat_template(messages)
        answered = prompt + tok.encode(reply, add_bos=False) + [tok.eos_id]
        assert following[:len(answered)] == answered
