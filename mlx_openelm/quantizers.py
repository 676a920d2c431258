"""Affine group quantizers that write MLX's format: packed uint32 codes, scales, biases.

The converter quantizes with them, and `fuse` re-quantizes merged layers; which method and
which layers is `quantization`'s policy (`METHODS`, `DEFAULT_METHOD` are defined there).

A group of `group_size` consecutive weights w is stored as codes q in [0, 2**bits - 1]
with one scale s and one bias b, and read back as s * q + b (`mx.dequantize`,
`nn.QuantizedLinear`, mlx-lm: all unchanged). Two ways to choose s and b:

- "minmax": `mx.quantize` (b = min, s = (max - min) / (2**bits - 1)), bit for bit what
  mlx-lm writes.
- "optimal": minimise the group's squared reconstruction error, each input column's term
  weighted by its importance (the converter's `importance.py`: the mean square of the activations it
  multiplies, estimated from the RMSNorm before the layer or measured on a calibration text;
  uniform when unknown). Several clipping candidates (the min/max range shrunk at either
  end), each followed by a weighted least-squares refit of s and b for its codes (as
  llama.cpp's k-quants do); the best one is polished by one more round of optimal codes
  (round to nearest) and optimal s and b. s and b are rounded to the stored dtype before the
  final codes are chosen, and any group where min/max does at least as well (in the same
  weighted error) keeps min/max's result, so it is never worse than min/max's, group by group.
"""

from __future__ import annotations

import itertools
from typing import Optional

import mlx.core as mx

from .errors import OptionError
from .quantization import DEFAULT_METHOD, METHODS

# Clipping candidates: the group's [min, max] range shrunk at the bottom and at the top by
# these fractions of a min/max step, each refitted by least squares. On Gaussian groups of
# 64 this 3x3 grid with one polish step comes within ~2-4% of the squared error of a dense
# 31x31 search with iterated refits, at a tenth of its cost (a second polish step gains 0.2%).
CLIP_STEPS = (0.0, 0.4, 0.8)
CANDIDATES = tuple(itertools.product(CLIP_STEPS, CLIP_STEPS))  # (bottom, top)
POLISH_STEPS = 1
CHUNK_ELEMENTS = 1 << 19  # rows quantized together: temporaries of 2 MB stay in cache

Quantized = tuple[mx.array, mx.array, mx.array]  # (packed uint32 codes, scales, biases)


