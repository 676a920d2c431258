"""Fault injection for the runtime core: absurd configs, bad prompts, bytes that are not UTF-8.

Each bad input must give a clear error of a documented type that names the key, file or
value at fault, never an error from deep inside MLX or SentencePiece (RuntimeError,
OverflowError, a raw TypeError), and must leave a chat session usable.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_openelm import generate, load, stream_generate
from mlx_openelm.chat import ChatSession
from mlx_openelm.config import KEYS, ModelArgs
from mlx_openelm.errors import (
    CheckpointError, ConfigError, ContextLengthError, OpenELMError, OptionError, PromptError, TokenizerError,
)
from mlx_openelm.sampling import make_sampler
from mlx_openelm.stopping import normalize_stops
from mlx_openelm.tokenizer import clean_text

from synthetic import TINY_CONFIG, write_hf_checkpoint

NOT_UTF8 = b"caf\xe9 \xff ok".decode("utf-8", errors="surrogateescape")  # as argv/stdin carry such bytes
PROMPT_KINDS = "prompt must be a str, or a sequence or 1-D mx.array of int token ids"


# ---- absurd configs, through the loader and the command line ------------------------------

ABSURD = [
    ({"num_transformer_layers": 100000}, "'num_transformer_layers' is 100000, over the limit of 1024"),
    ({"vocab_size": 10**12}, "'vocab_size' is 1000000000000, over the limit of 2097152"),
    ({"rope_freq_constant": 0}, "'rope_freq_constant' must be positive, got 0.0"),
    ({"rope_freq_constant": math.nan}, "'rope_freq_constant' must be a finite number, got nan"),
    ({"model_dim": 2**40}, "'model_dim' is 1099511627776, over the limit of 65536"),
    ({"max_context_length": -5}, "'max_context_length' must be positive, got -5"),
]


def _folder_with_config(tmp_path, tiny_weights, tokenizer_path, changes):
    folder = write_hf_checkpoint(tmp_path / "model", TINY_CONFIG, tiny_weights, tokenizer=tokenizer_path)
    config = {**TINY_CONFIG, **changes}
    (folder / "config.json").write_text(json.dumps(config))  # json writes NaN as the NaN literal
    return folder


@pytest.mark.parametrize("changes, message", ABSURD)
def test_absurd_config_values_fail_fast_when_loading(tmp_path, tiny_weights, tokenizer_path, changes, message):
    folder = _folder_with_config(tmp_path, tiny_weights, tokenizer_path, changes)
    with pytest.raises(ConfigError) as info:
        load(folder)
    assert str(info.value) == f"{folder / 'config.json'}: {message}" or str(info.value).startswith(
        f"{folder / 'config.json'}: {message} ("
    )


def test_absurd_config_gives_a_one_line_error_from_the_command_line(tmp_path, tiny_weights, tokenizer_path):
    folder = _folder_with_config(tmp_path, tiny_weights, tokenizer_path, {"num_transformer_layers": 100000})
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_openelm.cli", "generate", "--model", str(folder), "-p", "hi", "-m", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: {folder / 'config.json'}: {ABSURD[0][1]} (see mlx_openelm.config.KEYS)"]


def test_any_non_finite_number_in_a_config_is_refused():
    for key, spec in KEYS.items():
        for bad in (math.nan, math.inf, -math.inf):
            if spec.kind is float:
                value, message = ([0.5, bad, 1.5], f"'{key}'[1]") if spec.is_list else (bad, f"'{key}'")
                message += f" must be a finite number, got {bad}"
            elif spec.kind is int and not spec.is_list:
                value, message = bad, f"'{key}' must be int, got {bad}"
            else:
                continue
            with pytest.raises(ConfigError) as info:
                ModelArgs.from_dict({**TINY_CONFIG, key: value})
            assert str(info.value) == f"config.json: {message}"


# ---- prompts that are not prompts ------------------------------------------------------------

@pytest.mark.parametrize(
    "prompt, got",
    [
        (b"hi", "got bytes"),
        (bytearray(b"hi"), "got bytearray"),
        (None, "got NoneType"),
        (42, "got int"),
        ([1, "a"], "got a list holding a str"),
        ([1, 2.0], "got a list holding a float"),
        ((1, True), "got a tuple holding a bool"),
        (mx.array([[1, 2]]), "got an mx.array of shape (1, 2) and dtype mlx.core.int32"),
        (mx.array([1.0, 2.0]), "got an mx.array of shape (2,) and dtype mlx.core.float32"),
    ],
)
def test_a_prompt_of_the_wrong_kind_is_refused_saying_what_a_prompt_may_be(loaded, prompt, got):
    model, tokenizer = loaded
    with pytest.raises(ValueError) as info:
        generate(model, tokenizer, prompt, max_tokens=2)
    assert str(info.value) == f"{PROMPT_KINDS}; {got}"


def test_token_id_prompts_of_every_accepted_kind_give_the_same_text(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode("Once upon a time")
    expected = generate(model, tokenizer, "Once upon a time", max_tokens=4)
    for prompt in (ids, tuple(ids), mx.array(ids), mx.array(ids, dtype=mx.uint32)):
        assert generate(model, tokenizer, prompt, max_tokens=4) == expected


# ---- bytes that are not UTF-8 ----------------------------------------------------------------

def test_a_prompt_with_invalid_utf8_is_refused_not_a_sentencepiece_crash(loaded):
    model, tokenizer = loaded
    with pytest.raises(PromptError) as info:
        list(stream_generate(model, tokenizer, NOT_UTF8, max_tokens=2))
    assert isinstance(info.value, ValueError) and isinstance(info.value, OpenELMError)
    assert str(info.value).startswith("prompt contains bytes that are not valid UTF-8 (byte 0xe9 at character 3)")
    cleaned, replaced = clean_text(NOT_UTF8)
    assert replaced and cleaned == "caf\ufffd \ufffd ok"
    assert generate(model, tokenizer, cleaned, max_tokens=3) == generate(
        model, tokenizer, b"caf\xe9 \xff ok".decode("utf-8", errors="replace"), max_tokens=3
    )


def test_a_chat_line_with_invalid_utf8_is_refused_and_the_session_goes_on(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system="Be brief.")
    first = [r.token for r in session.send("Hello there", max_tokens=4)]
    before = ([dict(m) for m in session.messages], list(session.cached_ids))
    with pytest.raises(PromptError, match=r"message 3 \(user\) contains bytes that are not valid UTF-8"):
        list(session.send(NOT_UTF8, max_tokens=4))
    assert (session.messages, session.cached_ids) == before
    reply = [r.token for r in session.send(clean_text(NOT_UTF8)[0], max_tokens=4)]
    assert len(first) == len(reply) == 4 and session.messages[-2]["content"] == "caf\ufffd \ufffd ok"
    with pytest.raises(PromptError, match=r"message 0 \(system\) contains bytes"):
        list(ChatSession(model, tokenizer, system=NOT_UTF8).send("hi", max_tokens=2))


# ---- model folders with something odd in them (found by the issue 8 audit) ----------------------

def _odd_folder(tmp_path, hf_checkpoint, odd):
    folder = tmp_path / "model"
    shutil.copytree(hf_checkpoint, folder)
    odd(folder)
    return folder


def _not_utf8_config(folder):
    (folder / "config.json").write_bytes(b'{"model_type": "openelm", "note": "\xff"}')


def _not_utf8_index(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xfe": "x"}}')


def _deeply_nested_config(folder):
    (folder / "config.json").write_text("[" * 100000 + "]" * 100000)


def _huge_number_in_config(folder):
    (folder / "config.json").write_text('{"vocab_size": ' + "9" * 5000 + "}")


def _deeply_nested_index(folder):
    _not_utf8_index(folder)
    (folder / "model.safetensors.index.json").write_text("[" * 100000 + "]" * 100000)


def _weights_a_folder(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()


def _weights_a_dangling_link(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(folder / "gone.safetensors")


@pytest.mark.parametrize("odd, error, message", [
    (_not_utf8_config, ConfigError, "config.json: not UTF-8 text (byte 0xff at offset 35)"),
    (_not_utf8_index, CheckpointError, "model.safetensors.index.json: not a valid safetensors index ('utf-8' codec"),
    (_deeply_nested_config, ConfigError, "config.json: not valid JSON (maximum recursion depth exceeded"),
    (_huge_number_in_config, ConfigError, "config.json: not valid JSON (Exceeds the limit (4300 digits)"),
    (_deeply_nested_index, CheckpointError, "model.safetensors.index.json: not a valid safetensors index (maximum"),
    (_weights_a_folder, CheckpointError, "model.safetensors: not a regular file"),
    (_weights_a_dangling_link, CheckpointError, "model.safetensors: not a regular file"),
])
def test_odd_model_folders_are_refused_naming_the_file(tmp_path, hf_checkpoint, odd, error, message):
    folder = _odd_folder(tmp_path, hf_checkpoint, odd)
    with pytest.raises(error) as info:
        load(folder)
    assert str(info.value).startswith(f"{folder}/{message}"), str(info.value)


def test_a_file_or_an_empty_folder_is_said_to_be_no_model_before_any_tokenizer_question(tmp_path, hf_checkpoint):
    with pytest.raises(CheckpointError, match="expected a model folder .* got a file"):
        load(hf_checkpoint / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "empty")
    assert str(info.value) == f"{tmp_path / 'empty' / 'config.json'}: config file not found"


# ---- option values the libraries refuse ----------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 2**64, "7", 1.5, True])
def test_a_seed_mlx_cannot_hold_is_an_option_error(seed):
    with pytest.raises(OptionError, match=r"seed must be an integer from 0 to 2\*\*64 - 1"):
        make_sampler(temp=1.0, seed=seed)
    with pytest.raises(OptionError):
        make_sampler(temp=0.0, seed=seed)  # refused even where greedy would not use it
    make_sampler(temp=1.0, seed=2**64 - 1)


def test_an_empty_stop_string_is_an_option_error():
    with pytest.raises(OptionError, match="stop strings must be non-empty strings, got ''"):
        normalize_stops(["ok", ""])


def test_a_system_prompt_leaving_no_room_for_a_message_is_refused_up_front(loaded):
    model, tokenizer = loaded
    with pytest.raises(ContextLengthError, match=r"the system prompt takes \d+ tokens, .* context of 2048 tokens"):
        ChatSession(model, tokenizer, system="word " * 2100)
    assert len(list(ChatSession(model, tokenizer, system="word " * 100).send("hi", max_tokens=2))) == 2


def test_a_draft_model_that_is_not_a_model_is_a_type_error_saying_what_to_pass(loaded):
    model, tokenizer = loaded
    with pytest.raises(TypeError, match=r"draft_model must be a loaded model \(mlx_openelm.load_model\(path\)\), got str"):
        list(stream_generate(model, tokenizer, "hi", max_tokens=2, draft_model="./draft"))


def test_a_quantization_group_size_that_does_not_divide_a_layer_is_a_config_error(tmp_path, hf_checkpoint):
    from mlx_openelm.convert import convert

    folder = tmp_path / "q4"
    convert(hf_checkpoint, folder, bits=4, group_size=32, evaluate=False, dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    config["quantization"]["group_size"] = 64  # the weights were packed with 32; an FFN input is 32 wide
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        load(folder)
    assert str(info.value) == (f"{folder / 'config.json'}: quantization gives 'transformer.layers.0.ffn.proj_2' "
                               "group size 64, which does not divide its input width 32")


def test_an_empty_model_or_tokenizer_path_is_refused_not_read_as_the_current_folder(hf_checkpoint, monkeypatch):
    monkeypatch.chdir(hf_checkpoint)  # a model here would otherwise load
    with pytest.raises(CheckpointError, match="the model path is empty"):
        load("")
    with pytest.raises(TokenizerError, match="the tokenizer path is empty"):
        load(hf_checkpoint, tokenizer=" ")


def test_a_weight_too_large_for_the_compute_dtype_is_said_as_such_not_as_nan(tmp_path, tiny_weights, tokenizer_path):
    weights = dict(tiny_weights)
    name = "transformer.layers.0.attn.qkv_proj.weight"
    weights[name] = weights[name].copy()
    weights[name].flat[0] = 1e6  # finite in the float32 file, inf in float16
    folder = write_hf_checkpoint(tmp_path / "model", TINY_CONFIG, weights, tokenizer=tokenizer_path)
    with pytest.raises(CheckpointError) as info:
        load(folder, dtype="float16")
    assert str(info.value) == (f"{folder}: tensor '{name}' holds values too large for float16 (the compute dtype); "
                               "load it in float32 or bfloat16 (`dtype`)")
    assert load(folder, dtype="bfloat16")[0].args.model_dim == TINY_CONFIG["model_dim"]


def test_a_context_too_small_for_the_chat_format_is_refused_when_the_session_starts(loaded):
    model, tokenizer = loaded
    tiny_context = type(model)(ModelArgs.from_dict({**TINY_CONFIG, "max_context_length": 8}))
    with pytest.raises(ContextLengthError, match=r"the chat format alone takes \d+ tokens, .* context of 8 tokens$"):
        ChatSession(tiny_context, tokenizer)
