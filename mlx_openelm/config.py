"""OpenELM architecture: `ModelArgs` read from a Hugging Face `config.json`.

This module does not import MLX, so the CLI can read and validate configs
(and list presets) instantly.
"""

from __future__ import annotations

import json
import math
import reprlib
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import ConfigError, OpenELMWarning
from .folder.names import CONFIG_FILE

RMS_NORM_EPS = 1e-6  # fixed in Apple's code; the optional `rms_norm_eps` key overrides it

# OpenELM uses Llama-2's 32000-piece tokenizer; CoreNet checkpoints pad the embedding to 32128 rows
# that no token id reaches. A model of either size works with that one tokenizer.
TOKENIZER_VOCAB_SIZE = 32000
CORENET_VOCAB_SIZE = 32128
PADDED_VOCAB = {TOKENIZER_VOCAB_SIZE: CORENET_VOCAB_SIZE}  # tokenizer pieces -> padded vocabulary


def same_vocabulary(a: int, b: int) -> bool:
    """Whether vocabularies of `a` and `b` ids serve one tokenizer (equal, or one the padded other)."""
    small, large = min(a, b), max(a, b)
    return small == large or PADDED_VOCAB.get(small) == large

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

# Keys that name a fixed part of the architecture: the values this project implements.
_FIXED_KEYS = {
    "activation_fn_name": ("swish", "silu"),
    "normalization_layer_name": ("rms_norm",),
}


_REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """How one config.json key is read: its type, default and allowed range."""

    kind: type  # int, float or bool; for a list key, the type of its entries
    default: Any = _REQUIRED  # None: derived from other keys when absent
    low: float = 1  # smallest allowed value (of each entry of a list key)
    high: float = math.inf  # largest allowed value
    low_open: bool = False  # `low` itself is not allowed
    is_list: bool = False


# Every key the architecture reads, with its bounds. The upper bounds sit far above the
# largest published OpenELM (3B: 36 layers, model_dim 3072, head_dim 128, 24 query heads,
# FFN width 12288, vocab 32128 in CoreNet checkpoints, context 2048): they exist so a typo or
# a hostile file fails here, naming the key, instead of hanging while the model is built
# (100000 layers) or overflowing inside MLX (a vocab_size of 10**12).
KEYS: dict[str, Key] = {
    "num_transformer_layers": Key(int, high=1024),
    "model_dim": Key(int, high=65536),
    "head_dim": Key(int, high=4096),
    "vocab_size": Key(int, high=2**21),
    "num_query_heads": Key(int, None, high=1024, is_list=True),
    "num_kv_heads": Key(int, None, high=1024, is_list=True),
    "ffn_multipliers": Key(float, low=0, high=64, low_open=True, is_list=True),
    "qkv_multipliers": Key(float, (0.5, 1.0), low=0, high=64, low_open=True, is_list=True),
    "num_gqa_groups": Key(int, 4, high=1024),
    "ffn_dim_divisor": Key(int, 256, high=65536),
    "ffn_with_glu": Key(bool, True),
    "normalize_qk_projections": Key(bool, True),
    "share_input_output_layers": Key(bool, True),
    "rope_freq_constant": Key(float, 10000.0, low=0, high=1e12, low_open=True),
    "rms_norm_eps": Key(float, RMS_NORM_EPS, low=0, high=1.0, low_open=True),
    "rope_max_length": Key(int, 4096, high=2**24),
    "max_context_length": Key(int, 2048, high=2**24),
    "bos_token_id": Key(int, 1, low=0, high=2**21 - 1),  # and below vocab_size
    "eos_token_id": Key(int, 2, low=0, high=2**21 - 1),
}
# The widest projection any layer may have (q/k/v rows, attention output, FFN), derived from
# the keys above; 3B's widest is its 12288-wide FFN.
MAX_LAYER_WIDTH = 2**18


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
    rms_norm_eps: float = RMS_NORM_EPS
    rope_max_length: int = 4096
    max_context_length: int = 2048
    num_gqa_groups: int = 4
    qkv_multipliers: tuple[float, ...] = (0.5, 1.0)
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "openelm"

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
    def from_dict(cls, config: Mapping[str, Any], source: str = CONFIG_FILE) -> "ModelArgs":
        """Build and validate from a config.json dict. Errors name `source` and the key.

        Three steps: read each key with its type and bounds (`KEYS`), derive the per-layer
        lists a CoreNet-style config leaves out, then check the layers against each other.
        Unknown keys are ignored with an `OpenELMWarning`.
        """

        def fail(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        if not isinstance(config, Mapping):
            raise fail("expected a JSON object")
        model_type = config.get("model_type")
        if model_type != "openelm":
            raise fail(
                f"'model_type' is {reprlib.repr(model_type)}, expected 'openelm' (is this an OpenELM checkpoint?)"
            )
        for key, allowed in _FIXED_KEYS.items():
            value = config.get(key, allowed[0])
            if value not in allowed:
                raise fail(f"'{key}' is {reprlib.repr(value)}; only {allowed[0]!r} is supported")
        known = KEYS.keys() | _FIXED_KEYS.keys() | _INERT_KEYS | {"model_type"}
        unknown = sorted(k for k in config if k not in known)
        if unknown:
            message = f"{source}: ignoring unknown config keys {reprlib.repr(unknown)}"
            warnings.warn(message, OpenELMWarning, stacklevel=2)

        values = {key: _read_key(config, key, spec, fail) for key, spec in KEYS.items()}
        values.update(_per_layer_widths(values, fail))
        args = cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in values.items()})
        _check_layers(args, fail)
        return args

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
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
            "rms_norm_eps": self.rms_norm_eps,
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


