"""LoRA/DoRA layers: a fresh adapter changes nothing (bit for bit, float and quantized bases), the
forward equals the numpy reference with the merged weights, and the gradients of the adapter's
parameters equal float64 finite differences of that independent reference."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import reference
from mlx_openelm import load_model
from mlx_openelm.convert import convert
from mlx_openelm.tuning.adapters import adapter_weights, apply_adapters
from mlx_openelm.tuning.config import PROJECTIONS, check_adapter_config
from mlx_openelm.tuning.layers import DoRALinear, LoRALinear
from synthetic import TINY_CONFIG

TOKENS = [1, 40, 7, 250, 33, 12, 90, 5]


def adapter(kind="lora", num_layers=None, rank=4, scale=2.0, keys=None):
    return check_adapter_config(kind, num_layers, TINY_CONFIG["num_transformer_layers"], rank, scale, 0.0, keys)


def logits(model, tokens=TOKENS):
    out = model(mx.array(tokens)[None])
    mx.eval(out)
    return np.array(out[0])


@pytest.fixture(scope="module")
def quantized_folder(hf_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "q4"
    convert(hf_checkpoint, out, bits=4, group_size=32, dtype="float32", evaluate=False)
    return out


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("base", ["float", "quantized"])
def test_a_fresh_adapter_leaves_the_logits_bit_for_bit(hf_checkpoint, quantized_folder, kind, base):
    folder = hf_checkpoint if base == "float" else quantized_folder
    model = load_model(folder, dtype="float32")
    before = logits(model)
    apply_adapters(model, adapter(kind))
    after = logits(model)
    assert np.array_equal(before, after)
    wrapped = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 * TINY_CONFIG["num_transformer_layers"]
    if base == "quantized":  # QLoRA: the base stays quantized and frozen, the adapter is float32
        assert all(isinstance(m.linear, nn.QuantizedLinear) for m in wrapped)
    trainable = adapter_weights(model)
    leaves = {"lora_a", "lora_b"} | ({"m"} if kind == "dora" else set())
    assert {name.rsplit(".", 1)[1] for name in trainable} == leaves
    assert all(a.dtype == mx.float32 for a in trainable.values())


def test_num_layers_and_keys_choose_what_is_wrapped(hf_checkpoint):
    model = load_model(hf_checkpoint, dtype="float32")
    apply_adapters(model, adapter(num_layers=1, keys=["qkv_proj", "ffn.proj_2"]))
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["transformer.layers.2.attn.qkv_proj", "transformer.layers.2.ffn.proj_2"]
    full = load_model(hf_checkpoint, dtype="float32")
    apply_adapters(full, adapter("full", num_layers=1))
    names = set(adapter_weights(full))
    assert names and all(name.startswith("transformer.layers.2.") for name in names)
    assert "transformer.layers.2.attn_norm.weight" in names


def _randomize(model, seed=0, std=0.05):
    """Non-zero adapter parameters (B random too), so the adapter changes the function."""
    rng = np.random.default_rng(seed)
    params = {name: mx.array(rng.normal(0, std, a.shape).astype(np.float32) + (1.0 if name.endswith(".m") else 0))
              for name, a in adapter_weights(model).items()}
    for name in params:
        if name.endswith(".m"):  # DoRA magnitudes near the base norms
            base = dict(tree_flatten(model.parameters()))[name]
            params[name] = base * params[name]
    model.load_weights(list(params.items()), strict=False)
    mx.eval(model.parameters())
    return {name: np.array(a, dtype=np.float64) for name, a in params.items()}


def merged_weights(tiny_weights, params, config, scale):
    """The reference's weights with each adapter merged in float64: w + s b^T a^T (DoRA: rescaled rows)."""
    weights = {k: np.asarray(v, dtype=np.float64) for k, v in tiny_weights.items()}
    for index in config.layer_indices(TINY_CONFIG["num_transformer_layers"]):
        for key in config.keys:
            prefix = f"transformer.layers.{index}.{key}"
            w = weights[f"{prefix}.weight"]
            adapted = w + scale * params[f"{prefix}.lora_b"].T @ params[f"{prefix}.lora_a"].T
            if f"{prefix}.m" in params:
                adapted = (params[f"{prefix}.m"] / np.linalg.norm(adapted, axis=1))[:, None] * adapted
            weights[f"{prefix}.weight"] = adapted
    return weights


