"""What a conversion reports: sizes, bits per layer, errors and the quality check's numbers."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from typing import Optional

from mlx_openelm.quantization import QuantizationPlan


@dataclass
class ConvertReport:
    output: str
    inputs: list[str]
    source_kind: str
    dtype: str
    bits: Optional[int]
    group_size: Optional[int]
    recipe: Optional[str]
    parameters: int
    bits_per_weight: float
    size_bytes: int
    shards: int
    layer_bits: dict[str, int]  # "4": number of layers, "8": ..., "float": skipped
    skipped_layers: dict[str, int]  # module path -> input width not divisible by the group size
    max_rel_error: float
    max_rel_error_tensor: str
    kl_mean: Optional[float] = None
    kl_max: Optional[float] = None
    top1_agreement: Optional[float] = None
    eval_tokens: int = 0
    tokenizer: Optional[str] = None
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    method: Optional[str] = None  # how quantized groups got their scales and biases
    calibration: Optional[dict] = None  # {"text": file name, "tokens": n, "folded_layers": n}

    def to_dict(self) -> dict:
        return asdict(self)


def layer_bits(plan: Optional[QuantizationPlan]) -> dict[str, int]:
    """{"4": number of layers at 4 bits, ..., "float": layers kept float}."""
    counts: dict[str, int] = {}
    if plan is None:
        return counts
    for bits, _group in plan.specs.values():
        counts[str(bits)] = counts.get(str(bits), 0) + 1
    if plan.skipped:
        counts["float"] = len(plan.skipped)
    return counts


def peak_memory_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 1024**2
