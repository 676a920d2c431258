"""The OpenELM decoder in MLX.

Module names mirror Apple's checkpoint keys (``transformer.layers.N.attn.qkv_proj``
and so on), so Hugging Face safetensors load with no rename table. Every layer
has its own query-head count, KV-head count and FFN width (layer-wise scaling).
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .config import ModelArgs
from .errors import ContextLengthError


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.head_dim = args.head_dim
        self.num_query_heads = args.num_query_heads[layer]
        self.num_kv_heads = args.num_kv_heads[layer]
        self.rope_base = args.rope_freq_constant
        self.scale = args.head_dim**-0.5
        self.qkv_proj = nn.Linear(args.model_dim, args.qkv_out_dims[layer], bias=False)
        if args.normalize_qk_projections:
            self.q_norm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(args.head_dim, eps=args.rms_norm_eps)
        self.out_proj = nn.Linear(self.num_query_heads * args.head_dim, args.model_dim, bias=False)

    def __call__(self, x: mx.array, mask, cache: Optional[KVCache]) -> mx.array:
        B, L, _ = x.shape
        # qkv rows are [q heads | k heads | v heads]: (B, L, Hq + 2*Hkv, hd) -> (B, H, L, hd)
        qkv = self.qkv_proj(x).reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)
        q_end = self.num_query_heads
        k_end = q_end + self.num_kv_heads
        queries, keys, values = qkv[:, :q_end], qkv[:, q_end:k_end], qkv[:, k_end:]
        if "q_norm" in self:
            queries = self.q_norm(queries)
            keys = self.k_norm(keys)
        offset = 0 if cache is None else cache.offset
        queries = mx.fast.rope(queries, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        keys = mx.fast.rope(keys, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        # native GQA: keys/values keep their Hkv heads
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        ffn_dim = args.ffn_dims[layer]
        self.glu = args.ffn_with_glu
        self.proj_1 = nn.Linear(args.model_dim, 2 * ffn_dim if self.glu else ffn_dim, bias=False)
        self.proj_2 = nn.Linear(ffn_dim, args.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.proj_1(x)
        if self.glu:
            gate, up = mx.split(h, 2, axis=-1)  # first half gate, second half up
            return self.proj_2(nn.silu(gate) * up)
        return self.proj_2(nn.silu(h))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.attn = Attention(args, layer)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.ffn = FeedForward(args, layer)

    def __call__(self, x: mx.array, mask, cache: Optional[KVCache]) -> mx.array:
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    """The embedding, the decoder layers and the final norm; `Model` runs them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_transformer_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)


class Model(nn.Module):
    """OpenELM causal LM. ``model(tokens)`` maps (B, L) token ids to (B, L, vocab) logits.

    Pass ``cache=make_cache(model)`` to continue from earlier calls, and ``mask`` (an array
    broadcastable to (B, heads, L, keys): True, or an additive 0, where a query may attend)
    to replace the default causal mask, as batched decoding of padded rows does.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.transformer = Transformer(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: Optional[Sequence] = None, mask: Optional[mx.array] = None) -> mx.array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, length), got {tokens.shape}")
        if cache is None and tokens.shape[1] > self.args.max_context_length:
            raise ContextLengthError(
                f"{tokens.shape[1]} tokens exceed the model's context of {self.args.max_context_length}"
            )
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} entries, the model has {len(self.layers)} layers")
        h = self.embed(tokens)
        for i, layer_cache in enumerate(cache if cache is not None else [None] * len(self.layers)):
            h = self.run_layer(i, h, layer_cache, mask)
        return self.head(h)

    # The forward pass in its three steps, so a caller can run it a layer at a time (the
    # converter's quality check loads one layer's weights at a time this way).

    def embed(self, tokens: mx.array) -> mx.array:
        """(B, L) token ids -> (B, L, model_dim) hidden states."""
        return self.transformer.token_embeddings(tokens)

    def run_layer(self, i: int, h: mx.array, cache: Optional[KVCache] = None, mask: Optional[mx.array] = None
                  ) -> mx.array:
        """Decoder layer `i` on hidden states `h` (causal over h's positions unless `mask` is given)."""
        if mask is None:
            mask = "causal" if h.shape[1] > 1 else None
        return self.layers[i](h, mask, cache)

    def head(self, h: mx.array) -> mx.array:
        """Final norm and output projection: hidden states -> logits."""
        h = self.transformer.norm(h)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.transformer.token_embeddings.as_linear(h)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.transformer.layers


def make_cache(model: Model) -> list[KVCache]:
    """One KV cache per layer, each sized for that layer's KV heads."""
    args = model.args
    return [
        KVCache(num_kv_heads=kv, head_dim=args.head_dim, max_length=args.max_context_length)
        for kv in args.num_kv_heads
    ]
