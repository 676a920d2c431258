"""Loading HF-format checkpoints: layouts, dtypes, and errors that name what is wrong."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import reference
from mlx_openelm import load, load_model
from mlx_openelm.errors import CheckpointError, ConfigError, TokenizerError
from mlx_openelm.loading import default_dtype, model_dtype, parse_dtype
from mlx_openelm.config import preset_args
from synthetic import TINY_CONFIG, random_weights, write_hf_checkpoint

TOKENS = np.array([1, 17, 300, 42, 5, 99, 250, 7])


def _logits(model) -> np.ndarray:
    return np.array(model(mx.array(TOKENS)[None]).astype(mx.float32))[0]


def test_sharded_checkpoint_equals_single_file(hf_checkpoint, sharded_checkpoint):
    assert len(list(sharded_checkpoint.glob("model-*.safetensors"))) == 3
    np.testing.assert_array_equal(_logits(load_model(sharded_checkpoint)), _logits(load_model(hf_checkpoint)))


def test_bf16_checkpoint_is_within_bf16_round_off(bf16_checkpoint, tiny_weights):
    model = load_model(bf16_checkpoint, dtype="float32")
    expected = reference.forward(tiny_weights, TINY_CONFIG, TOKENS)
    error = np.abs(_logits(model) - expected).max()
    assert 1e-4 < error < 0.05 * np.abs(expected).max()  # bf16 weights: visible but small error


def test_compute_dtype_defaults_to_float32_on_cpu(hf_checkpoint, bf16_checkpoint):
    if mx.default_device() != mx.cpu:
        pytest.skip("CPU backend only")
    assert model_dtype(load_model(bf16_checkpoint)) == mx.float32
    assert model_dtype(load_model(hf_checkpoint, dtype="bfloat16")) == mx.bfloat16


def test_gpu_default_never_uses_float16_for_3b():
    args_3b, args_270m = preset_args("3B"), preset_args("270M")
    if mx.default_device() == mx.cpu:
        assert default_dtype(args_3b) == default_dtype(args_270m) == mx.float32
    else:
        assert default_dtype(args_3b) == mx.bfloat16
        assert default_dtype(args_270m, stored=mx.bfloat16) == mx.bfloat16


def test_parse_dtype_names_the_option():
    assert parse_dtype("bf16") == mx.bfloat16 and parse_dtype(None) is None
    with pytest.raises(ConfigError, match="--dtype: unknown dtype 'float8'"):
        parse_dtype("float8", option="--dtype")


def test_load_finds_tokenizer_in_the_model_folder(hf_checkpoint):
    model, tokenizer = load(hf_checkpoint)
    assert tokenizer.encode("Once upon a time")[0] == tokenizer.bos_id == 1
    assert tokenizer.eos_id == 2
    assert model.args.vocab_size >= tokenizer.vocab_size


def test_missing_tokenizer_says_how_to_supply_one(sharded_checkpoint):
    with pytest.raises(TokenizerError, match=r"pass the Llama-2 SentencePiece tokenizer with --tokenizer"):
        load(sharded_checkpoint)
    with pytest.raises(TokenizerError, match=r"nope.model: tokenizer file not found"):
        load(sharded_checkpoint, tokenizer=sharded_checkpoint / "nope.model")


def test_garbage_tokenizer_is_named(sharded_checkpoint, tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="tokenizer.model: not a SentencePiece model"):
        load(sharded_checkpoint, tokenizer=bad)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_file_instead_of_folder(tmp_path, hf_checkpoint):
    with pytest.raises(CheckpointError, match="nowhere: model folder not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="expected a model folder"):
        load_model(hf_checkpoint / "config.json")


def test_foreign_config_is_refused(tmp_path, hf_checkpoint):
    folder = _copy(hf_checkpoint, tmp_path / "m")
    (folder / "config.json").write_text(json.dumps({**TINY_CONFIG, "model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"config.json: 'model_type' is 'llama', expected 'openelm'"):
        load_model(folder)


def test_no_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "pytorch_model-1.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path, tiny_weights):
    weights = dict(tiny_weights)
    del weights["transformer.layers.1.attn.k_norm.weight"]
    weights["transformer.layers.0.attn.rotary.inv_freq"] = np.zeros(8, np.float32)
    weights["transformer.layers.2.ffn.proj_2.weight"] = np.zeros((64, 95), np.float32)
    folder = write_hf_checkpoint(tmp_path / "bad", TINY_CONFIG, weights)
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    assert "missing tensors: transformer.layers.1.attn.k_norm.weight" in message
    assert "unexpected tensors: transformer.layers.0.attn.rotary.inv_freq" in message
    assert "'transformer.layers.2.ffn.proj_2.weight' has shape (64, 95), config.json implies (64, 96)" in message


def test_config_heads_inconsistent_with_tensors(tmp_path, tiny_weights):
    config = {**TINY_CONFIG, "num_query_heads": [8, 8, 12], "num_kv_heads": [2, 2, 3]}
    folder = write_hf_checkpoint(tmp_path / "heads", config, tiny_weights)
    message = r"'transformer.layers.0.attn.qkv_proj.weight' has shape \(96, 64\), config.json implies \(192, 64\)"
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_corrupt_safetensors_is_named(tmp_path, hf_checkpoint):
    folder = _copy(hf_checkpoint, tmp_path / "corrupt")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read safetensors file"):
        load_model(folder)


def test_index_naming_a_missing_shard(tmp_path, sharded_checkpoint):
    folder = _copy(sharded_checkpoint, tmp_path / "shards")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"lists shard 'model-00002-of-00003.safetensors', which is missing"):
        load_model(folder)


def test_classifier_head_is_ignored(hf_checkpoint, tiny_weights):
    assert "transformer.classifier.weight" in tiny_weights
    model = load_model(hf_checkpoint)
    assert "classifier" not in model.transformer


def test_corenet_vocab_size_loads(tmp_path):
    config = {**TINY_CONFIG, "vocab_size": 416}  # CoreNet pads 32000 -> 32128; same idea here
    model = load_model(write_hf_checkpoint(tmp_path / "v", config, random_weights(config)))
    assert model(mx.array([[1, 415]])).shape == (1, 2, 416)
