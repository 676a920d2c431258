"""The converter's quantization methods and mixed recipes, against mlx-lm and against each other."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_openelm.cli import main
from mlx_openelm.convert import convert
from mlx_openelm.config import ModelArgs
from mlx_openelm.convert.importance import data_free_importance
from mlx_openelm.errors import CheckpointError, ConfigError
from mlx_openelm.loading import load_model, read_weights
from mlx_openelm.quantization import RECIPES, is_sensitive, plan_quantization



def mlx_lm_utils():
    """mlx-lm (the `compare` extra), or a skip: only the checks against mlx-lm need it."""
    return pytest.importorskip("mlx_lm.utils")

TOKENS = mx.array([[1, 5, 9, 33, 100, 200, 7, 8, 300, 12, 64, 2, 17, 383, 250, 3]])


def mlx_lm_quantized(folder: Path, bits: int, group_size: int) -> dict[str, mx.array]:
    """What mlx_lm.convert writes: the model cast to float16, then quantize_model."""
    from mlx.utils import tree_flatten, tree_map

    lm_utils = mlx_lm_utils()
    model, config = lm_utils.load_model(folder, lazy=True, strict=False)  # the vestigial classifier
    model.update(tree_map(lambda v: v.astype(mx.float16) if mx.issubdtype(v.dtype, mx.floating) else v,
                          model.parameters()))
    model, _ = lm_utils.quantize_model(model, config, group_size, bits)
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_minmax_is_mlx_lm_bit_for_bit(hf_checkpoint, tmp_path, bits):
    mlx_lm_utils()  # before converting: without mlx-lm there is nothing to compare with
    out = tmp_path / f"q{bits}"
    convert(hf_checkpoint, out, bits=bits, group_size=32, dtype="float16", method="minmax", evaluate=False)
    ours, theirs = read_weights(out), mlx_lm_quantized(hf_checkpoint, bits, 32)
    assert set(ours) == set(theirs)
    for name, array in ours.items():
        assert array.dtype == theirs[name].dtype and mx.array_equal(array, theirs[name]).item(), name


@pytest.fixture(scope="module")
def both_methods(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    reports = {m: convert(hf_checkpoint, root / m, bits=3, group_size=32, dtype="float16", method=m)
               for m in ("minmax", "optimal")}
    return root, reports


def test_optimal_is_the_default_and_beats_minmax_group_by_group(hf_checkpoint, both_methods):
    """Group by group, in the error optimal minimises: each input column's squared error weighted
    by its data-free importance (convert/importance.py)."""
    root, reports = both_methods
    source = read_weights(hf_checkpoint)
    importance = data_free_importance(ModelArgs.from_file(hf_checkpoint), source.__getitem__)
    minmax, optimal = read_weights(root / "minmax"), read_weights(root / "optimal")
    assert json.loads((root / "optimal" / "config.json").read_text())["quantization"]["method"] == "optimal"
    quantized = [n[: -len(".scales")] for n in optimal if n.endswith(".scales")]
    assert len(quantized) == 13  # every Linear layer and the embedding
    assert len(importance) == 3 * 3 + 1  # qkv_proj, proj_1, proj_2 of the 3 layers, and the tied head
    total = {"minmax": 0.0, "optimal": 0.0}
    for module in quantized:
        w = source[f"{module}.weight"]
        c = importance.get(f"{module}.weight", mx.ones((w.shape[1],)))
        for name, weights in (("minmax", minmax), ("optimal", optimal)):
            parts = tuple(weights[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
            approx = mx.dequantize(parts[0], parts[1].astype(mx.float32), parts[2].astype(mx.float32),
                                   group_size=32, bits=3)
            errors = (mx.square(approx - w.astype(mx.float32)) * c).reshape(w.shape[0], -1, 32).sum(-1)
            total[name] += errors.sum().item()
            if name == "minmax":
                reference = errors
        assert (errors <= reference * (1 + 1e-5)).all().item(), module
    assert total["optimal"] < 0.85 * total["minmax"]
    assert reports["optimal"].max_rel_error < reports["minmax"].max_rel_error
    # (the KL on this 3-layer random model over 64 tokens is too noisy to order the methods)
    assert reports["optimal"].bits_per_weight == reports["minmax"].bits_per_weight  # same format, same size


def test_mlx_lm_loads_our_optimal_output_unchanged(both_methods):
    root, _ = both_methods
    theirs, _config = mlx_lm_utils().load_model(root / "optimal")
    theirs.set_dtype(mx.float32)
    ours = load_model(root / "optimal", dtype=mx.float32)
    np.testing.assert_allclose(np.array(theirs(TOKENS)), np.array(ours(TOKENS)), atol=1e-4, rtol=1e-4)


def test_mixed_recipe_gives_the_sensitive_layers_high_bits_and_mlx_lm_loads_it(hf_checkpoint, tmp_path):
    out = tmp_path / "mixed-3-6"
    report = convert(hf_checkpoint, out, recipe="mixed-3-6", group_size=32, dtype="float16", evaluate=False)
    model = load_model(out, dtype=mx.float32)
    assert model.transformer.token_embeddings.bits == 6
    assert all(layer.attn.qkv_proj.bits == 6 for layer in model.layers)
    assert model.layers[2].ffn.proj_2.bits == 6 and model.layers[2].attn.out_proj.bits == 6  # the last layer
    assert model.layers[0].ffn.proj_2.bits == 3 and model.layers[1].ffn.proj_1.bits == 3
    assert report.layer_bits == {"6": 7, "3": 6}  # head, 3 qkv_proj, the last layer's other 3 | the rest
    theirs, _config = mlx_lm_utils().load_model(out)  # per-layer bits from the top-level entries
    theirs.set_dtype(mx.float32)
    np.testing.assert_allclose(np.array(theirs(TOKENS)), np.array(model(TOKENS)), atol=1e-4, rtol=1e-4)


def test_recipes_cover_every_pair_of_widths_and_the_sensitive_parts_follow_depth():
    assert RECIPES["mixed-3-6"] == (3, 6) and RECIPES["mixed-2-8"] == (2, 8) and "mixed-6-3" not in RECIPES
    assert len(RECIPES) == 15
    assert is_sensitive("transformer.token_embeddings", 16) and is_sensitive("lm_head", 16)
    assert [i for i in range(16) if is_sensitive(f"transformer.layers.{i}.ffn.proj_2", 16)] == [15]  # 270M
    assert [i for i in range(36) if is_sensitive(f"transformer.layers.{i}.attn.out_proj", 36)] == [35]
    assert all(is_sensitive(f"transformer.layers.{i}.attn.qkv_proj", 36) for i in range(36))
    assert not is_sensitive("transformer.norm", 16)
    shapes = {"transformer.token_embeddings.weight": (384, 64), "transformer.layers.0.attn.qkv_proj.weight": (96, 64),
              "transformer.layers.0.ffn.proj_1.weight": (96, 64), "transformer.layers.9.ffn.proj_1.weight": (96, 64),
              "transformer.layers.0.attn_norm.weight": (64,)}
    plan = plan_quantization(shapes, 4, 64, "mixed-4-8", "minmax")
    assert plan.specs == {"transformer.token_embeddings": (8, 64), "transformer.layers.0.attn.qkv_proj": (8, 64),
                          "transformer.layers.0.ffn.proj_1": (4, 64),
                          "transformer.layers.9.ffn.proj_1": (8, 64)}  # 10 layers: the last is 9
    assert plan.config_entry()["method"] == "minmax"


@pytest.mark.parametrize("args, message", [
    (["--recipe", "mixed-6-3"], "--recipe: unknown recipe 'mixed-6-3'; choose mixed-LOW-HIGH with LOW < HIGH"),
    (["--bits", "7"], "--bits: 7 is not supported; choose one of 2, 3, 4, 5, 6, 8"),
    (["--bits", "4", "--quant-method", "best"], "Invalid value for '--quant-method': 'best' is not one of"),
])
def test_cli_refuses_bad_quantization_options(hf_checkpoint, tmp_path, args, message):
    result = CliRunner().invoke(main, ["convert", "--hf-path", str(hf_checkpoint), "--mlx-path",
                                       str(tmp_path / "out"), *args])
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "out").exists()


def test_cli_quant_method_reaches_the_output(hf_checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["convert", "--hf-path", str(hf_checkpoint), "--mlx-path", str(tmp_path / "o"),
                                       "--bits", "5", "--group-size", "32", "--quant-method", "minmax", "--no-eval"])
    assert result.exit_code == 0, result.output
    assert "5-bit affine (minmax), group 32" in result.output
    entry = json.loads((tmp_path / "o" / "config.json").read_text())["quantization"]
    assert entry["bits"] == 5 and entry["method"] == "minmax"


def test_library_refuses_an_unknown_method(hf_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="method: 'best' is not a quantization method"):
        convert(hf_checkpoint, tmp_path / "x", bits=4, method="best")


# ---- convert_tensor: the per-tensor error and the non-finite checks ------------------------------

def _float64_rel_error(weight: np.ndarray, approx: mx.array) -> float:
    diff = np.array(approx.astype(mx.float32), dtype=np.float64) - weight
    return float(np.linalg.norm(diff) / np.linalg.norm(weight.astype(np.float64)))


@pytest.mark.parametrize("bits", [None, 4])
def test_tensor_error_matches_float64_across_many_blocks(bits):
    # 4.2M elements: many row blocks, and more than a single float32 sum adds up without drifting
    from mlx_openelm.convert.quantize import ERROR_BLOCK_ELEMENTS, convert_tensor

    weight = np.random.default_rng(0).standard_normal((3276, 1280)).astype(np.float32) + 3
    assert weight.size > 10 * ERROR_BLOCK_ELEMENTS
    plan = plan_quantization({"w.weight": weight.shape}, bits, 64, None, "minmax") if bits else None
    tensors, rel = convert_tensor("w.weight", mx.array(weight), mx.float16, plan)
    if bits:
        approx = mx.dequantize(tensors["w.weight"], tensors["w.scales"].astype(mx.float32),
                               tensors["w.biases"].astype(mx.float32), group_size=64, bits=bits)
    else:
        approx = tensors["w.weight"]
    assert rel == pytest.approx(_float64_rel_error(weight, approx), rel=1e-4)


@pytest.mark.parametrize("bits", [None, 4])
def test_finite_weights_whose_squares_overflow_float32_are_kept(bits):
    from mlx_openelm.convert.quantize import convert_tensor

    weight = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    weight[3, 5] = 1e30  # finite in float32; its square is not
    plan = plan_quantization({"w.weight": weight.shape}, bits, 64, None, "minmax") if bits else None
    tensors, _ = convert_tensor("w.weight", mx.array(weight), mx.float32, plan)
    assert all(mx.isfinite(t).all().item() for t in tensors.values() if mx.issubdtype(t.dtype, mx.floating))
    weight[3, 5] = np.inf
    with pytest.raises(CheckpointError, match="tensor 'w.weight' holds NaN or infinite values"):
        convert_tensor("w.weight", mx.array(weight), mx.float32, plan)
