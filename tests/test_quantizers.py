"""Error-minimising affine quantization: MLX's exact format, never worse than min/max."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_openelm.quantizers import (
    _least_squares,
    METHODS,
    fit_scales_biases,
    group_errors,
    pack_codes,
    quantize,
    unpack_codes,
)

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def gaussian(rows: int, cols: int, seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32))


def codes_numpy(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unpack MLX's little-endian bit stream with numpy alone (independent of pack/unpack_codes)."""
    bits_le = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")
    fields = bits_le.reshape(packed.shape[0], -1, bits).astype(np.uint32)
    return (fields << np.arange(bits, dtype=np.uint32)).sum(-1)


@pytest.mark.parametrize("bits", BITS)
def test_mx_quantize_accepts_every_width_we_offer(bits):
    packed, scales, biases = mx.quantize(gaussian(4, 64), group_size=32, bits=bits)
    assert packed.dtype == mx.uint32 and packed.shape == (4, 64 * bits // 32) and scales.shape == (4, 2)


@pytest.mark.parametrize("bits", BITS)
def test_pack_codes_is_mlx_packing(bits):
    packed, _, _ = mx.quantize(gaussian(8, 256, seed=bits), group_size=64, bits=bits)
    codes = codes_numpy(np.array(packed), bits)
    assert codes.max() == 2**bits - 1  # every bit of a field was exercised
    np.testing.assert_array_equal(np.array(unpack_codes(packed, bits)), codes)
    assert mx.array_equal(pack_codes(mx.array(codes), bits), packed).item()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_optimal_is_mlx_format_and_never_worse_than_minmax(bits, group_size):
    weight = gaussian(48, 256, seed=bits * group_size)
    minmax = quantize(weight, bits, group_size, "minmax", mx.float16)
    packed, scales, biases = quantize(weight, bits, group_size, "optimal", mx.float16)
    assert packed.dtype == mx.uint32 and packed.shape == minmax[0].shape
    assert scales.dtype == biases.dtype == mx.float16 and scales.shape == minmax[1].shape

    # mx.dequantize reads our output as s * q + b with our own codes, scales and biases
    codes = codes_numpy(np.array(packed), bits).reshape(48, -1, group_size).astype(np.float32)
    ours = codes * np.array(scales.astype(mx.float32))[..., None] + np.array(biases.astype(mx.float32))[..., None]
    read = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
    np.testing.assert_allclose(np.array(read), ours.reshape(48, 256), atol=2**-10)  # float16 math: s*q + b rounded
    read32 = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size,
                           bits=bits)
    np.testing.assert_allclose(np.array(read32), ours.reshape(48, 256), rtol=1e-6, atol=1e-7)

    err_ours = np.array(group_errors(weight, (packed, scales, biases), bits, group_size))
    err_minmax = np.array(group_errors(weight, minmax, bits, group_size))
    assert (err_ours <= err_minmax).all()
    assert err_ours.sum() < 0.9 * err_minmax.sum()  # and clearly better overall


def test_minmax_is_mx_quantize_bit_for_bit():
    weight = gaussian(16, 128)
    for dtype in (mx.float16, mx.bfloat16, mx.float32):
        ours = quantize(weight, 4, 64, "minmax", dtype)
        theirs = mx.quantize(weight.astype(dtype), group_size=64, bits=4)
        assert all(mx.array_equal(a, b).item() and a.dtype == b.dtype for a, b in zip(ours, theirs))


def test_least_squares_refit_is_optimal_for_its_codes():
    """The refit's (scale, bias) beat any nearby pair on the same codes, and its closed-form
    error (from sums only) is the error computed directly."""
    x = np.array(gaussian(64, 64, seed=3)).T  # 64 groups of 64, one per column
    q = np.clip(np.round((x - x.min(0, keepdims=True)) * 7 / np.ptp(x, 0, keepdims=True) * 0.9), 0, 7)
    c = np.random.default_rng(4).uniform(0.1, 3, size=x.shape).astype(np.float32)  # and weighted
    for weights in (None, c):
        cc = np.ones_like(x) if weights is None else weights
        w, codes = mx.array(x), mx.array(q)
        sums = mx.array((cc * x).sum(0, keepdims=True)), mx.array((cc * x * x).sum(0, keepdims=True))
        size = 64 if weights is None else mx.array(cc.sum(0, keepdims=True))
        scale, bias, error = (np.array(a) for a in _least_squares(w, codes, *sums, size,
                                                                  None if weights is None else mx.array(c)))
        sse = (cc * (scale * q + bias - x) ** 2).sum(0, keepdims=True)
        np.testing.assert_allclose(error, sse, rtol=1e-3, atol=1e-5)
        for ds, db in [(1.01, 0), (0.99, 0), (1, 0.002), (1, -0.002)]:
            assert (sse <= (cc * ((scale * ds) * q + (bias + db) - x) ** 2).sum(0, keepdims=True)).all()
    best_scale, best_bias = fit_scales_biases(mx.array(x.T.reshape(64, 1, 64)), 3)
    assert best_scale.shape == best_bias.shape == (64, 1)


