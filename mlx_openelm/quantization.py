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

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .errors import ConfigError
from .folder.names import CONFIG_FILE

# The one place to allow more bit widths or group sizes: every width of MLX's affine mode.
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS = 4  # what `convert -q/--quantize` means without --bits (as mlx-lm's convert)
MODE = "affine"

# How each group's scale and bias are picked (`quantizers.py`):
# "optimal" minimises the reconstruction error weighted by each input column's importance
# (convert/importance.py), "minmax" is mx.quantize (mlx-lm bit for bit). On the trained test
# model optimal wins in KL and perplexity (docs/quantization.md).
# Both write the same format; the runtime never needs to know which was used.
METHODS = ("minmax", "optimal")
DEFAULT_METHOD = "optimal"

# The output head: the tied token embedding (OpenELM's default) or an untied lm_head.
HEAD_MODULES = ("transformer.token_embeddings", "lm_head")

# Mixed recipes "mixed-LOW-HIGH": LOW bits for most layers, HIGH bits for the sensitive ones:
# the output head, every layer's qkv_proj and the whole last decoder layer. Measured on the
# trained test model (SmolLM2-135M as OpenELM, 4 bits, group 64, one part quantized at a time,
# KL against float; docs/quantization.md, "Mixed recipes"): the head gives 36-40% of the whole model's KL,
# qkv_proj the most of any kind per weight, the last layer the most of any layer (the first
# layers, which random weights had singled out, are not special there).
RECIPES = {f"mixed-{low}-{high}": (low, high) for low in BITS for high in BITS if low < high}
SENSITIVE_KINDS = ("attn.qkv_proj",)

Spec = tuple[int, int]  # (bits, group size)

_ENTRY_KEYS = ("bits", "group_size", "mode", "layers", "recipe", "method", "calibration")


def _choices(values) -> str:
    return ", ".join(map(str, values))


def check_bits(bits: Any, where: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ConfigError(f"{where}: {bits!r} is not supported; choose one of {_choices(BITS)}")
    return bits


def _recipe_choices() -> str:
    return f"mixed-LOW-HIGH with LOW < HIGH from {_choices(BITS)} (e.g. mixed-3-6, mixed-4-8)"


def check_method(method: Any, where: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"{where}: {method!r} is not a quantization method; choose one of {_choices(METHODS)}")
    return method


def is_sensitive(path: str, num_layers: int) -> bool:
    """Whether a mixed recipe gives the module at `path` its high bits: the output head, every
    layer's qkv_proj, and every module of the last decoder layer."""
    if path in HEAD_MODULES:
        return True
    prefix = "transformer.layers."
    if not path.startswith(prefix):
        return False
    index, module = path[len(prefix):].split(".", 1)
    return module in SENSITIVE_KINDS or int(index) == num_layers - 1


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
    method: Optional[str] = None  # how scales and biases were chosen (informative only)
    # {"text": file name, "tokens": n} when activation-aware calibration folded scales (informative only)
    calibration: Optional[Mapping[str, Any]] = None

    def spec(self, path: str) -> Optional[Spec]:
        """(bits, group size) of the quantizable module at `path`; None where it stays float."""
        return self.layers.get(path, (self.bits, self.group_size))

    def to_config(self) -> dict:
        """The entry as this project writes it into config.json (per-layer exceptions both under
        "layers" and at the top level, so mlx-lm loads mixed-bit folders too)."""
        layers: dict[str, Any] = {}
        for path, spec in self.layers.items():
            layers[path] = False if spec is None else {"bits": spec[0], "group_size": spec[1]}
        entry: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size, "mode": MODE, "layers": layers}
        if self.recipe:
            entry["recipe"] = self.recipe
        if self.method:
            entry["method"] = self.method
        if self.calibration:
            entry["calibration"] = dict(self.calibration)
        entry.update(layers)  # mlx-lm reads per-layer settings from the top level; "layers" wins for us
        return entry

    @classmethod
    def from_config(cls, entry: Any, source: str = CONFIG_FILE) -> "Quantization":
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
            raise ConfigError(f"{where}.recipe: unknown recipe {recipe!r}; choose {_recipe_choices()}")
        method = entry.get("method")
        if method is not None and not isinstance(method, str):
            raise ConfigError(f"{where}.method must be a string, got {method!r}")
        calibration = entry.get("calibration")
        if calibration is not None and not isinstance(calibration, Mapping):
            raise ConfigError(f"{where}.calibration must be an object, got {calibration!r}")
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
        return cls(bits, group_size, layers, recipe, mlx_lm_format, method, calibration)