def _read_key(config: Mapping[str, Any], key: str, spec: Key, fail) -> Any:
    """The typed, bounds-checked value of `key` (a list for list keys), or its default."""
    if config.get(key) is None:
        if spec.default is _REQUIRED:
            raise fail(f"missing required key '{key}'")
        return list(spec.default) if isinstance(spec.default, tuple) else spec.default
    value = config[key]
    if not spec.is_list:
        typed = _typed(value, spec.kind)
        if typed is None:
            raise fail(f"'{key}' must be {spec.kind.__name__}, got {reprlib.repr(value)}")
        return _checked(typed, spec, f"'{key}'", fail)
    if spec.kind is float and _typed(value, float) is not None:
        value = [value]  # a single multiplier stands for every layer
    entries = [_typed(v, spec.kind) for v in value] if isinstance(value, (list, tuple)) else []
    if not entries or None in entries:
        what = "numbers" if spec.kind is float else "integers"
        raise fail(f"'{key}' must be a list of {what}, got {reprlib.repr(value)}")
    return [_checked(v, spec, f"'{key}'[{i}]" if len(entries) > 1 else f"'{key}'", fail)
            for i, v in enumerate(entries)]


def _typed(value: Any, kind: type) -> Any:
    """`value` as `kind`, or None when it is not one (bools are not numbers; integral floats are ints)."""
    if isinstance(value, bool) or kind is bool:
        return value if isinstance(value, bool) and kind is bool else None
    if kind is float and isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer literal beyond the float range
            return math.inf if value > 0 else -math.inf
    if kind is int and isinstance(value, float):
        return int(value) if value.is_integer() else None
    return value if isinstance(value, kind) else None


def _checked(value: Any, spec: Key, name: str, fail) -> Any:
    """`value` itself, after checking it is finite and inside `spec`'s bounds."""
    if spec.kind is bool:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(f"{name} must be a finite number, got {value}")
    if value < spec.low or (spec.low_open and value == spec.low):
        positive = spec.low == 0 if spec.low_open else (spec.low == 1 and spec.kind is int)
        bound = "positive" if positive else f"{'>' if spec.low_open else '>='} {int(spec.low)}"
        raise fail(f"{name} must be {bound}, got {reprlib.repr(value)}")
    if value > spec.high:
        raise fail(f"{name} is {reprlib.repr(value)}, over the limit of {int(spec.high)} (see mlx_openelm.config.KEYS)")
    return value


