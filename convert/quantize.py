"""Turning each float tensor into the output's tensors: cast, or quantize as the plan says."""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import mlx.core as mx
import numpy as np

from mlx_openelm.errors import CheckpointError
from mlx_openelm.quantization import DEFAULT_METHOD, MODE, QuantizationPlan

from mlx_openelm.quantizers import quantize

ERROR_BLOCK_ELEMENTS = 1 << 18  # rows whose error is computed together (~1 MB of float32)


def convert_tensor(
    name: str, weight: Union[np.ndarray, mx.array], dtype: mx.Dtype, plan: Optional[QuantizationPlan],
    source: str = "input", importance: Optional[mx.array] = None,
) -> tuple[dict[str, mx.array], float]:
    """Cast or quantize one float tensor: the output tensors by name, and their relative error.

    `importance`: the weight of each input column's error for the optimal method (importance.py).

    The relative error is ||w' - w|| / ||w|| with w the input tensor (float32/64) and w'
    what the output represents (the dequantized weight, or the cast one). A tensor holding
    NaN or infinities (in the input, or after the cast) is refused, naming it and `source`;
    the check is part of the same evaluation, not another pass over the files.
    """
    if isinstance(weight, np.ndarray):
        weight = mx.array(weight.astype(np.float32, copy=False))
    w32 = weight.astype(mx.float32)
    spec = plan.spec(name[: -len(".weight")]) if plan is not None and name.endswith(".weight") else None
    if spec is None:
        out = w32.astype(dtype)
        tensors = {name: out}
        rows = _as_rows(out)

        def represented(lo: int, hi: int) -> mx.array:
            return rows[lo:hi].astype(mx.float32)
    else:
        bits, group_size = spec
        method = plan.quantization.method or DEFAULT_METHOD
        wq, scales, biases = quantize(w32, bits, group_size, method, dtype, importance)
        prefix = name[: -len("weight")]
        tensors = {name: wq, prefix + "scales": scales, prefix + "biases": biases}
        # in float32, as the runtime computes on CPU (load_model widens scales and biases)
        scales32, biases32 = scales.astype(mx.float32), biases.astype(mx.float32)

        def represented(lo: int, hi: int) -> mx.array:
            return mx.dequantize(wq[lo:hi], scales32[lo:hi], biases32[lo:hi], group_size=group_size, bits=bits,
                                 mode=MODE)
    w_rows = _as_rows(w32)
    num, den = _sums_of_squares(w_rows, represented)
    mx.eval(tensors, num, den)
    num, den = num.item(), den.item()
    # A finite sum means every term was finite, so the non-finite checks need no pass of their own;
    # only a tensor whose sum is not finite is looked at element by element (a finite tensor whose
    # squares overflow float32 lands there too and is told apart).
    if not math.isfinite(den) and not mx.isfinite(w32).all().item():
        raise CheckpointError(f"{source}: tensor '{name}' holds NaN or infinite values")
    if not math.isfinite(num) and not mx.isfinite(represented(0, w_rows.shape[0])).all().item():
        raise CheckpointError(f"{source}: tensor '{name}' overflows {dtype} (values beyond its range); "
                              "convert with `dtype=bfloat16` or float32")
    return tensors, math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _as_rows(x: mx.array) -> mx.array:
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def _sums_of_squares(w: mx.array, represented: Callable[[int, int], mx.array]) -> tuple[mx.array, mx.array]:
    """sum((w' - w)**2) and sum(w**2) over the rows of `w`, with w' = represented(lo, hi) for rows lo:hi.

    A block of rows at a time: whole-tensor float32 temporaries cost more in page faults than
    in arithmetic (blocks stay in MLX's buffer cache). Summed by rows, then over the rows: one
    float32 sum over millions of terms drifts by percents.
    """
    step = max(1, ERROR_BLOCK_ELEMENTS // w.shape[-1])
    errors, norms = [], []
    for lo in range(0, w.shape[0], step):
        block = w[lo : lo + step]
        errors.append(mx.sum(mx.square(represented(lo, lo + step) - block), axis=-1))
        norms.append(mx.sum(mx.square(block), axis=-1))
    return mx.sum(mx.concatenate(errors)), mx.sum(mx.concatenate(norms))
