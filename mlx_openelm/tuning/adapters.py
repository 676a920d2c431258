"""Putting adapters into a model: wrap the chosen projections, freeze the rest, load a saved adapter.

`apply_adapters(model, config)` freezes the model and makes trainable only what the adapter
trains (LoRA/DoRA: the new low-rank matrices and magnitudes; full: every parameter of the
last `num_layers` layers). `load_adapters(model, folder)` does the same from an adapter
folder (ours or mlx-lm's) and loads its tensors, checking each name and shape first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_openelm.errors import CheckpointError, ConfigError
from mlx_openelm.folder.names import ADAPTER_CONFIG_FILE, ADAPTERS_FILE

from .config import AdapterConfig, read_adapter_config
from .layers import ADAPTER_CLASSES, LoRALinear

ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


def _module_at(layer: nn.Module, path: str) -> nn.Module:
    module = layer
    for part in path.split("."):
        module = module[part] if isinstance(module, dict) else getattr(module, part)
    return module


def apply_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze `model` and add `config`'s adapter to it in place (fresh: LoRA's B is zero, so the
    model computes what it did). Returns the model."""
    model.freeze()
    layers = model.layers
    if config.num_layers > len(layers):
        raise ConfigError(f"num_layers: {config.num_layers} but the model has {len(layers)} decoder layers")
    for index in config.layer_indices(len(layers)):
        layer = layers[index]
        if config.fine_tune_type == "full":
            if any(isinstance(m, nn.QuantizedLinear) for _, m in layer.named_modules()):
                raise ConfigError("fine_tune_type full: the model is quantized; train lora or dora on it (QLoRA), "
                                  "or fully fine-tune a float model (convert --dequantize writes one)")
            layer.unfreeze()
            continue
        wrapper = ADAPTER_CLASSES[config.fine_tune_type]
        wrapped = []
        for key in config.keys:
            base = _module_at(layer, key)
            if isinstance(base, LoRALinear):
                raise ConfigError(f"transformer.layers.{index}.{key} already has an adapter")
            if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
                raise ConfigError(f"transformer.layers.{index}.{key} is a {type(base).__name__}, not a linear layer")
            wrapped.append((key, wrapper(base, config.rank, config.scale, config.dropout)))
        layer.update_modules(tree_unflatten(wrapped))
    return model


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The tensors an adapter file holds: the model's trainable parameters, by name."""
    return dict(tree_flatten(model.trainable_parameters()))


def load_adapters(model: nn.Module, adapter_path: Union[str, Path]) -> AdapterConfig:
    """Add the adapter saved in folder `adapter_path` (adapter_config.json + adapters.safetensors,
    ours or mlx-lm's) to `model` in place, ready for inference (eval mode). Every tensor in the
    file must be one of the adapter's parameters with its shape, and every parameter must be in
    the file; otherwise a ConfigError/CheckpointError names the file and the tensor."""
    folder = Path(adapter_path)
    config = read_adapter_config(folder, len(model.layers))
    apply_adapters(model, config)
    load_adapter_weights(model, folder / ADAPTERS_FILE, config)
    model.eval()
    return config


def load_adapter_weights(model: nn.Module, path: Path, config: AdapterConfig) -> None:
    """Load an adapter file into a model that has `config`'s adapter applied, after checking that the
    file holds exactly its parameters with their shapes (a CheckpointError names the first that is not)."""
    weights = read_adapter_file(path)
    expected = adapter_weights(model)
    for name, array in weights.items():
        if name not in expected:
            raise CheckpointError(f"{path}: tensor '{name}' is not a parameter of this adapter "
                                  f"({config.fine_tune_type}, last {config.num_layers} layers, {', '.join(config.keys)})")
        if tuple(array.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(array.shape)}, the model's parameter "
                                  f"has {tuple(expected[name].shape)} (is this adapter for another model?)")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(f"{path}: tensor '{missing[0]}' is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    # full fine-tuning stores whole layers: back to the model's compute dtype (adapters stay float32)
    weights = {name: array.astype(expected[name].dtype) for name, array in weights.items()}
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())


def read_adapter_file(path: Path) -> dict[str, mx.array]:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (an adapter folder holds {ADAPTER_CONFIG_FILE} and {ADAPTERS_FILE})")
    try:
        weights = mx.load(str(path))
    except Exception as e:  # MLX raises bare RuntimeError/ValueError on corrupt files
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    bad = [name for name, array in weights.items() if not mx.issubdtype(array.dtype, mx.floating)]
    if bad:
        raise CheckpointError(f"{path}: tensor '{bad[0]}' is not a float tensor")
    return weights


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put the base layers back in place of the LoRA/DoRA wrappers (the adapter is dropped)."""
    bases = [(name, module.linear) for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if bases:
        model.update_modules(tree_unflatten(bases))
    return model
