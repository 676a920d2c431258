"""LoRA and DoRA wrappers around a frozen `nn.Linear` or `nn.QuantizedLinear`.

The parameter names are mlx-lm's (`linear`, `lora_a` of shape (input_dims, r), `lora_b` of
shape (r, output_dims), DoRA's magnitude `m`), so adapters trained here and with mlx-lm load
in either. The base layer stays as it is (a quantized base stays quantized: QLoRA) and
frozen; the adapters are float32 whatever the compute dtype.

With `lora_b` zero (a fresh adapter) the output is the base layer's, bit for bit: the low-rank
term adds exact zeros. DoRA's row norms of the adapted weight are computed without ever
materialising it (nor dequantizing a quantized base):
||w + s b^T a^T||^2 = ||w||^2 + 2 s <w, b^T a^T> + s^2 ||b^T a^T||^2 per output row, where
<w, b^T a^T> comes from one base-layer call on a^T and ||b^T a^T||^2 from the r x r Gram
matrix of a. As in mlx-lm (and the DoRA paper's training recipe) the norm is a constant for
the gradient (`stop_gradient`).
"""

from __future__ import annotations

import math
from typing import Union

import mlx.core as mx
import mlx.nn as nn

BaseLinear = Union[nn.Linear, nn.QuantizedLinear]


def base_shape(linear: BaseLinear) -> tuple[int, int]:
    """(output_dims, input_dims) of a float or quantized linear layer."""
    output_dims, stored = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        return output_dims, stored * 32 // linear.bits
    return output_dims, stored


def dense_weight(linear: BaseLinear) -> mx.array:
    """The layer's weight (output_dims, input_dims) in float, dequantized if need be."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.biases,
                             group_size=linear.group_size, bits=linear.bits, mode=linear.mode)
    return linear.weight


class LoRALinear(nn.Module):
    """y = linear(x) + scale * dropout(x) @ lora_a @ lora_b, the base frozen."""

    def __init__(self, linear: BaseLinear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        output_dims, input_dims = base_shape(linear)
        linear.freeze()
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(input_dims)  # mlx-lm's initialisation, so seeded runs start alike
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))

    def low_rank(self, x: mx.array) -> mx.array:
        return (self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)).astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x) + self.low_rank(x)

    def delta(self) -> mx.array:
        """The update to the base weight, (output_dims, input_dims), in float32."""
        return self.scale * (self.lora_b.T @ self.lora_a.T)

    def fused_weight(self) -> mx.array:
        """The merged float weight: base + delta (in float32)."""
        return dense_weight(self.linear).astype(mx.float32) + self.delta()


class DoRALinear(LoRALinear):
    """y = m / ||w + delta||_row * (linear(x) + low-rank term); `m` starts at the base row norms."""

    def __init__(self, linear: BaseLinear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(linear, rank, scale, dropout)
        norms_sq = mx.sum(mx.square(dense_weight(linear).astype(mx.float32)), axis=1)
        self._base_norm_sq = norms_sq  # a constant of the frozen base (underscore: not a parameter)
        self.m = mx.sqrt(norms_sq)

    def adapted_norm(self) -> mx.array:
        """Row norms of w + delta (output_dims,), without forming the matrix."""
        a, b = self.lora_a, self.lora_b
        wa = self.linear(a.T.astype(self.linear_dtype())).astype(mx.float32)  # (r, out): a^T w^T
        cross = mx.sum(b * wa, axis=0)
        gram = a.T @ a
        delta_sq = mx.sum((gram @ b) * b, axis=0)
        return mx.sqrt(self._base_norm_sq + 2 * self.scale * cross + self.scale**2 * delta_sq)

    def linear_dtype(self) -> mx.Dtype:
        if isinstance(self.linear, nn.QuantizedLinear):
            return self.linear.scales.dtype
        return self.linear.weight.dtype

    def __call__(self, x: mx.array) -> mx.array:
        out = self.linear(x) + self.low_rank(x)
        return (self.m / mx.stop_gradient(self.adapted_norm())).astype(x.dtype) * out

    def fused_weight(self) -> mx.array:
        adapted = super().fused_weight()
        return (self.m / mx.linalg.norm(adapted, axis=1))[:, None] * adapted


ADAPTER_CLASSES = {"lora": LoRALinear, "dora": DoRALinear}
