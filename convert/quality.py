"""Evaluating a conversion: the output's logits against the float input's (KL divergence).

Both models run one decoder layer at a time through `Model.embed`, `Model.run_layer` and
`Model.head` (the pieces `Model.__call__` is made of), loading each layer's weights just
before it runs and releasing them after, so the check holds the embedding plus one layer,
not a second copy of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_openelm.config import TOKENIZER_VOCAB_SIZE, ModelArgs, read_config
from mlx_openelm.folder.names import CONFIG_FILE
from mlx_openelm.loading import read_weights
from mlx_openelm.model import Model
from mlx_openelm.quantization import Quantization, apply_quantization, read_quantization

from .sources import Source

EVAL_LENGTH = 64
EVAL_SEED = 1234


def eval_tokens(args: ModelArgs, length: int = EVAL_LENGTH) -> list[int]:
    """A fixed token sequence: BOS then seeded pseudo-random ids of the vocabulary."""
    rng = np.random.default_rng(EVAL_SEED)
    high = max(4, min(args.vocab_size, TOKENIZER_VOCAB_SIZE))
    length = min(length, args.max_context_length)
    return [args.bos_token_id] + rng.integers(3, high, size=length - 1).tolist()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(p_ref || p) per position, in float64."""
    log_p = _log_softmax(reference_logits.astype(np.float64))
    log_q = _log_softmax(logits.astype(np.float64))
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def layerwise_logits(
    args: ModelArgs,
    tensor: Callable[[str], mx.array],
    tokens: Sequence[int],
    quantization: Optional[Quantization] = None,
) -> np.ndarray:
    """Float32 logits (L, vocab) of `tokens`, computed one decoder layer at a time.

    `tensor(name)` returns a checkpoint tensor by our name (MLX or numpy). `Model(args)` is
    a lazy skeleton whose random initial weights are never evaluated: each part gets its
    real weights just before it runs, and a layer gets its lazy skeleton weights back after.
    """
    model = Model(args)
    if quantization is not None:
        apply_quantization(model, quantization)
    load_module(model.transformer.token_embeddings, "transformer.token_embeddings.", tensor)
    h = model.embed(mx.array([list(tokens)]))
    for i, layer in enumerate(model.layers):
        skeleton = layer.parameters()
        load_module(layer, f"transformer.layers.{i}.", tensor)
        h = model.run_layer(i, h)
        mx.eval(h)
        layer.update(skeleton)  # release this layer's weights
    load_module(model.transformer.norm, "transformer.norm.", tensor)
    if "lm_head" in model:
        load_module(model.lm_head, "lm_head.", tensor)
    return np.array(model.head(h)[0].astype(mx.float32))


def load_module(module, prefix: str, tensor: Callable[[str], mx.array]) -> None:
    """Give `module` its checkpoint weights `tensor(prefix + name)`, floats in float32."""
    weights = []
    for name, _ in tree_flatten(module.parameters()):
        array = tensor(prefix + name)
        if not isinstance(array, mx.array):  # numpy from CoreNet files and float64 averages
            array = mx.array(np.asarray(array, dtype=np.float32))
        if mx.issubdtype(array.dtype, mx.floating):
            array = array.astype(mx.float32)  # the CPU runtime's compute dtype
        weights.append((name, array))
    module.load_weights(weights, strict=True)


def reference_logits(source: Source, tokens: Sequence[int]) -> np.ndarray:
    """Logits of the float input model (float32 compute) on `tokens`."""
    return layerwise_logits(source.args, source.get, tokens)


def model_logits(folder: Path, tokens: Sequence[int], config: Optional[dict] = None) -> np.ndarray:
    """Logits of a converted folder on `tokens`, as `load_model(folder, float32)` computes them
    (`config`: its config.json, when not written yet)."""
    config = config if config is not None else read_config(folder / CONFIG_FILE)
    weights = read_weights(folder)
    return layerwise_logits(ModelArgs.from_dict(config), weights.pop, tokens, read_quantization(config))
