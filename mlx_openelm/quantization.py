"""The one quantization policy: allowed settings, which layers quantize, and config.json's entry.

The converter plans with it, the loader and the bench apply it, and all of them read and
write the config.json `quantization` entry through `Quantization`:

    {"bits": 4, "group_size": 64, "mode": "affine",
     "layers": {"<module path>": {"bits": 8, "group_size": 64} | false}}

Every Linear layer and the token embedding (the modules with a 2-D `weight`) is
quantized at `bits` unless `layers` says otherwise; a layer whose input width is not a
multiple of its group size stays float (`false`). Folders from mlx-lm's converter
(mlx-community/...) put the per-layer entries at the top level instead of under
"layers" and do not record the layers they kept float: there a layer is float when its
`scales` are absent from the weights, as mlx-lm's own loader decides.

This module imports no MLX at import time, so the CLI can list the choices instantly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .errors import ConfigError

# The one place to allow more bit widths or group sizes.
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS = 4  # what `convert -q/--quantize` means without --bits (as mlx-lm's convert)
MODE = "affine"

# The output head: the tied token embedding (OpenELM's default) or an untied lm_head.
HEAD_MODULES = ("transformer.token_embeddings", "lm_head")

RECIPES = {
    # name: (bits of the rest, bits of the head)
    "mixed-4-8": (4, 8),
}

Spec = tuple[int, int]  # (bits, group size)

_ENTRY_KEYS = ("bits", "group_size", "mode", "layers", "recipe")


def _choices(values) -> str:
    return ", ".join(map(str, values))


def check_bits(bits: Any, where: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ConfigError(f"{where}: {bits!r} is not supported; choose one of {_choices(BITS)}")
    return bits


def check_group_size(group_size: Any, where: str) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ConfigError(f"{where}: {group_size!r} is not supported; choose one of {_choices(GROUP_SIZES)}")
    return group_size


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the tensor `name` of the float model is a matrix the policy quantizes
    (Linear layers and the embedding: `<module>.weight` with two dimensions)."""
    return name.endswith(".weight") and len(shape) == 2


@dataclass(frozen=True)
class Quantization:
    """A validated `quantization` entry: default bits/group size plus per-layer exceptions
    (module path -> (bits, group size), or None for a layer kept float)."""

    bits: int
    group_size: int
    layers: Mapping[str, Optional[Spec]] = field(default_factory=dict)
    recipe: Optional[str] = None
    mlx_lm_format: bool = False  # float layers are told by absent scales, not listed

    def spec(self, path: str) -> Optional[Spec]:
        """(bits, group size) of the quantizable module at `path`; None where it stays float."""
        return self.layers.get(path, (self.bits, self.group_size))

    def to_config(self) -> dict:
        """The entry as this project writes it into config.json."""
        layers: dict[str, Any] = {}
        for path, spec in self.layers.items():
            layers[path] = False if spec is None else {"bits": spec[0], "group_size": spec[1]}
        entry: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size, "mode": MODE, "layers": layers}
        if self.recipe:
            entry["recipe"] = self.recipe
        return entry

    @classmethod
    def from_config(cls, entry: Any, source: str = "config.json") -> "Quantization":
        """Read and validate a config.json `quantization` entry (ours or mlx-lm's format).
        Errors are ConfigErrors naming `source` and the key."""
        where = f"{source}: quantization"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be an object, got {type(entry).__name__}")
        for key in ("bits", "group_size"):
            if key not in entry:
                raise ConfigError(f"{where}.{key} is missing")
        bits = check_bits(entry["bits"], f"{where}.bits")
        group_size = check_group_size(entry["group_size"], f"{where}.group_size")
        mode = entry.get("mode", MODE)
        if mode != MODE:
            raise ConfigError(f"{where}.mode: {mode!r} is not supported (only '{MODE}')")
        recipe = entry.get("recipe")
        if recipe is not None and recipe not in RECIPES:
            raise ConfigError(f"{where}.recipe: unknown recipe {recipe!r}; choose one of {_choices(RECIPES)}")
        mlx_lm_format = "layers" not in entry
        if mlx_lm_format:
            # mlx-lm: per-layer entries are the top-level keys holding an object or a boolean
            raw = {k: v for k, v in entry.items() if k not in _ENTRY_KEYS and isinstance(v, (Mapping, bool))}
            prefix = where
        else:
            raw = entry["layers"]
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{where}.layers must be an object (module path -> settings or false), "
                                  f"got {type(raw).__name__}")
            prefix = f"{where}.layers"
        layers = {str(path): _layer_spec(value, bits, group_size, f"{prefix}['{path}']") for path, value in raw.items()}
        return cls(bits, group_size, layers, recipe, mlx_lm_format)


