"""The OpenELM paper's throughput protocol (Table 7b) and its published Apple figures.

Mehta et al., "OpenELM: An Efficient Language Model Family with Open Training and
Inference Framework", arXiv:2404.14619, Section 4 / Table 7b: throughput on a
MacBook Pro with an M2 Max (64 GB) using MLX, a short prompt, 1024 generated
tokens, batch size 1, 16-bit and 4-bit weights, a warm-up run first. Table 8 is
the normalization ablation (a naive RMSNorm against optimized kernels).

The published figures could not be retrieved while this module was written (no
copy of the table was reachable offline), so none are recorded here and reports
print "not found" rather than numbers we cannot source. To add them, fill
PAPER_TABLE_7B with {(model, bits): {"prompt_tps": .., "generation_tps": .., "total_tps": ..}}.
"""

from __future__ import annotations

from typing import Optional

PAPER_SOURCE = "OpenELM paper (arXiv:2404.14619), Table 7b: MacBook Pro M2 Max, MLX"

# Table 7b's settings.
PAPER_PROMPT_TOKENS = 35  # "a short prompt" of about 35 tokens
PAPER_GENERATION_TOKENS = 1024
PAPER_BITS = (16, 4)

# (preset name, bits) -> {"prompt_tps", "generation_tps", "total_tps"}; empty: not found.
PAPER_TABLE_7B: dict[tuple[str, int], dict[str, float]] = {}


def paper_figures(model: str, bits: int) -> Optional[dict[str, float]]:
    """The paper's M2 Max figures for a preset and bit width, or None when not recorded."""
    return PAPER_TABLE_7B.get((model, bits))
