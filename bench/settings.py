"""What `mlx-openelm bench` measures (`BenchSettings`) and how it reports progress
(`Progress`). No MLX here, so the command's --help stays instant."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from mlx_openelm.errors import ConfigError


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

    def __post_init__(self):
        if bool(self.models) == bool(self.presets):
            raise ConfigError("give either model folders (--model) or presets (--preset), one of the two")
        if self.ablation and self.compare:
            raise ConfigError("--ablation and --compare run separately; pick one")

    def to_dict(self) -> dict:
        return {**asdict(self), "sources": self.models or self.presets, "batch_size": 1,
                "sampler": "greedy (EOS ignored)"}


class Progress:
    """Where `run_benchmark` reports as it goes; the default says nothing."""

    def message(self, text: str) -> None:
        """One line: a model being built, a trial's result."""

    def tokens(self, label: str, done: int, total: int) -> None:
        """Tokens generated so far in the running trial."""
