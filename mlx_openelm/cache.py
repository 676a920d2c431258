"""Per-layer key/value cache, grown in fixed steps rather than per token."""

from __future__ import annotations

import mlx.core as mx

from .errors import ContextLengthError


class KVCache:
    """Keys and values of one attention layer, shaped (B, num_kv_heads, T, head_dim).

    Storage grows ``step`` positions at a time; ``offset`` is the number of valid
    positions (and the RoPE position of the next token).
    """

    step = 256

    def __init__(self, num_kv_heads: int, head_dim: int, max_length: int, step: int | None = None):
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_length = max_length
        if step is not None:
            self.step = step
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, Hkv, L, hd) keys/values; return everything cached so far."""
        B, num_heads, L, head_dim = keys.shape
        if (num_heads, head_dim) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"cache holds {self.num_kv_heads} heads of size {self.head_dim}, got {num_heads} of size {head_dim}"
            )
        end = self.offset + L
        if end > self.max_length:
            raise ContextLengthError(
                f"context is full: {self.offset} cached + {L} new tokens exceed the model's "
                f"context of {self.max_length} tokens"
            )
        if end > self.capacity:
            # Grow from the valid positions (after a trim, `offset` may be far below the
            # old capacity), rounding the new storage up to whole steps.
            capacity = -(-end // self.step) * self.step
            shape = (B, num_heads, capacity - self.offset, head_dim)
            grow_k = mx.zeros(shape, keys.dtype)
            grow_v = mx.zeros(shape, values.dtype)
            if self.keys is None or self.offset == 0:
                self.keys, self.values = grow_k, grow_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], grow_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], grow_v], axis=2)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def trim(self, n: int) -> int:
        """Forget the last `n` positions; returns how many were dropped."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
