"""What `mlx-openelm bench` measures (`BenchSettings`) and how it reports progress
(`Progress`). No MLX here, so the command's --help stays instant."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from mlx_openelm.errors import ConfigError, OptionError


@dataclass
class BenchSettings:
    """What to measure. `bits` lists the weight formats to sweep: None is unquantized
    (float, in `dtype`), 8 or 4 quantized with `group_size`; `bits=None` as a whole
    means "as stored" for model folders and unquantized for presets."""

    models: list[str] = field(default_factory=list)  # model folders or repo ids
    presets: list[str] = field(default_factory=list)  # preset names or config.json paths (random weights)
    bits: Optional[list[Optional[int]]] = None
    dtype: Optional[str] = None  # default: the loader's (float32 on the CPU backend)
    group_size: int = 64
    prompt_tokens: list[int] = field(default_factory=lambda: [512])
    generation_tokens: list[int] = field(default_factory=lambda: [128])
    trials: int = 3
    warmup: bool = True
    warmup_tokens: int = 16
    protocol: str = "default"
    prompt: str = "random"
    ablation: Optional[str] = None  # "rmsnorm": fused against naive RMSNorm
    compare: Optional[str] = None  # "mlx-lm": mlx-lm's OpenELM on the same weights
    bandwidth_gbs: Optional[float] = None  # peak memory bandwidth (default: known Apple chips)
    seed: int = 0
    command: Optional[str] = None  # recorded in the document only
    # speculative decoding, measured against plain decoding of the same model, interleaved
    draft_model: Optional[str] = None  # a model folder or repo id that drafts for every source
    draft_preset: Optional[str] = None  # a preset with random weights (seeded as the sources: same preset = self)
    draft_bits: Optional[int] = None  # quantize the draft (a 4-bit copy of the source: --draft-preset SAME, 4)
    num_draft_tokens: int = 3
    prompt_lookup: int = 0  # > 0: prompt lookup proposing up to this many tokens instead of a draft model

    def __post_init__(self):
        if bool(self.models) == bool(self.presets):
            raise ConfigError("give either model folders (--model) or presets (--preset), one of the two")
        if self.ablation and self.compare:
            raise ConfigError("--ablation and --compare run separately; pick one")
        proposers = [name for name, on in (("--draft-model", self.draft_model), ("--draft-preset", self.draft_preset),
                                           ("--prompt-lookup", self.prompt_lookup)) if on]
        if len(proposers) > 1:
            raise ConfigError(f"{' and '.join(proposers)} are alternatives; pick one")
        if proposers and (self.ablation or self.compare):
            raise ConfigError(f"{proposers[0]} runs against plain decoding, not with --ablation or --compare")
        if self.draft_bits is not None and not (self.draft_model or self.draft_preset):
            raise ConfigError("--draft-bits needs --draft-model or --draft-preset")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise OptionError(f"--seed must be an integer from 0 to 2**64 - 1, got {self.seed!r}")
        if self.bandwidth_gbs is not None and not 0 < self.bandwidth_gbs < math.inf:
            raise OptionError(f"--bandwidth must be a positive number of GB/s, got {self.bandwidth_gbs}")

    @property
    def speculative(self) -> bool:
        return bool(self.draft_model or self.draft_preset or self.prompt_lookup)

    def to_dict(self) -> dict:
        return {**asdict(self), "sources": self.models or self.presets, "batch_size": 1,
                "sampler": "greedy (EOS ignored)"}


class Progress:
    """Where `run_benchmark` reports as it goes; the default says nothing."""

    def message(self, text: str) -> None:
        """One line: a model being built, a trial's result."""

    def tokens(self, label: str, done: int, total: int) -> None:
        """Tokens generated so far in the running trial."""
