"""Fusing an adapter into the model's weights: a normal model folder that every command and mlx-lm load.

Each adapted layer's weight becomes w + s b^T a^T (DoRA: with its rows rescaled to the
magnitudes m), computed in float32. A quantized base is dequantized, merged and
re-quantized with the converter's quantizer (`quantizers`) at the layer's own bits and group
size (the folder's recorded method, else the default), or, with `dequantize`, the whole
model is written in float. Every other tensor is copied exactly as stored. The folder is
written as `convert` writes one (`mlx_openelm.folder`): into a temporary folder renamed into
place when complete, never replacing an existing output without `force`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx

from mlx_openelm.config import read_config
from mlx_openelm.errors import ConfigError
from mlx_openelm.folder.install import check_replaceable, installing
from mlx_openelm.folder.names import CONFIG_FILE, TOKENIZER_SIDE_FILES
from mlx_openelm.folder.writing import DEFAULT_MAX_SHARD_BYTES, ShardWriter, copy_file, parse_size, write_config
from mlx_openelm.hub import resolve_model_path
from mlx_openelm.loading import DTYPE_NAMES, IGNORED_KEYS, check_model_folder, load_model, read_weights, \
    stored_float_dtype
from mlx_openelm.quantization import DEFAULT_METHOD, read_quantization
from mlx_openelm.quantizers import group_errors, quantize

from .layers import LoRALinear


def _dequantized(stored: dict, path: str) -> mx.array:
    quantization = stored["__quantization__"]
    bits, group_size = quantization.spec(path)
    return mx.dequantize(stored[f"{path}.weight"], stored[f"{path}.scales"], stored[f"{path}.biases"],
                         group_size=group_size, bits=bits)


def fused_tensors(model, stored: dict, quantization, dequantize: bool, method: str) -> tuple[dict, list]:
    """The output's tensors by name, and (module path, relative error) for each re-quantized layer."""
    dtype = stored_float_dtype(stored)
    out = {name: array for name, array in stored.items() if not name.startswith("__")}
    if dequantize and quantization is not None:
        for name in [n for n in out if n.endswith(".scales")]:
            path = name[: -len(".scales")]
            out[f"{path}.weight"] = _dequantized(stored, path).astype(out[name].dtype)
            del out[name], out[f"{path}.biases"]
    errors = []
    for path, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        weight = module.fused_weight()
        if f"{path}.scales" in out:
            bits, group_size = quantization.spec(path)
            q = quantize(weight, bits, group_size, method, dtype=out[f"{path}.scales"].dtype)
            out[f"{path}.weight"], out[f"{path}.scales"], out[f"{path}.biases"] = q
            error = mx.sqrt(mx.sum(group_errors(weight, q, bits, group_size)) / mx.sum(mx.square(weight)))
            errors.append((path, error.item()))
        else:
            out[f"{path}.weight"] = weight.astype(out[f"{path}.weight"].dtype)
    for name, array in _fully_tuned(model, stored).items():
        out[name] = array.astype(dtype)
    return out, errors


def _fully_tuned(model, stored: dict) -> dict:
    """Parameters a full fine-tune changed (not LoRA's own tensors), by name."""
    from mlx.utils import tree_flatten

    trained = dict(tree_flatten(model.trainable_parameters()))
    return {name: a for name, a in trained.items() if name in stored and not name.endswith((".lora_a", ".lora_b"))}


def _check_target(target: Path, force: bool) -> None:
    if (target.exists() or target.is_symlink()) and not force:
        raise ConfigError(f"save_path: {target} exists; pass `force=True` to replace it")
    check_replaceable(target, "save_path")


def fuse(model_path: Union[str, Path], adapter_path: Union[str, Path], save_path: Union[str, Path], *,
         dequantize: bool = False, force: bool = False, method: Optional[str] = None,
         max_shard_size: Union[str, int] = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Merge the adapter at `adapter_path` into `model_path`'s weights and write the model to `save_path`.
    Returns a report (layers fused, re-quantized layers' worst relative error, time)."""
    start = time.perf_counter()
    folder = check_model_folder(resolve_model_path(model_path))
    target = Path(save_path).expanduser()
    _check_target(target, force)
    max_bytes = parse_size(max_shard_size)
    config = read_config(folder / CONFIG_FILE)
    quantization = read_quantization(config, str(folder / CONFIG_FILE))
    stored = {n: a for n, a in read_weights(folder).items() if n not in IGNORED_KEYS}
    stored["__quantization__"] = quantization
    model = load_model(folder, dtype="float32", adapter_path=adapter_path)
    method = method or (quantization.method if quantization and quantization.method else DEFAULT_METHOD)
    tensors, errors = fused_tensors(model, stored, quantization, dequantize, method)
    if dequantize:
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    fused = sum(isinstance(m, LoRALinear) for _, m in model.named_modules())
    _write(folder, target, tensors, config, force, max_bytes)
    return {"output": str(target), "fused_layers": fused, "requantized_layers": len(errors),
            "method": method if errors else None, "max_requantization_error": max((e for _, e in errors), default=None),
            "dequantized": bool(dequantize and quantization), "dtype": DTYPE_NAMES.get(stored_float_dtype(tensors)),
            "seconds": time.perf_counter() - start}


def _write(source: Path, target: Path, tensors: dict, config: dict, force: bool, max_bytes: int) -> None:
    with installing(target, force, "save_path") as tmp:
        writer = ShardWriter(tmp, max_bytes, {"format": "mlx"})
        for name in sorted(tensors):
            writer.add({name: tensors[name]})
        writer.finish()
        for name in TOKENIZER_SIDE_FILES:  # the tokenizer and the Hugging Face files describing it, as they were
            if (source / name).is_file():
                copy_file(source / name, tmp / name)
        write_config(tmp, json.loads(json.dumps(config)))