def _layer_spec(value: Any, bits: int, group_size: int, where: str) -> Optional[Spec]:
    if value is False:
        return None
    if value is True:
        return (bits, group_size)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be an object or false, got {value!r}")
    return (check_bits(value.get("bits", bits), f"{where}.bits"),
            check_group_size(value.get("group_size", group_size), f"{where}.group_size"))


def read_quantization(config: Mapping[str, Any], source: str = "config.json") -> Optional[Quantization]:
    """The validated `quantization` entry of a config dict, or None for a float model."""
    if "quantization" not in config:
        return None
    return Quantization.from_config(config["quantization"], source)


def check_options(bits: Optional[int], group_size: int, recipe: Optional[str]) -> Optional[int]:
    """Validate --bits/--group-size/--recipe; returns the default bits (None: no quantization)."""
    check_group_size(group_size, "--group-size")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"--recipe: unknown recipe {recipe!r}; choose one of {_choices(RECIPES)}")
        rest, _head = RECIPES[recipe]
        if bits is not None and bits != rest:
            raise ConfigError(f"--recipe {recipe} quantizes to {rest} bits; it cannot be combined with --bits {bits}")
        return rest
    return None if bits is None else check_bits(bits, "--bits")


@dataclass
class QuantizationPlan:
    """The per-layer decision for one float model: `specs` for the layers quantized,
    `skipped` (module path -> input width) for those kept float, and the config entry."""

    quantization: Quantization
    specs: dict[str, Spec] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def spec(self, module_path: str) -> Optional[Spec]:
        return self.specs.get(module_path)

    def config_entry(self) -> dict:
        return self.quantization.to_config()


def plan_quantization(
    shapes: Mapping[str, tuple[int, ...]], bits: int, group_size: int, recipe: Optional[str] = None
) -> QuantizationPlan:
    """Decide bits per layer for the tensors `shapes` (name -> shape of the float model):
    matrices quantize (the head at the recipe's head bits), norms stay float, and a matrix
    whose input width is not a multiple of the group size stays float."""
    head_bits = RECIPES[recipe][1] if recipe else bits
    specs, skipped, exceptions = {}, {}, {}
    for name, shape in shapes.items():
        if not is_quantizable(name, tuple(shape)):
            continue
        path = name[: -len(".weight")]
        if shape[-1] % group_size:
            skipped[path] = int(shape[-1])
            exceptions[path] = None
            continue
        specs[path] = (head_bits if path in HEAD_MODULES else bits, group_size)
        if specs[path] != (bits, group_size):
            exceptions[path] = specs[path]
    return QuantizationPlan(Quantization(bits, group_size, exceptions, recipe), specs, skipped)


def apply_quantization(model, quantization: Any, source: str = "config.json",
                       weights: Optional[Mapping[str, Any]] = None) -> Quantization:
    """Swap the model's Linear/Embedding layers for quantized ones as `quantization` (a
    `Quantization` or a config entry, validated here) prescribes; returns the Quantization.

    For mlx-lm's format, a layer whose `scales` are absent from `weights` stays float.
    """
    import mlx.nn as nn

    if not isinstance(quantization, Quantization):
        quantization = Quantization.from_config(quantization, source)

    def predicate(path: str, module) -> Any:
        if not hasattr(module, "to_quantized"):
            return False
        spec = quantization.spec(path)
        if spec is None:
            return False
        if quantization.mlx_lm_format and weights is not None and f"{path}.scales" not in weights:
            return False
        return {"bits": spec[0], "group_size": spec[1], "mode": MODE}

    nn.quantize(model, class_predicate=predicate)
    return quantization
