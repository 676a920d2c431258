"""An independent float64 numpy forward pass of OpenELM, written from the architecture."""

from __future__ import annotations

import numpy as np

EPS = 1e-6  # Apple's fixed value; a config's optional "rms_norm_eps" overrides it


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float = EPS) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, base: float) -> np.ndarray:
    """Rotate-half RoPE on (heads, length, head_dim)."""
    length, dim = x.shape[-2:]
    inv_freq = base ** (-np.arange(0, dim, 2) / dim)
    angles = np.arange(length)[:, None] * inv_freq[None, :]  # (L, D/2)
    cos = np.cos(np.concatenate([angles, angles], axis=-1))
    sin = np.sin(np.concatenate([angles, angles], axis=-1))
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + np.concatenate([-second, first], axis=-1) * sin


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def forward(weights: dict, config: dict, tokens) -> np.ndarray:
    """Logits (L, vocab) for one sequence of token ids."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    hd = config["head_dim"]
    eps = config.get("rms_norm_eps", EPS)
    tokens = np.asarray(tokens)
    length = len(tokens)
    x = w["transformer.token_embeddings.weight"][tokens]
    causal = np.triu(np.full((length, length), -np.inf), k=1)
    for i in range(config["num_transformer_layers"]):
        p = f"transformer.layers.{i}."
        n_q, n_kv = config["num_query_heads"][i], config["num_kv_heads"][i]
        h = _rms_norm(x, w[p + "attn_norm.weight"], eps)
        qkv = (h @ w[p + "attn.qkv_proj.weight"].T).reshape(length, n_q + 2 * n_kv, hd).transpose(1, 0, 2)
        q, k, v = qkv[:n_q], qkv[n_q : n_q + n_kv], qkv[n_q + n_kv :]
        if config["normalize_qk_projections"]:
            q = _rms_norm(q, w[p + "attn.q_norm.weight"], eps)
            k = _rms_norm(k, w[p + "attn.k_norm.weight"], eps)
        q, k = _rope(q, config["rope_freq_constant"]), _rope(k, config["rope_freq_constant"])
        heads = []
        for head in range(n_q):
            kv_head = head // (n_q // n_kv)  # query heads share KV heads in contiguous groups
            scores = q[head] @ k[kv_head].T / np.sqrt(hd) + causal
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            heads.append((scores / scores.sum(axis=-1, keepdims=True)) @ v[kv_head])
        attn = np.stack(heads, axis=1).reshape(length, n_q * hd)
        x = x + attn @ w[p + "attn.out_proj.weight"].T
        h = _rms_norm(x, w[p + "ffn_norm.weight"], eps) @ w[p + "ffn.proj_1.weight"].T
        if config["ffn_with_glu"]:
            gate, up = np.split(h, 2, axis=-1)
            h = _silu(gate) * up
        else:
            h = _silu(h)
        x = x + h @ w[p + "ffn.proj_2.weight"].T
    x = _rms_norm(x, w["transformer.norm.weight"], eps)
    head = w["transformer.token_embeddings.weight"] if config["share_input_output_layers"] else w["lm_head.weight"]
    return x @ head.T