def _per_layer_widths(values: dict[str, Any], fail) -> dict[str, list]:
    """Per-layer head counts and FFN multipliers, expanded from CoreNet's [min, max] form where given so."""
    num_layers, model_dim, head_dim = values["num_transformer_layers"], values["model_dim"], values["head_dim"]
    groups = values["num_gqa_groups"]
    query_heads = values["num_query_heads"]
    if query_heads is None:
        # Attention width scaled linearly over the layers (multipliers rounded to 2 places).
        multipliers = values["qkv_multipliers"]
        if len(multipliers) != 2:
            raise fail("'num_query_heads' is missing and 'qkv_multipliers' is not a [min, max] pair")
        query_heads = [
            make_divisible(model_dim * m, head_dim * groups) // head_dim
            for m in _linspace(multipliers[0], multipliers[1], num_layers, decimals=2)
        ]
    kv_heads = values["num_kv_heads"]
    if kv_heads is None:
        kv_heads = [q // groups for q in query_heads]
    ffn = values["ffn_multipliers"]
    if len(ffn) == 2 and num_layers != 2:
        ffn = _linspace(ffn[0], ffn[1], num_layers, decimals=2)
    elif len(ffn) == 1 and num_layers != 1:
        ffn = ffn * num_layers
    return {"num_query_heads": query_heads, "num_kv_heads": kv_heads, "ffn_multipliers": ffn}


def _check_layers(args: "ModelArgs", fail) -> None:
    """Cross-key checks: one entry per layer, whole KV-head groups, layer widths, token ids in the vocabulary."""
    num_layers = args.num_transformer_layers
    for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
        if len(getattr(args, key)) != num_layers:
            raise fail(f"'{key}' has {len(getattr(args, key))} entries but 'num_transformer_layers' is {num_layers}")
    for i, (q, kv) in enumerate(zip(args.num_query_heads, args.num_kv_heads)):
        if q % kv:
            raise fail(f"layer {i}: 'num_query_heads' ({q}) is not divisible by 'num_kv_heads' ({kv})")
    widths = [("q/k/v", "'num_query_heads', 'num_kv_heads' and 'head_dim'", args.qkv_out_dims),
              ("FFN", "'ffn_multipliers', 'model_dim' and 'ffn_dim_divisor'", args.ffn_dims)]
    for kind, keys, dims in widths:
        for i, width in enumerate(dims):
            if width > MAX_LAYER_WIDTH:
                raise fail(f"layer {i}: {keys} give a {kind} width of {width}, over the limit of {MAX_LAYER_WIDTH}")
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(args, key) >= args.vocab_size:
            raise fail(f"'{key}' ({getattr(args, key)}) is not below 'vocab_size' ({args.vocab_size})")


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a JSON config file with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit number, nesting too deep
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None


# ---- published architectures ------------------------------------------------------

def _preset_table() -> dict[str, Any]:
    text = resources.files("mlx_openelm").joinpath("presets.json").read_text()
    return json.loads(text)["presets"]


PRESET_NAMES: tuple[str, ...] = tuple(_preset_table())  # '270M', '450M', '1_1B', '3B'


def _preset(name: str) -> dict[str, Any]:
    """The presets.json entry for `name` (a preset name or alias, with or without 'OpenELM-')."""
    table = _preset_table()
    key = name.removeprefix("OpenELM-")
    for preset, entry in table.items():
        if key == preset or key in entry.get("aliases", ()):
            return entry
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(table)}")


def preset_config(name: str) -> dict[str, Any]:
    """The config.json dict of a published OpenELM size (one of `PRESET_NAMES`, or an alias such as '1.1B')."""
    return dict(_preset(name)["config"])


def preset_args(name: str, vocab_size: Optional[int] = None) -> ModelArgs:
    """`ModelArgs` of a published size; `vocab_size` overrides the vocabulary (CoreNet checkpoints: 32128)."""
    config = preset_config(name)
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    return ModelArgs.from_dict(config, source=f"preset {name}")


def preset_parameters(name: str) -> int:
    """Parameter count of a published size (tied embedding counted once)."""
    return int(_preset(name)["parameters"])
