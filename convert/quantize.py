"""Which layers get quantized, at how many bits: the `quantization` entry of config.json.

The entry is the one `mlx_openelm.loading.apply_quantization` reads back:

    {"bits": 4, "group_size": 64, "mode": "affine",
     "layers": {"<module path>": {"bits": 8, "group_size": 64} | false}}

Every Linear layer and the token embedding is quantized at `bits` unless `layers`
says otherwise. A layer whose input width (a weight's last dimension) is not a
multiple of `group_size` cannot be quantized group-wise: it is kept in the float
dtype, marked `false`, and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from mlx_openelm.errors import ConfigError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MODE = "affine"

# The output head: the tied token embedding (OpenELM's default) or an untied lm_head.
HEAD_MODULES = ("transformer.token_embeddings", "lm_head")

RECIPES = {
    # name: (bits of the rest, bits of the head)
    "mixed-4-8": (4, 8),
}


@dataclass
class QuantizationPlan:
    bits: int
    group_size: int
    recipe: Optional[str] = None
    specs: dict[str, tuple[int, int]] = field(default_factory=dict)  # module path -> (bits, group)
    skipped: dict[str, int] = field(default_factory=dict)  # module path -> input width

    def config_entry(self) -> dict:
        """The config.json `quantization` entry: defaults plus the layers that differ."""
        layers: dict = {}
        for path, (bits, group) in self.specs.items():
            if (bits, group) != (self.bits, self.group_size):
                layers[path] = {"bits": bits, "group_size": group}
        for path in self.skipped:
            layers[path] = False
        entry = {"bits": self.bits, "group_size": self.group_size, "mode": MODE, "layers": layers}
        if self.recipe:
            entry["recipe"] = self.recipe
        return entry

    def spec(self, module_path: str) -> Optional[tuple[int, int]]:
        return self.specs.get(module_path)


def check_options(bits: Optional[int], group_size: int, recipe: Optional[str]) -> Optional[int]:
    """Validate --bits/--group-size/--recipe; returns the default bits (None: no quantization)."""
    if group_size not in GROUP_SIZES:
        choices = ", ".join(map(str, GROUP_SIZES))
        raise ConfigError(f"--group-size: {group_size} is not supported; choose one of {choices}")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"--recipe: unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        rest, _head = RECIPES[recipe]
        if bits is not None and bits != rest:
            raise ConfigError(f"--recipe {recipe} quantizes to {rest} bits; it cannot be combined with --bits {bits}")
        return rest
    if bits is not None and bits not in BITS:
        raise ConfigError(f"--bits: {bits} is not supported; choose one of {', '.join(map(str, BITS))}")
    return bits


def plan_quantization(
    shapes: Mapping[str, tuple[int, ...]], bits: int, group_size: int, recipe: Optional[str] = None
) -> QuantizationPlan:
    """Decide bits per layer for the tensors `shapes` (name -> shape of the float model).

    Matrices (`<module>.weight` with two dimensions: Linear layers and the embedding)
    are quantized; norms (one dimension) stay in float.
    """
    plan = QuantizationPlan(bits=bits, group_size=group_size, recipe=recipe)
    head_bits = RECIPES[recipe][1] if recipe else bits
    for name, shape in shapes.items():
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        path = name[: -len(".weight")]
        if shape[-1] % group_size:
            plan.skipped[path] = int(shape[-1])
            continue
        plan.specs[path] = (head_bits if path in HEAD_MODULES else bits, group_size)
    return plan