def quantize(
    weight: mx.array, bits: int, group_size: int, method: str = DEFAULT_METHOD, dtype: Optional[mx.Dtype] = None,
    importance: Optional[mx.array] = None,
) -> Quantized:
    """Quantize a 2-D float `weight` (rows, cols) along its rows, in MLX's affine format.

    `dtype` is the dtype of the stored scales and biases (default: the weight's own);
    minmax quantizes `weight.astype(dtype)` exactly as `mx.quantize` (and mlx-lm) do.
    `importance` (optimal only): a non-negative weight per input column (cols,), e.g. the mean
    square of the activations that column multiplies; the squared error is weighted by it, so
    the error lands where it moves the layer's output least. None: every column alike.
    """
    if method not in METHODS:
        raise OptionError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    dtype = dtype or weight.dtype
    if method == "minmax":
        return mx.quantize(weight.astype(dtype), group_size=group_size, bits=bits, mode="affine")
    rows, cols = weight.shape
    if importance is not None:
        importance = importance.astype(mx.float32).reshape(1, cols // group_size, group_size)
    step = max(1, CHUNK_ELEMENTS // cols)
    parts = [_quantize_optimal(weight[i : i + step], bits, group_size, dtype, importance)
             for i in range(0, rows, step)]
    if len(parts) == 1:
        return parts[0]
    return tuple(mx.concatenate([p[k] for p in parts], axis=0) for k in range(3))


def _quantize_optimal(weight: mx.array, bits: int, group_size: int, dtype: mx.Dtype,
                      importance: Optional[mx.array] = None) -> Quantized:
    rows, cols = weight.shape
    w = weight.astype(mx.float32).reshape(rows, cols // group_size, group_size)
    scales, biases = fit_scales_biases(w, bits, importance)
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    codes, error = _codes_and_error(w, scales.astype(mx.float32), biases.astype(mx.float32), bits, importance)

    # Keep min/max's result wherever it is at least as good (after rounding both to `dtype`).
    mm_packed, mm_scales, mm_biases = mx.quantize(weight.astype(dtype), group_size=group_size, bits=bits)
    mm = mx.dequantize(mm_packed, mm_scales.astype(mx.float32), mm_biases.astype(mx.float32),
                       group_size=group_size, bits=bits).reshape(w.shape)
    mm_error = _weighted_sum(mx.square(mm - w), importance)
    ours = error < mm_error  # False where either is NaN: min/max then
    packed = pack_codes(codes.reshape(rows, cols), bits).reshape(rows, cols // group_size, -1)
    mm_packed = mm_packed.reshape(packed.shape)
    packed = mx.where(ours[..., None], packed, mm_packed).reshape(rows, -1)
    scales = mx.where(ours, scales, mm_scales)
    biases = mx.where(ours, biases, mm_biases)
    mx.eval(packed, scales, biases)
    return packed, scales, biases


def _weighted_sum(x: mx.array, importance: Optional[mx.array]) -> mx.array:
    return mx.sum(x if importance is None else x * importance, axis=-1)


def fit_scales_biases(w: mx.array, bits: int, importance: Optional[mx.array] = None) -> tuple[mx.array, mx.array]:
    """Per-group (scale, bias) in float32 minimising sum(c * (s * q + b - w)**2) with q the
    nearest codes and c the `importance` (broadcast to w; None: 1); `w` has groups along its
    last axis. Returns arrays of w.shape[:-1]."""
    levels = 2**bits - 1
    size = w.shape[-1]
    low = mx.min(w, axis=-1, keepdims=True)
    step = mx.maximum(mx.max(w, axis=-1, keepdims=True) - low, 1e-30) / levels
    # The search runs on u = (w - low) / step (w in min/max steps, 0..levels), so that a
    # candidate's codes are u times a number plus a number (scalars cost less than per-group
    # operands), and with each group down a column (sums across rows run about twice as fast
    # as sums along them). Each group's fit maps back exactly: w ~ low + step * (s * q + b).
    groups = w.shape[:-1]
    u = (w - low).reshape(-1, size).T * (1 / step.reshape(1, -1))  # (size, all groups)
    c = None if importance is None else mx.broadcast_to(importance, w.shape).reshape(-1, size).T
    cu = u if c is None else c * u
    sums = (mx.sum(cu, axis=0, keepdims=True), mx.sum(cu * u, axis=0, keepdims=True),
            size if c is None else mx.sum(c, axis=0, keepdims=True))

    shape = sums[0].shape
    best = (mx.full(shape, float("inf")), mx.ones(shape), mx.zeros(shape))  # error, s, b
    for clip_low, clip_high in CANDIDATES:
        factor = levels / (levels - clip_low - clip_high)
        codes = _candidate_codes(u, factor, clip_low * factor, levels, clip_high > 0)
        best = _keep_better(best, _least_squares(u, codes, *sums, c))
    for _ in range(POLISH_STEPS):
        _, scale, bias = best
        codes = _round_clip(u * (1 / scale), -bias / scale, levels)
        best = _keep_better(best, _least_squares(u, codes, *sums, c))
    _, scale, bias = best
    scale, bias = scale.reshape(groups), bias.reshape(groups)
    return step[..., 0] * scale, low[..., 0] + step[..., 0] * bias


def _candidate_codes(u: mx.array, factor: float, offset: float, levels: int, clip_above: bool) -> mx.array:
    """clip(round(u * factor - offset), 0, levels) for u >= 0: converting u * factor - offset + 0.5
    to int32 truncates, which is rounding down wherever the value is above -1 (below it: clipped
    first); the top needs clipping only when the candidate clips the top."""
    x = u * factor + (0.5 - offset)
    if offset >= 1.5:
        x = mx.maximum(x, 0.0)
    codes = x.astype(mx.int32)
    if clip_above:
        codes = mx.minimum(codes, levels)
    return codes.astype(mx.float32)


# Adding then subtracting 1.5 * 2**23 rounds a float32 of magnitude < 2**22 to the nearest
# integer (ties to even) in two cheap passes; mx.round costs about five.
_ROUNDER = 1.5 * 2**23


def _round_clip(x: mx.array, offset, levels: int, clip_below: bool = True, clip_above: bool = True) -> mx.array:
    """clip(round(x + offset), 0, levels), `offset` a per-group array or None; a side known
    not to need clipping can be skipped."""
    shifted = (x if offset is None else x + offset) + _ROUNDER
    if clip_below:
        shifted = mx.maximum(shifted, _ROUNDER)
    if clip_above:
        shifted = mx.minimum(shifted, _ROUNDER + levels)
    return shifted - _ROUNDER


def _keep_better(best, candidate):
    """Per group, the (error, scale, bias) with the lower error; evaluated, so that only one
    candidate's temporaries are alive at a time."""
    scale, bias, error = candidate
    better = error < best[0]
    kept = tuple(mx.where(better, new, old) for new, old in zip((error, scale, bias), best))
    mx.eval(kept)
    return kept


def _least_squares(w, codes, sum_w, sum_ww, size, c=None):
    """The (scale, bias) of the least-squares line w ~ scale * codes + bias down axis 0 (each
    term weighted by `c`: `sum_w`, `sum_ww` and `size` are then the weighted sums of w, w**2
    and 1), and its error (from the sums, so no second pass over w). Degenerate codes: inf."""
    cq = codes if c is None else c * codes
    sum_q = mx.sum(cq, axis=0, keepdims=True)
    sum_qq = mx.sum(cq * codes, axis=0, keepdims=True)
    sum_qw = mx.sum(cq * w, axis=0, keepdims=True)
    det = size * sum_qq - sum_q * sum_q
    valid = det > 0
    scale = (size * sum_qw - sum_q * sum_w) / mx.where(valid, det, 1)
    bias = (sum_w - scale * sum_q) / size
    error = sum_ww - scale * sum_qw - bias * sum_w  # the residual of a least-squares fit
    return scale, bias, mx.where(valid & (scale > 0), error, float("inf"))


def _codes_and_error(w, scales, biases, bits, importance=None):
    """The nearest codes for per-group `scales`, `biases` (a zero scale: codes 0) and each
    group's squared error (weighted by `importance`)."""
    scales, biases = scales[..., None], biases[..., None]
    inverse = mx.where(scales == 0, 0, 1 / mx.where(scales == 0, 1, scales))
    codes = _round_clip(w * inverse, -biases * inverse, 2**bits - 1)
    error = _weighted_sum(mx.square(codes * scales + biases - w), importance)
    return codes.astype(mx.uint32), error


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Codes (rows, cols) in [0, 2**bits) -> MLX's packing: a little-endian bit stream of
    `bits`-bit fields in uint32 words, (rows, cols * bits // 32). cols: a multiple of 32."""
    rows, cols = codes.shape
    codes = codes.astype(mx.uint32)
    if 32 % bits == 0:  # fields never straddle words: one shift and one sum
        fields = codes.reshape(rows, cols * bits // 32, 32 // bits)
        shifts = mx.array([i * bits for i in range(32 // bits)], dtype=mx.uint32)
        return mx.sum(mx.left_shift(fields, shifts), axis=-1).reshape(rows, cols * bits // 32)
    blocks = codes.reshape(rows, cols // 32, 32)  # 32 codes fill `bits` words
    offsets = [i * bits for i in range(32)]
    low = mx.left_shift(blocks, mx.array([o % 32 for o in offsets], dtype=mx.uint32))
    straddle = [i for i, o in enumerate(offsets) if o % 32 + bits > 32]
    high = mx.right_shift(blocks, mx.array([32 - offsets[i] % 32 if i in straddle else 0 for i in range(32)],
                                           dtype=mx.uint32))
    words = []
    for j in range(bits):  # bit fields are disjoint, so summing them is OR-ing them
        word = mx.sum(_take(low, [i for i, o in enumerate(offsets) if o // 32 == j]), axis=-1)
        spill = [i for i in straddle if offsets[i] // 32 + 1 == j]
        if spill:
            word = word + mx.sum(_take(high, spill), axis=-1)
        words.append(word)
    return mx.stack(words, axis=-1).reshape(rows, cols * bits // 32)


def _take(array: mx.array, indices: list[int]) -> mx.array:
    return mx.take(array, mx.array(indices, dtype=mx.uint32), axis=-1)


def unpack_codes(packed: mx.array, bits: int) -> mx.array:
    """The inverse of `pack_codes`: (rows, words) uint32 -> (rows, words * 32 // bits) codes."""
    rows, words = packed.shape
    blocks = packed.reshape(rows, words // bits, bits)
    codes = []
    for i in range(32):
        offset = i * bits
        value = mx.right_shift(blocks[..., offset // 32], offset % 32)
        if offset % 32 + bits > 32:
            value = value | mx.left_shift(blocks[..., offset // 32 + 1], 32 - offset % 32)
        codes.append(value & (2**bits - 1))
    return mx.stack(codes, axis=-1).reshape(rows, words * 32 // bits)


def group_errors(weight: mx.array, quantized: Quantized, bits: int, group_size: int) -> mx.array:
    """Squared reconstruction error of each group, (rows, cols // group_size), in float32."""
    packed, scales, biases = quantized
    approx = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32),
                           group_size=group_size, bits=bits)
    diff = (approx - weight.astype(mx.float32)).reshape(*scales.shape, group_size)
    return mx.sum(mx.square(diff), axis=-1)

