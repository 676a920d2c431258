"""The OpenELM paper's throughput protocol (Table 7b) and its published Apple figures.

Mehta et al., "OpenELM: An Efficient Language Model Family with Open Training and
Inference Framework", arXiv:2404.14619, Section 4 / Table 7b: throughput on a
MacBook Pro with an M2 Max (64 GB) using MLX, a short prompt, 1024 generated
tokens, batch size 1, 16-bit and 4-bit weights, a warm-up run first. Table 8 is
the normalization ablation (a naive RMSNorm against optimized kernels).

The published figures are not recorded here (no sourced copy of the table was
reachable offline), so reports say "not found" rather than print numbers we cannot source.
"""

from __future__ import annotations

PAPER_SOURCE = "OpenELM paper (arXiv:2404.14619), Table 7b: MacBook Pro M2 Max, MLX"

# Table 7b's settings.
PAPER_PROMPT_TOKENS = 35  # "a short prompt" of about 35 tokens
PAPER_GENERATION_TOKENS = 1024
PAPER_BITS = (None, 4)  # 16-bit float (None: unquantized) and 4-bit
