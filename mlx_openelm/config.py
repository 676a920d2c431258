"""OpenELM architecture: `ModelArgs` read from a Hugging Face `config.json`.

This module does not import MLX, so the CLI can read and validate configs
(and list presets) instantly.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import ConfigError, OpenELMWarning

RMS_NORM_EPS = 1e-6  # fixed in Apple's code; no config key

# Keys Apple's config.json carries that do not change the computation.
_INERT_KEYS = {
    "architectures",
    "auto_map",
    "initializer_range",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "_name_or_path",
    "quantization",  # read by the loader, not by the architecture
    "quantization_config",  # mlx-lm writes a copy of "quantization" under this name
}


def make_divisible(value: float, divisor: int, min_value: Optional[int] = None) -> int:
    """Round `value` to the nearest multiple of `divisor` (OpenELM/MobileNet rule).

    If rounding lands more than 10% below `value`, bump it by one `divisor`.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


def _linspace(start: float, stop: float, num: int, decimals: int) -> list[float]:
    """numpy.linspace rounded to `decimals` places, as Apple's config code does."""
    if num == 1:
        return [round(float(start), decimals)]
    return [round(start + (stop - start) * i / (num - 1), decimals) for i in range(num)]


@dataclass(frozen=True)
class ModelArgs:
    """The OpenELM architecture, with per-layer (layer-wise scaled) widths."""

    model_dim: int
    head_dim: int
    num_transformer_layers: int
    vocab_size: int
    num_query_heads: tuple[int, ...]
    num_kv_heads: tuple[int, ...]
    ffn_multipliers: tuple[float, ...]
    ffn_dim_divisor: int = 256
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rope_freq_constant: float = 10000.0
    rope_max_length: int = 4096
    max_context_length: int = 2048
    num_gqa_groups: int = 4
    qkv_multipliers: tuple[float, ...] = (0.5, 1.0)
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "openelm"
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived per-layer sizes -------------------------------------------------
    @property
    def ffn_dims(self) -> tuple[int, ...]:
        return tuple(make_divisible(m * self.model_dim, self.ffn_dim_divisor) for m in self.ffn_multipliers)

    @property
    def qkv_out_dims(self) -> tuple[int, ...]:
        return tuple((q + 2 * kv) * self.head_dim for q, kv in zip(self.num_query_heads, self.num_kv_heads))

    def num_parameters(self) -> int:
        """Parameter count (tied embedding counted once)."""
        d, hd = self.model_dim, self.head_dim
        total = self.vocab_size * d + d  # embeddings + final norm
        if not self.share_input_output_layers:
            total += self.vocab_size * d
        for q, kv, f in zip(self.num_query_heads, self.num_kv_heads, self.ffn_dims):
            total += d * (q + 2 * kv) * hd + q * hd * d + 2 * d
            if self.normalize_qk_projections:
                total += 2 * hd
            total += d * f * (2 if self.ffn_with_glu else 1) + f * d
        return total

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "config.json") -> "ModelArgs":
        """Build and validate from a config.json dict. Errors name `source` and the key."""

        def fail(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        if not isinstance(config, Mapping):
            raise fail("expected a JSON object")
        model_type = config.get("model_type")
        if model_type != "openelm":
            raise fail(f"'model_type' is {model_type!r}, expected 'openelm' (is this an OpenELM checkpoint?)")

        def get(key: str, kind: type, default: Any = dataclasses.MISSING) -> Any:
            if key not in config or config[key] is None:
                if default is dataclasses.MISSING:
                    raise fail(f"missing required key '{key}'")
                return default
            value = config[key]
            if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if kind is int and isinstance(value, float) and value.is_integer():
                return int(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise fail(f"'{key}' must be {kind.__name__}, got {value!r}")
            return value

        num_layers = get("num_transformer_layers", int)
        model_dim = get("model_dim", int)
        head_dim = get("head_dim", int)
        num_gqa_groups = get("num_gqa_groups", int, 4)
        ffn_dim_divisor = get("ffn_dim_divisor", int, 256)
        for key, value in [
            ("num_transformer_layers", num_layers),
            ("model_dim", model_dim),
            ("head_dim", head_dim),
            ("num_gqa_groups", num_gqa_groups),
            ("ffn_dim_divisor", ffn_dim_divisor),
        ]:
            if value <= 0:
                raise fail(f"'{key}' must be positive, got {value}")

        qkv_multipliers = _number_list(config.get("qkv_multipliers", [0.5, 1.0]), "qkv_multipliers", fail)
        if "num_query_heads" in config:
            num_query_heads = _int_list(config["num_query_heads"], "num_query_heads", fail)
        else:
            # CoreNet form: attention width scaled linearly (multipliers rounded to 2 places).
            if len(qkv_multipliers) != 2:
                raise fail("'num_query_heads' is missing and 'qkv_multipliers' is not a [min, max] pair")
            widths = [
                make_divisible(model_dim * m, head_dim * num_gqa_groups)
                for m in _linspace(qkv_multipliers[0], qkv_multipliers[1], num_layers, decimals=2)
            ]
            num_query_heads = [w // head_dim for w in widths]
        if "num_kv_heads" in config:
            num_kv_heads = _int_list(config["num_kv_heads"], "num_kv_heads", fail)
        else:
            num_kv_heads = [q // num_gqa_groups for q in num_query_heads]

        if "ffn_multipliers" not in config:
            raise fail("missing required key 'ffn_multipliers'")
        ffn_multipliers = _number_list(config["ffn_multipliers"], "ffn_multipliers", fail)
        if len(ffn_multipliers) == 2 and num_layers != 2:
            ffn_multipliers = _linspace(ffn_multipliers[0], ffn_multipliers[1], num_layers, decimals=2)
        elif len(ffn_multipliers) == 1 and num_layers != 1:
            ffn_multipliers = ffn_multipliers * num_layers

        for key, values in [
            ("num_query_heads", num_query_heads),
            ("num_kv_heads", num_kv_heads),
            ("ffn_multipliers", ffn_multipliers),
        ]:
            if len(values) != num_layers:
                raise fail(f"'{key}' has {len(values)} entries but 'num_transformer_layers' is {num_layers}")
        for i, (q, kv) in enumerate(zip(num_query_heads, num_kv_heads)):
            if q <= 0 or kv <= 0:
                raise fail(f"layer {i}: 'num_query_heads' and 'num_kv_heads' must be positive, got {q} and {kv}")
            if q % kv:
                raise fail(f"layer {i}: 'num_query_heads' ({q}) is not divisible by 'num_kv_heads' ({kv})")
        for i, m in enumerate(ffn_multipliers):
            if m <= 0:
                raise fail(f"layer {i}: 'ffn_multipliers' entry must be positive, got {m}")

        activation = config.get("activation_fn_name", "swish")
        if activation not in ("swish", "silu"):
            raise fail(f"'activation_fn_name' is {activation!r}; only 'swish' (SiLU) is supported")
        norm_name = config.get("normalization_layer_name", "rms_norm")
        if norm_name != "rms_norm":
            raise fail(f"'normalization_layer_name' is {norm_name!r}; only 'rms_norm' is supported")

        vocab_size = get("vocab_size", int)
        if vocab_size <= 0:
            raise fail(f"'vocab_size' must be positive, got {vocab_size}")
        max_context_length = get("max_context_length", int, 2048)
        if max_context_length <= 0:
            raise fail(f"'max_context_length' must be positive, got {max_context_length}")

        known = {f.name for f in dataclasses.fields(cls)} | _INERT_KEYS | {
            "activation_fn_name",
            "normalization_layer_name",
        }
        unknown = sorted(k for k in config if k not in known)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown config keys {unknown}", OpenELMWarning, stacklevel=2)

        return cls(
            model_dim=model_dim,
            head_dim=head_dim,
            num_transformer_layers=num_layers,
            vocab_size=vocab_size,
            num_query_heads=tuple(num_query_heads),
            num_kv_heads=tuple(num_kv_heads),
            ffn_multipliers=tuple(float(m) for m in ffn_multipliers),
            ffn_dim_divisor=ffn_dim_divisor,
            ffn_with_glu=get("ffn_with_glu", bool, True),
            normalize_qk_projections=get("normalize_qk_projections", bool, True),
            share_input_output_layers=get("share_input_output_layers", bool, True),
            rope_freq_constant=get("rope_freq_constant", float, 10000.0),
            rope_max_length=get("rope_max_length", int, 4096),
            max_context_length=max_context_length,
            num_gqa_groups=num_gqa_groups,
            qkv_multipliers=tuple(qkv_multipliers),
            bos_token_id=get("bos_token_id", int, 1),
            eos_token_id=get("eos_token_id", int, 2),
            extra={k: config[k] for k in config if k in _INERT_KEYS},
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(read_config(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The config.json form (Apple's keys), suitable for writing next to weights."""
        out: dict[str, Any] = {
            "model_type": "openelm",
            "model_dim": self.model_dim,
            "head_dim": self.head_dim,
            "num_transformer_layers": self.num_transformer_layers,
            "vocab_size": self.vocab_size,
            "num_query_heads": list(self.num_query_heads),
            "num_kv_heads": list(self.num_kv_heads),
            "ffn_multipliers": list(self.ffn_multipliers),
            "ffn_dim_divisor": self.ffn_dim_divisor,
            "ffn_with_glu": self.ffn_with_glu,
            "normalize_qk_projections": self.normalize_qk_projections,
            "share_input_output_layers": self.share_input_output_layers,
            "rope_freq_constant": self.rope_freq_constant,
            "rope_max_length": self.rope_max_length,
            "max_context_length": self.max_context_length,
            "num_gqa_groups": self.num_gqa_groups,
            "qkv_multipliers": list(self.qkv_multipliers),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "activation_fn_name": "swish",
            "normalization_layer_name": "rms_norm",
        }
        return out

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


def _number_list(value: Any, key: str, fail) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise fail(f"'{key}' must be a list of numbers, got {value!r}")
    return [float(v) for v in value]


def _int_list(value: Any, key: str, fail) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise fail(f"'{key}' must be a list of integers, got {value!r}")
    return list(value)


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a JSON config file with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None


# ---- published architectures ------------------------------------------------------

def _preset_table() -> dict[str, Any]:
    text = resources.files("mlx_openelm").joinpath("presets.json").read_text()
    return json.loads(text)["presets"]


PRESET_NAMES: tuple[str, ...] = ("270M", "450M", "1_1B", "3B")
_PRESET_ALIASES = {"1.1B": "1_1B", "1B": "1_1B", "OpenELM-1.1B": "1_1B"}


def preset_config(name: str) -> dict[str, Any]:
    """The config.json dict of a published OpenELM size ('270M', '450M', '1_1B', '3B')."""
    table = _preset_table()
    key = _PRESET_ALIASES.get(name, name).removeprefix("OpenELM-")
    if key not in table:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(table)}")
    return dict(table[key]["config"])


def preset_args(name: str, vocab_size: Optional[int] = None) -> ModelArgs:
    config = preset_config(name)
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    return ModelArgs.from_dict(config, source=f"preset {name}")


def preset_parameters(name: str) -> int:
    preset_config(name)  # validates the name
    return int(_preset_table()[_PRESET_ALIASES.get(name, name).removeprefix("OpenELM-")]["parameters"])
