"""CoreNet `.pt` checkpoints: torch-free reading, name mapping, preset checks, conversion."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm.config import ModelArgs, preset_args
from mlx_openelm.convert import convert
from mlx_openelm.convert.corenet import CoreNetArchive, corenet_names, expected_shapes, read_corenet
from mlx_openelm.errors import CheckpointError
from mlx_openelm.loading import load_model, read_weights
from synthetic import TINY_CONFIG, UNTIED_CONFIG, random_weights
from torchzip import corenet_state, write_torch_zip

TOKENS = mx.array([[1, 5, 9, 33, 100, 200, 7, 8, 300, 12]])


def logits(folder):
    out = load_model(folder, dtype=mx.float32)(TOKENS)
    mx.eval(out)
    return np.array(out)


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def tiny_config_file(tmp_path):
    path = tmp_path / "tiny-config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def test_names_follow_corenet_general_gpt():
    args = ModelArgs.from_dict(UNTIED_CONFIG)
    names = corenet_names(args)
    assert names["transformer.token_embeddings.weight"] == "token_embeddings.weight"
    assert names["transformer.layers.2.attn.qkv_proj.weight"] == "layers.2.attn.qkv_proj.weight"
    assert names["transformer.layers.0.ffn_norm.weight"] == "layers.0.ffn_norm.weight"
    assert names["transformer.norm.weight"] == "norm.weight"
    assert names["lm_head.weight"] == "classifier.weight"
    assert "transformer.layers.0.attn.q_norm.weight" not in names  # UNTIED_CONFIG has no q/k norm
    assert list(names) == list(expected_shapes(args))
    tied = corenet_names(preset_args("270M", vocab_size=32128))
    assert "lm_head.weight" not in tied and len(tied) == 1 + 16 * 8 + 1


def test_reader_rebuilds_tensors_without_torch(tmp_path, tiny_weights):
    state = corenet_state(tiny_weights)
    path = write_torch_zip(tmp_path / "ckpt.pt", state, archive_name="checkpoint_last",
                           transpose=("layers.1.ffn.proj_2.weight",))
    tensors = CoreNetArchive(path).state_dict()
    assert list(tensors) == list(state)
    assert tensors["layers.1.ffn.proj_2.weight"].stride == (1, tensors["layers.1.ffn.proj_2.weight"].shape[0])
    for name, array in state.items():
        np.testing.assert_array_equal(tensors[name].load(), array, err_msg=name)


def test_bfloat16_storages_and_training_checkpoints(tmp_path, tiny_weights):
    path = write_torch_zip(tmp_path / "train.pt", corenet_state(tiny_weights), bfloat16=True,
                           wrap="model_state_dict")
    tensors = read_corenet(path, ModelArgs.from_dict(TINY_CONFIG), "tiny")
    got = tensors["transformer.norm.weight"].load()
    want = np.array(mx.array(tiny_weights["transformer.norm.weight"]).astype(mx.bfloat16).astype(mx.float32))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_restricted_unpickler_refuses_other_globals(tmp_path, tiny_weights):
    path = write_torch_zip(tmp_path / "evil.pt", corenet_state(tiny_weights), extra_global=("os", "system"))
    with pytest.raises(CheckpointError, match=r"refusing to load global 'os\.system'"):
        CoreNetArchive(path).state_dict()


def test_not_a_zip_is_a_clear_error(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="not a zip-format PyTorch checkpoint"):
        CoreNetArchive(path)


def test_corenet_converts_to_the_same_logits_as_safetensors(tmp_path, hf_checkpoint, tiny_weights, tiny_config_file):
    pt = write_torch_zip(tmp_path / "checkpoint_last.pt", corenet_state(tiny_weights),
                         transpose=("layers.0.attn.out_proj.weight",))
    convert(pt, tmp_path / "from-pt", config=tiny_config_file, dtype="float32", evaluate=False)
    convert(hf_checkpoint, tmp_path / "from-hf", dtype="float32", evaluate=False)
    np.testing.assert_array_equal(logits(tmp_path / "from-pt"), logits(tmp_path / "from-hf"))
    # quantized too
    r = convert(pt, tmp_path / "pt-q4", config=tiny_config_file, bits=4, group_size=32, dtype="float32")
    convert(hf_checkpoint, tmp_path / "hf-q4", bits=4, group_size=32, dtype="float32", evaluate=False)
    np.testing.assert_array_equal(logits(tmp_path / "pt-q4"), logits(tmp_path / "hf-q4"))
    assert r.source_kind == "corenet" and 0 < r.kl_mean < 1.0  # 4-bit: ~0.2 on this model


def test_untied_corenet_classifier_becomes_lm_head(tmp_path, untied_checkpoint, untied_weights):
    config = tmp_path / "untied.json"
    config.write_text(json.dumps(UNTIED_CONFIG))
    state = corenet_state(untied_weights)
    assert "classifier.weight" in state
    pt = write_torch_zip(tmp_path / "untied.pt", state)
    convert(pt, tmp_path / "out", config=config, dtype="float32", evaluate=False)
    np.testing.assert_array_equal(np.array(read_weights(tmp_path / "out")["lm_head.weight"]),
                                  untied_weights["lm_head.weight"])
    np.testing.assert_array_equal(logits(tmp_path / "out"), logits(untied_checkpoint))


def test_average_of_corenet_checkpoints(tmp_path, tiny_weights, tiny_config_file):
    other = random_weights(TINY_CONFIG, seed=5)
    a = write_torch_zip(tmp_path / "a.pt", corenet_state(tiny_weights))
    b = write_torch_zip(tmp_path / "b.pt", corenet_state(other))
    convert(None, tmp_path / "avg", average=[a, b], config=tiny_config_file, dtype="float32", evaluate=False)
    got = read_weights(tmp_path / "avg")
    for name in ("transformer.token_embeddings.weight", "transformer.layers.1.attn.qkv_proj.weight"):
        mean = ((tiny_weights[name].astype(np.float64) + other[name]) / 2).astype(np.float32)
        np.testing.assert_array_equal(np.array(got[name]), mean)


def test_checkpoint_that_does_not_fit_the_preset_names_the_first_tensor(tmp_path, tiny_weights, invoke_cli):
    pt = write_torch_zip(tmp_path / "tiny.pt", corenet_state(tiny_weights))
    before = listing(tmp_path)
    result = invoke_cli("convert", "--hf-path", str(pt), "--preset", "270M", "--mlx-path", str(tmp_path / "out"))
    assert result.exit_code != 0
    assert "tensor 'token_embeddings.weight' has shape (384, 64), preset 270M (vocab 32128) implies (32128, 1280)" \
        in result.output
    assert listing(tmp_path) == before


def test_missing_and_extra_tensors_are_named(tmp_path, tiny_weights):
    args = ModelArgs.from_dict(TINY_CONFIG)
    state = corenet_state(tiny_weights)
    del state["layers.1.attn.k_norm.weight"]
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.1\.attn\.k_norm\.weight' is missing"):
        read_corenet(write_torch_zip(tmp_path / "missing.pt", state), args, "tiny")
    state = {**corenet_state(tiny_weights), "layers.0.attn.pos_embedding.inv_freq": np.zeros(8, np.float32)}
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.pos_embedding\.inv_freq' is not part of tiny"):
        read_corenet(write_torch_zip(tmp_path / "extra.pt", state), args, "tiny")


def test_torch_cross_check(tmp_path, tiny_weights):
    """When torch happens to be installed: a real torch.save file reads back identically."""
    torch = pytest.importorskip("torch")
    state = {k: torch.from_numpy(v) for k, v in corenet_state(tiny_weights).items()}
    state["layers.0.ffn.proj_2.weight"] = state["layers.0.ffn.proj_2.weight"].t().contiguous().t()
    path = tmp_path / "real.pt"
    torch.save(state, path)
    tensors = CoreNetArchive(path).state_dict()
    for name, tensor in state.items():
        np.testing.assert_array_equal(tensors[name].load(), tensor.numpy(), err_msg=name)
    # and torch reads what the test writer produces
    ours = write_torch_zip(tmp_path / "ours.pt", corenet_state(tiny_weights))
    loaded = torch.load(ours, weights_only=True)
    for name, array in corenet_state(tiny_weights).items():
        np.testing.assert_array_equal(loaded[name].numpy(), array)
