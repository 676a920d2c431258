"""What an adapter is: `AdapterConfig`, its one validator, and `adapter_config.json` (mlx-lm's format).

    {"fine_tune_type": "lora" | "dora" | "full",
     "num_layers": N,                      # the LAST N decoder layers are adapted (-1: all)
     "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0,
                         "keys": ["attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2"]}}

mlx-lm writes its other training settings (model, data, iters, ...) at the top level too;
they do not change what the adapter is and are not read. Inside `lora_parameters` every
key is read, and one mlx-lm does not know (such as `alpha`) is refused, not ignored.
No MLX import here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from mlx_openelm.errors import ConfigError
from mlx_openelm.folder.names import ADAPTER_CONFIG_FILE, ADAPTERS_FILE

FINE_TUNE_TYPES = ("lora", "dora", "full")
# short name (the CLI's --keys) -> module path inside a decoder layer (mlx-lm's `keys`)
PROJECTIONS = {"qkv_proj": "attn.qkv_proj", "out_proj": "attn.out_proj", "proj_1": "ffn.proj_1",
               "proj_2": "ffn.proj_2"}
DEFAULT_RANK = 8
DEFAULT_SCALE = 20.0  # mlx-lm's default
MAX_RANK = 4096

# how each setting is named in adapter_config.json
FILE_KEYS = {"fine_tune_type": "fine_tune_type", "num_layers": "num_layers", "rank": "lora_parameters.rank",
             "scale": "lora_parameters.scale", "dropout": "lora_parameters.dropout",
             "keys": "lora_parameters.keys"}
LORA_PARAMETER_KEYS = ("rank", "scale", "dropout", "keys")


@dataclass(frozen=True)
class AdapterConfig:
    """A validated adapter: the type, how many of the last decoder layers, LoRA's settings,
    and the projections (module paths inside a layer) it wraps."""

    fine_tune_type: str
    num_layers: int
    rank: int = DEFAULT_RANK
    scale: float = DEFAULT_SCALE
    dropout: float = 0.0
    keys: tuple[str, ...] = tuple(PROJECTIONS.values())

    def layer_indices(self, model_layers: int) -> range:
        return range(model_layers - self.num_layers, model_layers)

    def to_dict(self) -> dict:
        """The adapter_config.json entries (mlx-lm's names)."""
        return {"fine_tune_type": self.fine_tune_type, "num_layers": self.num_layers,
                "lora_parameters": {"rank": self.rank, "scale": self.scale, "dropout": self.dropout,
                                    "keys": list(self.keys)}}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_adapter_config(
    fine_tune_type: Any, num_layers: Any, model_layers: int, rank: Any = DEFAULT_RANK, scale: Any = DEFAULT_SCALE,
    dropout: Any = 0.0, keys: Any = None, name: Callable[[str], str] = str,
) -> AdapterConfig:
    """The one validator of adapter settings (from options or a file; `name(setting)` says how the
    error names a setting). `num_layers` None or -1 means all `model_layers`; `keys` None means all
    four projections, and short names (`qkv_proj`) stand for their paths (`attn.qkv_proj`)."""
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ConfigError(f"{name('fine_tune_type')}: {fine_tune_type!r} is not one of {', '.join(FINE_TUNE_TYPES)}")
    if num_layers is None or num_layers == -1:
        num_layers = model_layers
    if not _is_int(num_layers) or not 1 <= num_layers <= model_layers:
        raise ConfigError(f"{name('num_layers')}: {num_layers!r} does not fit the model, which has {model_layers} "
                          "decoder layers (use 1 to that, or -1 for all)")
    if not _is_int(rank) or not 1 <= rank <= MAX_RANK:
        raise ConfigError(f"{name('rank')}: {rank!r} is not an integer from 1 to {MAX_RANK}")
    if not _is_number(scale) or scale <= 0:
        raise ConfigError(f"{name('scale')}: {scale!r} is not a positive finite number")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ConfigError(f"{name('dropout')}: {dropout!r} is not a probability in [0, 1)")
    return AdapterConfig(fine_tune_type, num_layers, rank, float(scale), float(dropout),
                         _check_keys(keys, name("keys")))


def _check_keys(keys: Any, where: str) -> tuple[str, ...]:
    if keys is None:
        return tuple(PROJECTIONS.values())
    if isinstance(keys, str) or not isinstance(keys, Sequence) or not keys:
        raise ConfigError(f"{where}: expected a non-empty list of projections, got {keys!r}")
    paths = []
    for key in keys:
        path = PROJECTIONS.get(key, key)
        if path not in PROJECTIONS.values():
            raise ConfigError(f"{where}: {key!r} is not a projection of an OpenELM layer; choose from "
                              f"{', '.join(PROJECTIONS)} (or their paths {', '.join(PROJECTIONS.values())})")
        if path not in paths:
            paths.append(path)
    return tuple(paths)


def read_adapter_config(folder: Path, model_layers: int) -> AdapterConfig:
    """`folder/adapter_config.json` read and checked against a model of `model_layers` layers;
    any problem is one ConfigError naming the file and the key."""
    path = Path(folder) / ADAPTER_CONFIG_FILE
    if not Path(folder).is_dir():
        raise ConfigError(f"{folder}: adapter folder not found (expected {ADAPTER_CONFIG_FILE} and {ADAPTERS_FILE})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (an adapter folder holds {ADAPTER_CONFIG_FILE} and {ADAPTERS_FILE})") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return config_from_dict(raw, model_layers, str(path))


def config_from_dict(raw: Mapping[str, Any], model_layers: int, source: str) -> AdapterConfig:
    """An adapter_config.json object (mlx-lm's or ours) validated; errors name `source`."""
    fine_tune_type = raw.get("fine_tune_type", "lora")  # mlx-lm's default for files without it
    if "num_layers" not in raw:
        raise ConfigError(f"{source}: num_layers is missing")
    params = raw.get("lora_parameters", {} if fine_tune_type == "full" else None)
    if not isinstance(params, Mapping):
        raise ConfigError(f"{source}: lora_parameters must be an object with rank and scale, got {params!r}")
    unknown = sorted(set(params) - set(LORA_PARAMETER_KEYS))
    if unknown:
        hint = " (mlx-lm's format has scale, not alpha: scale = alpha / rank)" if "alpha" in unknown else ""
        raise ConfigError(f"{source}: lora_parameters.{unknown[0]} is not a LoRA setting; the settings are "
                          f"{', '.join(LORA_PARAMETER_KEYS)}{hint}")
    if fine_tune_type != "full":
        for key in ("rank", "scale"):
            if key not in params:
                raise ConfigError(f"{source}: lora_parameters.{key} is missing")
    return check_adapter_config(
        fine_tune_type, raw["num_layers"], model_layers, params.get("rank", DEFAULT_RANK),
        params.get("scale", DEFAULT_SCALE), params.get("dropout", 0.0), params.get("keys"),
        name=lambda key: f"{source}: {FILE_KEYS[key]}",
    )


def scale_from_alpha(alpha: Optional[float], scale: Optional[float], rank: int) -> float:
    """`alpha` (the Hugging Face PEFT convention, scale = alpha / rank) or `scale` (mlx-lm's), not both."""
    if alpha is not None and scale is not None:
        raise ConfigError("`alpha` and `scale` both set the LoRA scale (scale = alpha / rank); pass one")
    if alpha is not None:
        return alpha / rank
    return DEFAULT_SCALE if scale is None else scale
