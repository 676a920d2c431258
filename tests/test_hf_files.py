"""Hugging Face tokenizer files: transformers and mlx-lm read our folders as we do."""

from __future__ import annotations

import json
import shutil

import pytest

from mlx_openelm.hf_files import CHAT_TEMPLATE, write_tokenizer_files
from mlx_openelm.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "Héllo wörld 🎉 日本語"},
    ],
    [{"role": "user", "content": "  leading spaces\n\nand\ttabs "}],
    [{"role": "system", "content": " Be brief."}, {"role": "user", "content": ""}],
]


@pytest.fixture()
def tokenizer_folder(tokenizer_path, tmp_path):
    shutil.copyfile(tokenizer_path, tmp_path / "tokenizer.model")
    written = write_tokenizer_files(tmp_path, max_length=2048)
    assert sorted(p.name for p in written) == [
        "generation_config.json", "special_tokens_map.json", "tokenizer_config.json"
    ]
    return tmp_path


def hf_template_ids(tokenizer, messages, add_generation_prompt):
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_files_name_the_special_tokens_and_legacy_mode(tokenizer_folder):
    config = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["legacy"] is True and config["chat_template"] == CHAT_TEMPLATE
    assert config["model_max_length"] == 2048 and config["add_bos_token"] and not config["add_eos_token"]
    special = json.loads((tokenizer_folder / "special_tokens_map.json").read_text())
    assert special == {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    generation = json.loads((tokenizer_folder / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


def test_no_tokenizer_model_writes_nothing(tmp_path):
    assert write_tokenizer_files(tmp_path) == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_transformers_auto_tokenizer_gives_our_template_ids(tokenizer_folder, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
    ours = Tokenizer(tokenizer_folder / "tokenizer.model")
    for messages in CONVERSATIONS:
        expected = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert hf_template_ids(hf, messages, add_generation_prompt) == expected, messages
    assert hf("Once upon a time")["input_ids"] == ours.encode("Once upon a time")


def test_transformers_template_refuses_unknown_roles(tokenizer_folder):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
    with pytest.raises(Exception, match="roles are system, user and assistant"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_mlx_lm_load_opens_a_converted_folder(hf_checkpoint, tmp_path):
    pytest.importorskip("transformers")
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    import mlx.core as mx

    from mlx_openelm.convert import convert

    out = tmp_path / "converted"
    convert(hf_checkpoint, out, dtype="float32", evaluate=False)
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    model, wrapper = mlx_lm_utils.load(str(out))
    ours = Tokenizer(out / "tokenizer.model")
    for messages in CONVERSATIONS[:3]:
        assert hf_template_ids(wrapper, messages, True) == ours.apply_chat_template(messages)
    assert 2 in wrapper.eos_token_ids
    logits = model(mx.array([ours.encode("Once upon a time")]))
    assert logits.shape[-1] == 384


def test_mlx_lm_chat_runs_on_a_converted_folder(hf_checkpoint, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("mlx_lm.chat")
    import subprocess
    import sys

    from mlx_openelm.convert import convert

    out = tmp_path / "converted"
    convert(hf_checkpoint, out, dtype="float32", evaluate=False)
    result = subprocess.run([sys.executable, "-m", "mlx_lm", "chat", "--model", str(out), "--max-tokens", "5"],
                            input="hi\nq\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stdout and "bye" in result.stdout and "Traceback" not in result.stderr  # one reply


# ---- a tokenizer.json model ---------------------------------------------------------------

def test_converting_a_tokenizer_json_folder_gives_a_folder_everyone_opens(json_checkpoint, tmp_path):
    """The tokenizer.json is copied as it is; the files written beside it name the model's BOS/EOS
    and the chat template, so transformers, mlx-lm and we produce the same ids."""
    transformers = pytest.importorskip("transformers")
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlx_openelm import load
    from mlx_openelm.convert import convert

    out = tmp_path / "converted"
    report = convert(json_checkpoint, out, dtype="float32", evaluate=False)
    assert report.tokenizer == str(json_checkpoint / "tokenizer.json") and not (out / "tokenizer.model").exists()
    assert (out / "tokenizer.json").read_bytes() == (json_checkpoint / "tokenizer.json").read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["tokenizer_class"], config["bos_token"], config["eos_token"]) == (
        "PreTrainedTokenizerFast", "<|im_start|>", "<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    _model, ours = load(out)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    _mlx_model, wrapper = mlx_lm_utils.load(str(out))
    for messages in CONVERSATIONS:
        expected = ours.apply_chat_template(messages)
        assert hf_template_ids(hf, messages, True) == expected == hf_template_ids(wrapper, messages, True), messages
    assert 2 in wrapper.eos_token_ids
    text = "Héllo wörld 🎉"
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text, add_bos=False)


def test_a_tokenizer_json_keeps_the_files_that_came_with_it(json_checkpoint, tmp_path):
    from mlx_openelm.convert import convert

    source = tmp_path / "source"
    shutil.copytree(json_checkpoint, source)
    theirs = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "chat_template": "{{ 'their own template' }}"}
    (source / "tokenizer_config.json").write_text(json.dumps(theirs))
    out = tmp_path / "converted"
    convert(source, out, dtype="float32", evaluate=False)
    assert json.loads((out / "tokenizer_config.json").read_text()) == theirs
    assert json.loads((out / "special_tokens_map.json").read_text()) == {"bos_token": "<|im_start|>",
                                                                         "eos_token": "<|im_end|>"}


def test_convert_tokenizer_option_takes_a_tokenizer_json(sharded_checkpoint, tokenizer_json_path, tmp_path):
    from mlx_openelm import load
    from mlx_openelm.convert import convert

    out = tmp_path / "converted"
    convert(sharded_checkpoint, out, dtype="float32", evaluate=False, tokenizer=tokenizer_json_path)
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.model").exists()
    _model, tok = load(out)
    assert tok.path == out / "tokenizer.json" and tok.encode("Once", add_bos=True)[0] == 1


def test_our_openelm_template_in_a_folder_renders_as_the_built_in_format(tokenizer_folder, tokenizer_path):
    """The converter writes OpenELM-Instruct's format as Jinja for other tools; our tokenizer renders
    such a folder with the built-in format, where text a user types (a literal "</s>") stays text."""
    messages = [{"role": "user", "content": "a </s> typed"}]
    in_folder = Tokenizer(tokenizer_folder / "tokenizer.model")
    bare = Tokenizer(tokenizer_path)
    assert in_folder.chat_template is None
    ids = in_folder.apply_chat_template(messages)
    assert ids == bare.apply_chat_template(messages)
    assert ids.count(in_folder.eos_id) == 1  # the template's own </s> only