def test_degenerate_groups_stay_exact():
    """Constant groups (zero range) and zeros: min/max represents them; so do we."""
    weight = mx.concatenate([mx.zeros((2, 64)), mx.full((2, 64), 0.5), gaussian(2, 64)], axis=0)
    packed, scales, biases = quantize(weight, 4, 64, "optimal", mx.float32)
    approx = mx.dequantize(packed, scales, biases, group_size=64, bits=4)
    assert mx.all(mx.isfinite(approx)).item()
    np.testing.assert_array_equal(np.array(approx[:4]), np.array(weight[:4]))


def test_large_tensors_are_quantized_in_chunks_with_the_same_result(monkeypatch):
    from mlx_openelm import quantizers

    weight = gaussian(40, 128, seed=5)
    whole = quantize(weight, 3, 32, "optimal", mx.float16)
    monkeypatch.setattr(quantizers, "CHUNK_ELEMENTS", 128 * 7)  # 7 rows a chunk, the last one short
    chunked = quantize(weight, 3, 32, "optimal", mx.float16)
    assert all(mx.array_equal(a, b).item() for a, b in zip(whole, chunked))


def test_quantized_linear_and_embedding_load_our_output():
    weight = gaussian(32, 128, seed=7)
    packed, scales, biases = quantize(weight, 5, 32, "optimal", mx.float32)
    x = mx.array(np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32))
    layer = nn.QuantizedLinear(128, 32, bias=False, group_size=32, bits=5)
    layer.update({"weight": packed, "scales": scales, "biases": biases})
    dense = mx.dequantize(packed, scales, biases, group_size=32, bits=5)
    np.testing.assert_allclose(np.array(layer(x)), np.array(x @ dense.T), rtol=1e-4, atol=1e-5)
    embedding = nn.QuantizedEmbedding(32, 128, group_size=32, bits=5)
    embedding.update({"weight": packed, "scales": scales, "biases": biases})
    np.testing.assert_allclose(np.array(embedding(mx.array([3, 7]))), np.array(dense[mx.array([3, 7])]), rtol=1e-6)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown quantization method 'best'.*minmax, optimal"):
        quantize(gaussian(2, 64), 4, 64, "best")
    assert METHODS == ("minmax", "optimal")


def weighted_group_errors(weight, quantized, bits, group_size, importance) -> np.ndarray:
    """Each group's squared error with column j's term counted importance[j] times."""
    packed, scales, biases = quantized
    approx = np.array(mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32),
                                    group_size=group_size, bits=bits))
    terms = (approx - np.array(weight)) ** 2 * np.array(importance)
    return terms.reshape(weight.shape[0], -1, group_size).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128])
def test_importance_weighted_fit_never_loses_to_minmax_and_moves_error_off_important_columns(bits, group_size):
    weight = gaussian(48, 256, seed=7 * bits + group_size)
    # a trained model's few input channels with large activations: 8 columns 30x as important
    importance = np.ones(256, dtype=np.float32)
    importance[np.random.default_rng(bits).choice(256, 8, replace=False)] = 30.0
    importance = mx.array(importance)
    minmax = quantize(weight, bits, group_size, "minmax", mx.float16, importance)  # min/max ignores it
    assert all(mx.array_equal(a, b).item() for a, b in zip(minmax, quantize(weight, bits, group_size, "minmax",
                                                                            mx.float16)))
    plain = quantize(weight, bits, group_size, "optimal", mx.float16)
    weighted = quantize(weight, bits, group_size, "optimal", mx.float16, importance)
    errors = {name: weighted_group_errors(weight, q, bits, group_size, importance)
              for name, q in (("minmax", minmax), ("plain", plain), ("weighted", weighted))}
    assert (errors["weighted"] <= errors["minmax"]).all()
    assert errors["weighted"].sum() < 0.97 * errors["plain"].sum()  # the weighted objective is what it fits


