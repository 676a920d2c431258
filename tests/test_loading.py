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


# ---- the quantization entry, integer and non-finite tensors -----------------------------------

def _quantized_copy(hf_checkpoint, folder, entry):
    from mlx_openelm.convert import convert

    convert(hf_checkpoint, folder, bits=4, group_size=32, evaluate=False)
    config = json.loads((folder / "config.json").read_text())
    config["quantization"] = entry
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("entry, message", [
    ({"bits": 4, "group_size": 0}, r"config.json: quantization.group_size: 0 is not supported; choose one of 32"),
    ({"bits": "four", "group_size": 32}, r"config.json: quantization.bits: 'four' is not supported"),
    ({"bits": 4, "group_size": 32, "layers": [1, 2]}, r"config.json: quantization.layers must be an object"),
    ({"bits": 4, "group_size": 32, "layers": {"lm_head": 3}},
     r"quantization.layers\['lm_head'\] must be an object or false"),
    ({"bits": 4, "group_size": 32, "layers": {"x": {"bits": 7}}},
     r"quantization.layers\['x'\].bits: 7 is not supported"),
    ({"group_size": 32}, r"config.json: quantization.bits is missing"),
    ([4, 32], r"config.json: quantization must be an object, got list"),
])
def test_every_key_of_the_quantization_entry_is_validated(hf_checkpoint, tmp_path, entry, message):
    folder = _quantized_copy(hf_checkpoint, tmp_path / "q", entry)
    with pytest.raises(ConfigError, match=message):
        load_model(folder)


def test_quantization_entry_round_trips_in_both_formats():
    from mlx_openelm.quantization import Quantization

    ours = Quantization(4, 64, {"lm_head": (8, 64), "transformer.layers.0.ffn.proj_2": None}, "mixed-4-8")
    assert Quantization.from_config(ours.to_config()) == ours
    mlx_lm = Quantization.from_config({"bits": 4, "group_size": 64, "lm_head": {"bits": 8, "group_size": 64}})
    assert mlx_lm.mlx_lm_format and mlx_lm.spec("lm_head") == (8, 64) and mlx_lm.spec("other") == (4, 64)


def test_integer_tensor_in_a_float_checkpoint_is_refused(tmp_path, tiny_weights):
    weights = {**tiny_weights, "transformer.norm.weight": np.ones(64, np.int32)}
    folder = write_hf_checkpoint(tmp_path / "ints", TINY_CONFIG, weights)
    with pytest.raises(CheckpointError, match=r"tensor 'transformer.norm.weight' has dtype int32, expected floats"):
        load_model(folder)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, tiny_weights, bad):
    proj = tiny_weights["transformer.layers.1.ffn.proj_1.weight"].copy()
    proj[3, 5] = bad
    folder = write_hf_checkpoint(tmp_path / "nan", TINY_CONFIG,
                                 {**tiny_weights, "transformer.layers.1.ffn.proj_1.weight": proj})
    with pytest.raises(CheckpointError, match=r"tensor 'transformer.layers.1.ffn.proj_1.weight' holds NaN or inf"):
        load_model(folder)


def test_half_dtype_with_a_quantized_model_on_cpu_warns_once(hf_checkpoint, tmp_path):
    if mx.default_device() != mx.cpu:
        pytest.skip("CPU backend only")
    from mlx_openelm.convert import convert
    from mlx_openelm.errors import OpenELMWarning

    convert(hf_checkpoint, tmp_path / "q", bits=4, group_size=32, evaluate=False)
    with pytest.warns(OpenELMWarning, match="float16 with a quantized model is very slow") as record:
        load_model(tmp_path / "q", dtype="float16")
    assert len([w for w in record if issubclass(w.category, OpenELMWarning)]) == 1


def test_smaller_tokenizer_warns_but_the_padded_corenet_vocabulary_does_not(
    hf_checkpoint, small_tokenizer_path, monkeypatch
):
    import warnings

    from mlx_openelm import config
    from mlx_openelm.errors import OpenELMWarning

    with pytest.warns(OpenELMWarning, match="tokenizer has 320 pieces, fewer than the model's vocab_size 384"):
        load(hf_checkpoint, tokenizer=small_tokenizer_path)
    monkeypatch.setattr(config, "PADDED_VOCAB", {320: 384})  # as CoreNet pads 32000 to 32128
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenELMWarning)
        load(hf_checkpoint, tokenizer=small_tokenizer_path)
