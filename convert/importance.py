"""Which weights matter: a per-input-column importance for the error-minimising quantizer.

A linear's output error on an input x is (W' - W) x. Averaged over inputs, its square is, row
by row, sum_j (W'_j - W_j)**2 E[x_j**2] plus cross terms that cancel when the errors of
different columns are independent; so the squared weight error of column j should count
E[x_j**2] times (llama.cpp's importance matrix is this, measured). Two sources for it:

- data-free: qkv_proj, proj_1 and the output head read the output of an RMSNorm, x = x_hat * g,
  so E[x_j**2] = g_j**2 E[x_hat_j**2]. The norm weight g is known; E[x_hat_j**2] is not, and is
  taken as alike across channels, mixed with the uniform weighting so that no column is ever
  ignored (`NORM_MIX`). out_proj and proj_2 read attention and SwiGLU outputs: uniform.
- measured (`--calibration-text`): the mean of x_j**2 over the calibration tokens, for every
  linear and the head (`convert/calibration.py` records it).

Importances are normalised to a mean of 1 (only their ratios matter to the fit).
"""

from __future__ import annotations

from typing import Callable, Union

import mlx.core as mx
import numpy as np

from mlx_openelm.config import ModelArgs

# importance = (1 - NORM_MIX) + NORM_MIX * g**2 / mean(g**2)
NORM_MIX = 1.0
# (norm, the linear reading its output) within a decoder layer
NORM_INPUTS = (("attn_norm", "attn.qkv_proj"), ("ffn_norm", "ffn.proj_1"))


def head_weight_name(args: ModelArgs) -> str:
    """The tensor that is the output head: the tied token embedding, or lm_head."""
    return "transformer.token_embeddings.weight" if args.share_input_output_layers else "lm_head.weight"


def normalised(x: mx.array) -> mx.array:
    x = mx.maximum(x.astype(mx.float32), 0)
    mean = mx.mean(x)
    return mx.where(mean > 0, x / mx.where(mean > 0, mean, 1), 1.0)


def from_norm(g: mx.array) -> mx.array:
    """The data-free importance of the columns that read the RMSNorm with weight `g`."""
    return (1 - NORM_MIX) + NORM_MIX * normalised(mx.square(g.astype(mx.float32)))


def norm_importance(args: ModelArgs, tensor: Callable[[str], Union[mx.array, np.ndarray]]) -> dict[str, mx.array]:
    """Weight name -> data-free importance of its input columns, for the linears that read an
    RMSNorm (qkv_proj, proj_1, the head); `tensor(name)` reads a norm weight."""
    def read(name: str) -> mx.array:
        array = tensor(name)
        return array if isinstance(array, mx.array) else mx.array(np.asarray(array, dtype=np.float32))

    out = {head_weight_name(args): from_norm(read("transformer.norm.weight"))}
    for i in range(args.num_transformer_layers):
        for norm, linear in NORM_INPUTS:
            out[f"transformer.layers.{i}.{linear}.weight"] = from_norm(read(f"transformer.layers.{i}.{norm}.weight"))
    mx.eval(out)
    return out