@pytest.mark.parametrize("bits", [3, 4])
def test_uniform_importance_is_the_unweighted_fit_bit_for_bit(bits):
    weight = gaussian(32, 128, seed=bits)
    plain = quantize(weight, bits, 64, "optimal", mx.float16)
    for value in (1.0, 4.0):  # only ratios matter
        uniform = quantize(weight, bits, 64, "optimal", mx.float16, mx.full((128,), value))
        assert all(mx.array_equal(a, b).item() for a, b in zip(plain, uniform)), value


def _importance_layers(rng, dim=256, heads=(4, 2), head_dim=16, ffn=48):
    """A 1-layer model's tensors for data_free_importance: norms, qkv_proj (4 query heads, 2 KV
    heads) and a GLU proj_1, with rows of unequal scale."""
    from types import SimpleNamespace

    q, kv = heads
    args = SimpleNamespace(num_transformer_layers=1, share_input_output_layers=True, num_query_heads=(q,),
                           num_kv_heads=(kv,), head_dim=head_dim, ffn_with_glu=True)

    def rows(n, scale):
        return rng.normal(0, dim ** -0.5, (n, dim)) * rng.uniform(*scale, (n, 1))

    tensors = {"transformer.norm.weight": rng.uniform(0.1, 2, dim),
               "transformer.layers.0.attn_norm.weight": rng.uniform(0.1, 2, dim),
               "transformer.layers.0.ffn_norm.weight": rng.uniform(0.1, 2, dim),
               "transformer.layers.0.attn.qkv_proj.weight": rows((q + 2 * kv) * head_dim, (0.2, 2.0)),
               "transformer.layers.0.ffn.proj_1.weight": rows(2 * ffn, (0.5, 4.0))}
    return args, {k: mx.array(v.astype(np.float32)) for k, v in tensors.items()}


def test_data_free_importance_is_the_norm_weight_squared_where_a_linear_reads_a_norm():
    from mlx_openelm.convert.importance import data_free_importance

    args, tensors = _importance_layers(np.random.default_rng(0))
    importance = data_free_importance(args, tensors.__getitem__)
    pairs = {"transformer.token_embeddings.weight": "transformer.norm.weight",
             "transformer.layers.0.attn.qkv_proj.weight": "transformer.layers.0.attn_norm.weight",
             "transformer.layers.0.ffn.proj_1.weight": "transformer.layers.0.ffn_norm.weight"}
    assert set(importance) == set(pairs) | {"transformer.layers.0.ffn.proj_2.weight"}  # out_proj: uniform
    for weight, norm in pairs.items():
        g2 = np.array(tensors[norm]) ** 2
        np.testing.assert_allclose(np.array(importance[weight]), g2 / g2.mean(), rtol=1e-5)
    tensors["transformer.layers.0.ffn_norm.weight"] = mx.zeros((256,))  # nothing known: every column alike
    importance = data_free_importance(args, tensors.__getitem__)
    np.testing.assert_array_equal(np.array(importance["transformer.layers.0.ffn.proj_1.weight"]), 1.0)


def test_data_free_importance_of_proj_2_is_its_inputs_mean_square_on_white_norm_inputs():
    """Monte Carlo: x = x_hat * g with x_hat ~ N(0, 1) white; proj_2 reads silu(gate x) * (up x).
    The importance (quadrature, no sampling) must match the sampled mean squares, normalised, to
    sampling error."""
    from mlx_openelm.convert.importance import data_free_importance

    rng = np.random.default_rng(1)
    args, tensors = _importance_layers(rng)
    importance = data_free_importance(args, tensors.__getitem__)
    t = {k: np.array(v, dtype=np.float64) for k, v in tensors.items()}
    x = rng.standard_normal((40_000, 256)) * t["transformer.layers.0.ffn_norm.weight"]
    gate, up = np.split(x @ t["transformer.layers.0.ffn.proj_1.weight"].T, 2, axis=1)
    sampled = np.mean((gate / (1 + np.exp(-gate)) * up) ** 2, axis=0)
    np.testing.assert_allclose(np.array(importance["transformer.layers.0.ffn.proj_2.weight"]),
                               sampled / sampled.mean(), rtol=0.08)
    assert sampled.max() / sampled.min() > 4  # rows of unequal scale: a uniform answer would fail