def reference_loss(weights, tokens=TOKENS):
    out = reference.forward(weights, TINY_CONFIG, tokens[:-1])
    out = out - out.max(axis=-1, keepdims=True)
    log_probs = out - np.log(np.exp(out).sum(axis=-1, keepdims=True))
    return -np.mean(log_probs[np.arange(len(tokens) - 1), tokens[1:]])


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_forward_equals_the_numpy_reference_with_merged_weights(hf_checkpoint, tiny_weights, kind):
    model = load_model(hf_checkpoint, dtype="float32")
    config = adapter(kind, num_layers=2)
    apply_adapters(model, config)
    params = _randomize(model)
    expected = reference.forward(merged_weights(tiny_weights, params, config, config.scale), TINY_CONFIG, TOKENS)
    got = logits(model)
    assert np.abs(got - logits(load_model(hf_checkpoint, dtype="float32"))).max() > 1e-2  # it does change
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


def _mlx_loss_and_grads(model, tokens=TOKENS):
    x = mx.array(tokens[:-1])[None]
    y = mx.array(tokens[1:])[None]

    def loss(m):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")

    value, grads = nn.value_and_grad(model, loss)(model)
    return float(value), {k: np.array(v) for k, v in tree_flatten(grads)}


@pytest.mark.parametrize("kind, leaves", [("lora", ("lora_a", "lora_b")), ("dora", ("m",))])
def test_adapter_gradients_equal_finite_differences_of_the_reference(hf_checkpoint, tiny_weights, kind, leaves):
    """DoRA's norm is a constant for the gradient (stop_gradient, as in mlx-lm and the paper's recipe),
    so only its magnitude's gradient is the true function's; LoRA's A and B are checked fully."""
    model = load_model(hf_checkpoint, dtype="float32")
    config = adapter(kind, num_layers=2)
    apply_adapters(model, config)
    params = _randomize(model, seed=1)
    value, grads = _mlx_loss_and_grads(model)
    rng = np.random.default_rng(2)
    eps = 1e-6
    for name in [n for n in params if n.rsplit(".", 1)[1] in leaves and ("proj_1" in n or "qkv" in n)]:
        flat = params[name].reshape(-1)
        for i in rng.choice(flat.size, 3, replace=False):
            shifted = {}
            for sign in (1, -1):
                trial = dict(params)
                changed = flat.copy()
                changed[i] += sign * eps
                trial[name] = changed.reshape(params[name].shape)
                shifted[sign] = reference_loss(merged_weights(tiny_weights, trial, config, config.scale))
            numeric = (shifted[1] - shifted[-1]) / (2 * eps)
            assert grads[name].reshape(-1)[i] == pytest.approx(numeric, rel=2e-3, abs=2e-5), (name, i)
    assert value == pytest.approx(reference_loss(merged_weights(tiny_weights, params, config, config.scale)),
                                  rel=1e-5)


def test_dora_norm_without_the_matrix_equals_the_direct_norm(quantized_folder):
    model = load_model(quantized_folder, dtype="float32")
    apply_adapters(model, adapter("dora"))
    _randomize(model, seed=3, std=0.2)
    layer = model.layers[1].ffn.proj_1
    assert isinstance(layer, DoRALinear) and isinstance(layer.linear, nn.QuantizedLinear)
    direct = mx.linalg.norm(super(DoRALinear, layer).fused_weight(), axis=1)
    np.testing.assert_allclose(np.array(layer.adapted_norm()), np.array(direct), rtol=1e-5)


def test_projection_names_are_the_model_modules():
    assert set(PROJECTIONS.values()) == {"attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2"}
    config = json.loads(json.dumps(adapter(keys=["out_proj"]).to_dict()))
    assert config["lora_parameters"]["keys"] == ["attn.out_proj"] and config["num_layers"] == 3