def _layer_spec(value: Any, bits: int, group_size: int, where: str) -> Optional[Spec]:
    if value is False:
        return None
    if value is True:
        return (bits, group_size)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be an object or false, got {value!r}")
    return (check_bits(value.get("bits", bits), f"{where}.bits"),
            check_group_size(value.get("group_size", group_size), f"{where}.group_size"))


def read_quantization(config: Mapping[str, Any], source: str = CONFIG_FILE) -> Optional[Quantization]:
    """The validated `quantization` entry of a config dict, or None for a float model."""
    if "quantization" not in config:
        return None
    return Quantization.from_config(config["quantization"], source)


def check_options(bits: Optional[int], group_size: int, recipe: Optional[str],
                  method: str = DEFAULT_METHOD) -> Optional[int]:
    """Validate the `bits`, `group_size`, `recipe` and `method` a conversion is asked for (errors name
    them as these parameters); returns the default bits (None: no quantization)."""
    check_group_size(group_size, "group_size")
    check_method(method, "method")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"recipe: unknown recipe {recipe!r}; choose {_recipe_choices()}")
        rest, _head = RECIPES[recipe]
        if bits is not None and bits != rest:
            raise ConfigError(f"recipe: {recipe} quantizes to {rest} bits; it cannot be combined with `bits={bits}`")
        return rest
    return None if bits is None else check_bits(bits, "bits")


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
    shapes: Mapping[str, tuple[int, ...]], bits: int, group_size: int, recipe: Optional[str] = None,
    method: Optional[str] = None,
) -> QuantizationPlan:
    """Decide bits per layer for the tensors `shapes` (name -> shape of the float model):
    matrices quantize (the sensitive ones at the recipe's high bits), norms stay float, and
    a matrix whose input width is not a multiple of the group size stays float. `method`
    is recorded in the entry (None: the entry says nothing about it)."""
    high_bits = RECIPES[recipe][1] if recipe else bits
    layer_ids = [int(m.group(1)) for m in map(re.compile(r"transformer\.layers\.(\d+)\.").match, shapes) if m]
    num_layers = max(layer_ids) + 1 if layer_ids else 0
    specs, skipped, exceptions = {}, {}, {}
    for name, shape in shapes.items():
        if not is_quantizable(name, tuple(shape)):
            continue
        path = name[: -len(".weight")]
        if shape[-1] % group_size:
            skipped[path] = int(shape[-1])
            exceptions[path] = None
            continue
        specs[path] = (high_bits if is_sensitive(path, num_layers) else bits, group_size)
        if specs[path] != (bits, group_size):
            exceptions[path] = specs[path]
    return QuantizationPlan(Quantization(bits, group_size, exceptions, recipe, method=method), specs, skipped)


def apply_quantization(model, quantization: Any, source: str = CONFIG_FILE,
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
        width = module.weight.shape[-1]
        if width % spec[1]:  # MLX would fail deep inside mx.quantize
            raise ConfigError(f"{source}: quantization gives '{path}' group size {spec[1]}, which does not divide "
                              f"its input width {width}")
        return {"bits": spec[0], "group_size": spec[1], "mode": MODE}

    nn.quantize(model, class_predicate=predicate)
    return quantization
