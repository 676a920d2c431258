"""Adapter folders: ours load in mlx-lm and mlx-lm's load here with equal logits (LoRA and DoRA),
`load(path, adapter_path=...)`, atomic writes, and one clear error for each bad adapter."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_openelm import load, load_model
from mlx_openelm.errors import CheckpointError, ConfigError
from mlx_openelm.tuning.adapters import adapter_weights, apply_adapters
from mlx_openelm.tuning.config import check_adapter_config
from mlx_openelm.tuning.saving import save_adapters
from synthetic import TINY_CONFIG, mlx_lm_model

pytest.importorskip("mlx_lm.models.openelm")
lm_tuner = pytest.importorskip("mlx_lm.tuner.utils")

TOKENS = [1, 40, 7, 250, 33, 12, 90, 5, 300, 77]


def logits(model):
    out = model(mx.array(TOKENS)[None])
    mx.eval(out)
    return np.array(out[0])


def _randomize(params: dict, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [(name, a * mx.array(1 + 0.1 * rng.normal(size=a.shape).astype(np.float32)) if name.endswith(".m")
             else mx.array(rng.normal(0, 0.05, a.shape).astype(np.float32))) for name, a in params.items()]


def our_adapter(folder, out, kind, seed=0, **settings):
    model = load_model(folder, dtype="float32")
    config = check_adapter_config(kind, 2, TINY_CONFIG["num_transformer_layers"], rank=4, scale=3.0, **settings)
    apply_adapters(model, config)
    model.load_weights(_randomize(adapter_weights(model), seed), strict=False)
    save_adapters(model, out, config, record={"model": str(folder), "iters": 0})
    return model


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_lm_loads_our_adapter_and_computes_the_same_logits(hf_checkpoint, tmp_path, kind):
    ours = our_adapter(hf_checkpoint, tmp_path / "adapters", kind, keys=["qkv_proj", "proj_2"])
    theirs = mlx_lm_model(hf_checkpoint)
    lm_tuner.load_adapters(theirs, str(tmp_path / "adapters"))
    expected = logits(ours)
    assert np.abs(expected - logits(load_model(hf_checkpoint, dtype="float32"))).max() > 1e-2
    np.testing.assert_allclose(logits(theirs), expected, atol=1e-4, rtol=1e-5)
    # and it reads back here through the public load()
    model, _ = load(hf_checkpoint, dtype="float32", adapter_path=tmp_path / "adapters")
    assert np.array_equal(logits(model), expected)


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_we_load_mlx_lm_adapters_and_compute_the_same_logits(hf_checkpoint, tmp_path, kind):
    from mlx_lm.utils import save_config

    theirs = mlx_lm_model(hf_checkpoint)
    theirs.freeze()
    parameters = {"rank": 4, "scale": 5.0, "dropout": 0.0}
    if kind == "full":
        for layer in theirs.layers[-2:]:
            layer.unfreeze()
    else:
        lm_tuner.linear_to_lora_layers(theirs, 2, parameters, use_dora=kind == "dora")
    theirs.load_weights(_randomize(dict(tree_flatten(theirs.trainable_parameters())), 1), strict=False)
    out = tmp_path / "mlx-lm-adapters"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(theirs.trainable_parameters())))
    save_config({"model": str(hf_checkpoint), "fine_tune_type": kind, "num_layers": 2, "lora_parameters": parameters,
                 "batch_size": 4, "iters": 10, "learning_rate": 1e-5, "seed": 0}, out / "adapter_config.json")
    ours = load_model(hf_checkpoint, dtype="float32", adapter_path=out)
    np.testing.assert_allclose(logits(ours), logits(theirs), atol=1e-4, rtol=1e-5)


def test_saving_replaces_files_atomically_and_leaves_no_temporary_file(hf_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "a"
    our_adapter(hf_checkpoint, out, "lora")
    before = (out / "adapters.safetensors").read_bytes()

    def disk_full(path, weights):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("[write] Unable to write 1024 bytes")

    monkeypatch.setattr(mx, "save_safetensors", disk_full)
    with pytest.raises(CheckpointError, match="adapters.safetensors: cannot write"):
        our_adapter(hf_checkpoint, out, "lora", seed=5)
    assert (out / "adapters.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]


def _edit_config(folder, change):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, error, message", [
    (lambda c: c.update(num_layers=5), ConfigError, "num_layers: 5 does not fit the model, which has 3"),
    (lambda c: c["lora_parameters"].update(alpha=16), ConfigError, "lora_parameters.alpha is not a LoRA setting"),
    (lambda c: c["lora_parameters"].update(keys=["attn.q_proj"]), ConfigError, "'attn.q_proj' is not a projection"),
    (lambda c: c["lora_parameters"].update(rank=0), ConfigError, "lora_parameters.rank: 0 is not an integer"),
    (lambda c: c.update(fine_tune_type="qlora"), ConfigError, "fine_tune_type: 'qlora' is not one of"),
    (lambda c: c["lora_parameters"].pop("scale"), ConfigError, "lora_parameters.scale is missing"),
    (lambda c: c["lora_parameters"].update(rank=8), CheckpointError, "the model's parameter has (8,"),
    (lambda c: c.update(num_layers=3), CheckpointError, "tensor 'transformer.layers.0.attn.out_proj.lora_a' is missing (and 7 more)"),
    (lambda c: c.update(num_layers=1), CheckpointError, "is not a parameter of this adapter"),
])
def test_an_adapter_that_does_not_fit_is_one_error_naming_the_file(hf_checkpoint, tmp_path, change, error, message):
    out = tmp_path / "a"
    our_adapter(hf_checkpoint, out, "lora")
    _edit_config(out, change)
    with pytest.raises(error) as info:
        load_model(hf_checkpoint, adapter_path=out)
    text = str(info.value)
    assert message in text and str(out) in text and "\n" not in text


def test_missing_or_unreadable_adapter_files_are_named(hf_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="adapter folder not found"):
        load_model(hf_checkpoint, adapter_path=tmp_path / "nowhere")
    out = tmp_path / "a"
    our_adapter(hf_checkpoint, out, "lora")
    (out / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"adapter_config.json: not valid JSON"):
        load_model(hf_checkpoint, adapter_path=out)
    our_adapter(hf_checkpoint, out, "lora")
    (out / "adapters.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match=r"adapters.safetensors: cannot read safetensors file"):
        load_model(hf_checkpoint, adapter_path=out)
