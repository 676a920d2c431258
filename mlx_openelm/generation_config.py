"""A model folder's generation defaults: its ``generation_config.json``, read as transformers reads it.

What the folder sets is the default for `generate`, `chat` and `serve`; an explicit option or
request field always wins. ``do_sample`` decides sampling, as in transformers: without it (or
false) decoding is greedy and ``temperature``/``top_p``/``top_k`` are not used; with it they
default to transformers' 1.0, 1.0 and 50. ``repetition_penalty`` and ``max_new_tokens`` apply
either way. ``eos_token_id`` (an id or a list) adds ids that end a reply.

A folder that sets no repetition penalty gets 1.0, except OpenELM's own (config.json's
``architectures`` names ``OpenELMForCausalLM``, as Apple's repos and folders converted from them
do, or is absent), which get Apple's recommended 1.2. Another model in OpenELM form (the trained test model, a
Llama) is not an OpenELM: on it 1.2 turns a Python docstring prompt into garbage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .errors import ConfigError
from .folder.names import CONFIG_FILE, GENERATION_CONFIG
from .folder.reading import read_json_object

OPENELM_ARCHITECTURE = "OpenELMForCausalLM"
OPENELM_REPETITION_PENALTY = 1.2  # Apple's model cards
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}  # transformers' when do_sample is true


def is_openelm(config: Mapping[str, Any]) -> bool:
    """Whether a config.json describes one of Apple's OpenELM models: its ``architectures`` names
    OpenELM's, or it has none (folders converted before the converter kept the key, hand-built ones:
    ``model_type`` is always "openelm", so they keep the default they had)."""
    architectures = config.get("architectures") if isinstance(config, Mapping) else None
    return architectures is None or (isinstance(architectures, list) and OPENELM_ARCHITECTURE in architectures)


@dataclass(frozen=True)
class GenerationDefaults:
    """What generation uses where the caller does not say: a folder's (`read_generation_defaults`) or the
    product's own (this class's defaults: greedy, no penalty, 256 tokens)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)


def _value(data: dict, key: str, path: Path, integer: bool = False, low: float = 0.0, low_open: bool = False,
           high: Optional[float] = None) -> Any:
    """`data[key]` checked (None when absent or null)."""
    value = data.get(key)
    if value is None:
        return None
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    in_range = number and not isinstance(value, bool) and math.isfinite(value) and (
        value > low if low_open else value >= low) and (high is None or value <= high)
    if not in_range:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ConfigError(f"{path}: '{key}' must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")
    return value


def _eos_ids(data: dict, path: Path) -> frozenset[int]:
    value = data.get("eos_token_id")
    ids = [value] if isinstance(value, int) else value
    if value is None:
        return frozenset()
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{path}: 'eos_token_id' must be a token id or a list of them, got {value!r}")
    return frozenset(ids)


def read_generation_defaults(folder: Union[str, Path], config: Optional[Mapping[str, Any]] = None
                             ) -> GenerationDefaults:
    """`folder`'s generation defaults (see the module docstring); `config` is its config.json (read
    here when not given), which says whether the model is an OpenELM."""
    folder = Path(folder)
    path = folder / GENERATION_CONFIG
    data = read_json_object(path, ConfigError)
    if config is None:
        config = read_json_object(folder / CONFIG_FILE, ConfigError)
    sample = data.get("do_sample")
    if sample is not None and not isinstance(sample, bool):
        raise ConfigError(f"{path}: 'do_sample' must be true or false, got {sample!r}")
    found = {
        "temperature": _value(data, "temperature", path),
        "top_p": _value(data, "top_p", path, low=0, low_open=True, high=1),
        "top_k": _value(data, "top_k", path, integer=True),
    }
    sampling = {key: SAMPLING_DEFAULTS[key] if found[key] is None else found[key] for key in found} if sample else {}
    penalty = _value(data, "repetition_penalty", path, low=0, low_open=True)
    if penalty is None:
        penalty = OPENELM_REPETITION_PENALTY if is_openelm(config) else 1.0
    max_tokens = _value(data, "max_new_tokens", path, integer=True, low=1)
    return GenerationDefaults(**sampling, repetition_penalty=penalty,
                              **({"max_tokens": max_tokens} if max_tokens is not None else {}),
                              eos_token_ids=_eos_ids(data, path))
