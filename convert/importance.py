"""Which weights matter: a per-input-column importance for the error-minimising quantizer.

A linear's output error on an input x is (W' - W) x. Averaged over inputs, its square is, row
by row, sum_j (W'_j - W_j)**2 E[x_j**2] plus cross terms that cancel when the errors of
different columns are independent; so the squared weight error of column j should count
E[x_j**2] times (llama.cpp's importance matrix is this, measured). Two sources for it:

- data-free (`data_free_importance`): every linear's input is a function of an RMSNorm's output
  x = x_hat * g, with x_hat taken as white (each channel of mean square 1, uncorrelated):
  - qkv_proj, proj_1 and the output head read it directly: E[x_j**2] = g_j**2;
  - proj_2 reads silu(a) * b with a, b the gate and up rows of proj_1 applied to x: Gaussian
    with variances sum_k W[r, k]**2 g_k**2, so E = E[silu(a)**2] E[b**2] (a, b independent;
    E[silu(a)**2] by Gauss-Hermite quadrature).
  - out_proj (attention outputs) weighs every column alike.
  On the trained test model the proj_2 estimate matters most: with every column alike, the
  error-minimising fit of proj_2 lost to min/max (3 bits, group 64, proj_2 alone: KL 0.306
  against 0.270); with it, 0.145 (measured activations: 0.088). The same propagation for
  out_proj (the value rows' E[v**2]) helped at 3 bits and hurt at 2, and with it the whole
  model did worse at both (3 bits, group 64: KL 1.80 against 1.77 without it), so it is not used.
- measured (`--calibration-text`): the mean of x_j**2 over the calibration tokens, for every
  linear and the head (`convert/calibration.py` records it).

Importances are normalised to a mean of 1 (only their ratios matter to the fit).
"""

from __future__ import annotations

from typing import Callable, Union

import mlx.core as mx
import numpy as np

from mlx_openelm.config import ModelArgs

# (norm, the linear reading its output) within a decoder layer
NORM_INPUTS = (("attn_norm", "attn.qkv_proj"), ("ffn_norm", "ffn.proj_1"))


def head_weight_name(args: ModelArgs) -> str:
    """The tensor that is the output head: the tied token embedding, or lm_head."""
    return "transformer.token_embeddings.weight" if args.share_input_output_layers else "lm_head.weight"


def normalised(x: mx.array) -> mx.array:
    """Non-negative, mean 1 (all ones when nothing is known: a zero or empty signal)."""
    x = mx.maximum(x.astype(mx.float32), 0)
    mean = mx.mean(x)
    return mx.where(mean > 0, x / mx.where(mean > 0, mean, 1), 1.0)


def _as_numpy(array) -> np.ndarray:
    return np.asarray(array.astype(mx.float32) if isinstance(array, mx.array) else array, dtype=np.float64)


# E[silu(a)**2] for a ~ N(0, sigma**2): probabilists' Gauss-Hermite nodes and weights
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(48)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


def silu_mean_square(sigma: np.ndarray) -> np.ndarray:
    """E[silu(a)**2] for a ~ N(0, sigma**2), elementwise."""
    a = sigma[..., None] * _NODES
    return np.square(a / (1 + np.exp(-a))) @ _WEIGHTS


def _output_mean_square(weight: np.ndarray, input_mean_square: np.ndarray) -> np.ndarray:
    """E[(W x)_r**2] per row r for independent inputs of the given mean squares."""
    return np.square(weight) @ input_mean_square


def ffn_hidden_importance(proj_1: np.ndarray, g2: np.ndarray, glu: bool) -> np.ndarray:
    """proj_2's input columns: silu(gate) * up (GLU) or silu(h), from proj_1's rows."""
    if not glu:
        return silu_mean_square(np.sqrt(_output_mean_square(proj_1, g2)))
    gate, up = np.split(proj_1, 2, axis=0)
    return silu_mean_square(np.sqrt(_output_mean_square(gate, g2))) * _output_mean_square(up, g2)


def data_free_importance(args: ModelArgs, tensor: Callable[[str], Union[mx.array, np.ndarray]]) -> dict[str, mx.array]:
    """Weight name -> data-free importance of its input columns, for qkv_proj, proj_1, proj_2 and
    the head (module docstring; out_proj: none, every column alike); `tensor(name)` reads a weight
    of the float model (the norms and each proj_1)."""
    def norm_g2(name: str) -> np.ndarray:
        return np.square(_as_numpy(tensor(name)))

    def as_importance(x: np.ndarray) -> mx.array:
        return normalised(mx.array(x.astype(np.float32)))

    out = {head_weight_name(args): as_importance(norm_g2("transformer.norm.weight"))}
    for i in range(args.num_transformer_layers):
        layer = f"transformer.layers.{i}."
        g2 = {norm: norm_g2(f"{layer}{norm}.weight") for norm, _ in NORM_INPUTS}
        for norm, linear in NORM_INPUTS:
            out[f"{layer}{linear}.weight"] = as_importance(g2[norm])
        ffn_g2 = g2["ffn_norm"]
        proj_1 = _as_numpy(tensor(layer + "ffn.proj_1.weight"))
        out[layer + "ffn.proj_2.weight"] = as_importance(ffn_hidden_importance(proj_1, ffn_g2, args.ffn_with_glu))
    mx.eval(out)
    return out
