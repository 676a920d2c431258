"""Turning each float tensor into the output's tensors: cast, or quantize as the plan says."""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx
import numpy as np

from mlx_openelm.errors import CheckpointError
from mlx_openelm.quantization import DEFAULT_METHOD, MODE, QuantizationPlan

from .quantizers import quantize


def convert_tensor(
    name: str, weight: Union[np.ndarray, mx.array], dtype: mx.Dtype, plan: Optional[QuantizationPlan],
    source: str = "input",
) -> tuple[dict[str, mx.array], float]:
    """Cast or quantize one float tensor: the output tensors by name, and their relative error.

    The relative error is ||w' - w|| / ||w|| with w the input tensor (float32/64) and w'
    what the output represents (the dequantized weight, or the cast one). A tensor holding
    NaN or infinities (in the input, or after the cast) is refused, naming it and `source`;
    the check is part of the same evaluation, not another pass over the files.
    """
    if isinstance(weight, np.ndarray):
        weight = mx.array(weight.astype(np.float32, copy=False))
    w32 = weight.astype(mx.float32)
    spec = plan.spec(name[: -len(".weight")]) if plan is not None and name.endswith(".weight") else None
    finite_in = mx.isfinite(w32).all()
    if spec is None:
        out = w32.astype(dtype)
        approx = out.astype(mx.float32)
        tensors = {name: out}
    else:
        bits, group_size = spec
        method = plan.quantization.method or DEFAULT_METHOD
        wq, scales, biases = quantize(w32, bits, group_size, method, dtype)
        prefix = name[: -len("weight")]
        tensors = {name: wq, prefix + "scales": scales, prefix + "biases": biases}
        # in float32, as the runtime computes on CPU (load_model widens scales and biases)
        approx = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size,
                               bits=bits, mode=MODE)
    finite_out = mx.isfinite(approx).all()
    num = mx.sqrt(mx.sum(mx.square(approx - w32)))
    den = mx.sqrt(mx.sum(mx.square(w32)))
    mx.eval(tensors, num, den, finite_in, finite_out)
    if not finite_in.item():
        raise CheckpointError(f"{source}: tensor '{name}' holds NaN or infinite values")
    if not finite_out.item():
        raise CheckpointError(f"{source}: tensor '{name}' overflows {dtype} (values beyond its range); "
                              "convert with --dtype bfloat16 or float32")
    rel = float(num.item()) / float(den.item()) if float(den.item()) > 0 else float(num.item())
    return tensors, rel
