"""Load OpenELM checkpoints (Hugging Face folders or converted MLX folders)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import KEYS, ModelArgs, read_config, same_vocabulary
from .errors import CheckpointError, ConfigError, OpenELMWarning
from .folder.names import CONFIG_FILE, IN_PROGRESS_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX, TEMPORARY_INFIX
from .model import Model
from .quantization import apply_quantization, read_quantization
from .hub import resolve_model_path, resolve_tokenizer
from .generation_config import read_generation_defaults
from .tokenizer import ChatTemplate, Tokenizer

DTYPES = {
    "float32": mx.float32,
    "fp32": mx.float32,
    "float16": mx.float16,
    "fp16": mx.float16,
    "bfloat16": mx.bfloat16,
    "bf16": mx.bfloat16,
}
DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}

# Saved by Hugging Face's OpenELM but never used by the model.
IGNORED_KEYS = frozenset({"transformer.classifier.weight"})

DTypeLike = Union[str, mx.Dtype, None]


def parse_dtype(dtype: DTypeLike, option: str = "dtype") -> Optional[mx.Dtype]:
    """'float16' / 'bf16' / mx.float32 / None -> mx.Dtype or None. Errors name `option`."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise ConfigError(f"{option}: unsupported dtype {dtype}; choose float32, float16 or bfloat16")
        return dtype
    key = str(dtype).lower()
    if key not in DTYPES:
        raise ConfigError(f"{option}: unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    return DTYPES[key]


def fp16_is_safe(args: ModelArgs) -> bool:
    """OpenELM-3B (model_dim 3072) overflows float16 activations; smaller sizes do not."""
    return args.model_dim < 3072


def default_dtype(args: ModelArgs, stored: Optional[mx.Dtype] = None) -> mx.Dtype:
    """The compute dtype that suits the current device.

    The CPU backend emulates half precision (and quantized matmuls with half
    activations are far slower), so it computes in float32. On a GPU: bfloat16
    for bfloat16 checkpoints and for models that overflow float16, else float16.
    """
    if mx.default_device() == mx.cpu:
        return mx.float32
    if stored == mx.bfloat16 or not fp16_is_safe(args):
        return mx.bfloat16
    return mx.float16


def is_temporary_folder(folder: Path) -> bool:
    """Whether `folder` is a conversion's temporary folder (unfinished, or left by a killed run)."""
    name = folder.absolute().name
    return (name.startswith(".") and TEMPORARY_INFIX in name) or (folder / IN_PROGRESS_FILE).exists()


def _load_safetensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises bare RuntimeError/ValueError on corrupt files
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def _check_shard_name(index: Path, tensor: str, name: object) -> None:
    """A shard must be a plain file name in the model folder: nothing outside it is ever read."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\x00")
    if plain:
        folder = index.parent.resolve()
        plain = (folder / name).parent == folder and Path(name).name == name and ":" not in name
    if not plain:
        raise CheckpointError(
            f"{index}: weight_map['{tensor}'] names {name!r}, which is not a plain file name in the model folder"
        )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from the index when sharded."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, RecursionError, KeyError, TypeError) as e:  # ValueError: undecodable bytes or JSON
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must be an object (tensor name -> shard file)")
        files = []
        for tensor, name in weight_map.items():
            _check_shard_name(index, tensor, name)
        for name in dict.fromkeys(weight_map.values()):
            shard = folder / name
            if not shard.is_file():
                raise CheckpointError(f"{index}: lists shard '{name}', which is missing from {folder}")
            files.append(shard)
        return files
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    if single.exists() or single.is_symlink():  # a folder, a device or a dangling link
        raise CheckpointError(f"{single}: not a regular file")
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(found)} but no {SAFETENSORS_INDEX})" if found else ""
    raise CheckpointError(f"{folder}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}{hint}")


def read_weights(folder: Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint folder, by name (shards merged)."""
    weights: dict[str, mx.array] = {}
    for path in weight_files(folder):
        for name, array in _load_safetensors(path).items():
            if name in weights:
                raise CheckpointError(f"{path}: tensor '{name}' also appears in another shard")
            weights[name] = array
    return weights


# ---- checking weights against the model ---------------------------------------------

@dataclass(frozen=True)
class WeightProblem:
    """One way a checkpoint's tensor disagrees with `Model(args)`; `describe` words it."""

    name: str
    kind: str  # "missing", "unexpected", "shape" or "dtype"
    expected: Any = None
    found: Any = None

    def describe(self, what: str = CONFIG_FILE, name: Optional[str] = None) -> str:
        """One clause naming the tensor (as `name`, e.g. the checkpoint's own spelling)."""
        name = name or self.name
        if self.kind == "missing":
            return f"tensor '{name}' is missing ({what} implies shape {self.expected})"
        if self.kind == "unexpected":
            return f"unexpected tensor '{name}' ({what} has no such parameter)"
        if self.kind == "shape":
            return f"tensor '{name}' has shape {self.found}, {what} implies {self.expected}"
        return f"tensor '{name}' has dtype {self.found}, expected {self.expected}"


def _is_float(dtype: Any) -> bool:
    """For MLX dtypes, numpy dtypes and dtype names alike."""
    return "float" in str(dtype)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("mlx.core.", "")


def check_weights(model: nn.Module, tensors: Mapping[str, Any]) -> list[WeightProblem]:
    """Every problem of `tensors` (name -> anything with `.shape` and `.dtype`) against
    `model`'s parameters: missing, wrong shape, wrong dtype (floats for float parameters,
    the exact dtype for packed quantized weights), then unexpected names. The model may
    be a lazy skeleton: its parameters are only looked at, never evaluated."""
    expected = dict(tree_flatten(model.parameters()))
    problems = []
    for name, param in expected.items():
        if name not in tensors:
            problems.append(WeightProblem(name, "missing", tuple(param.shape)))
            continue
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(param.shape):
            problems.append(WeightProblem(name, "shape", tuple(param.shape), tuple(tensor.shape)))
        elif _is_float(param.dtype) != _is_float(tensor.dtype) or (
            not _is_float(param.dtype) and _dtype_name(param.dtype) != _dtype_name(tensor.dtype)
        ):
            wanted = "floats" if _is_float(param.dtype) else _dtype_name(param.dtype)
            problems.append(WeightProblem(name, "dtype", wanted, _dtype_name(tensor.dtype)))
    problems += [WeightProblem(name, "unexpected") for name in tensors if name not in expected]
    return problems


# ---- loading -----------------------------------------------------------------------

def stored_float_dtype(weights: Mapping[str, mx.array]) -> Optional[mx.Dtype]:
    for array in weights.values():
        if mx.issubdtype(array.dtype, mx.floating):
            return array.dtype
    return None


def check_model_folder(path: Union[str, Path]) -> Path:
    """`path` as a folder that can hold a model (not a file, not a conversion's temp folder)."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: model folder not found")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a model folder (config.json + safetensors), got a file")
    if is_temporary_folder(folder):
        raise CheckpointError(f"{folder}: an unfinished conversion's temporary folder, not a model")
    return folder


def load_model(path: Union[str, Path], dtype: DTypeLike = None,
               adapter_path: Union[str, Path, None] = None) -> Model:
    """Load an OpenELM model from a folder holding `config.json` and safetensors weights.

    Works for Apple's Hugging Face checkpoints (fp32 or bf16, single file or sharded)
    and for folders written by `mlx-openelm convert` (quantized or not: config.json's
    `quantization` entry says which). `dtype` is the compute dtype; by default the one
    that suits the device (see `default_dtype`). `adapter_path`: a folder written by
    `mlx-openelm lora` or mlx-lm's `mlx_lm.lora` (adapter_config.json + adapters.safetensors),
    whose LoRA/DoRA (or fully fine-tuned layers) is added to the model.
    """
    folder = check_model_folder(path)
    config_path = folder / CONFIG_FILE
    config = read_config(config_path)
    args = ModelArgs.from_dict(config, source=str(config_path))
    quantization = read_quantization(config, str(config_path))
    compute_dtype = parse_dtype(dtype)

    weights = read_weights(folder)
    for name in IGNORED_KEYS:
        weights.pop(name, None)
    model = Model(args)
    if quantization is not None:
        apply_quantization(model, quantization, str(config_path), weights)
    problems = check_weights(model, weights)
    if problems:
        raise CheckpointError(f"{folder}: weights do not match config.json: {_list_problems(problems)}")

    if compute_dtype is None:
        compute_dtype = default_dtype(args, stored_float_dtype(weights))
    elif quantization is not None and compute_dtype != mx.float32 and mx.default_device() == mx.cpu:
        warnings.warn(
            f"{DTYPE_NAMES[compute_dtype]} with a quantized model is very slow on MLX's CPU backend "
            "(about 50x slower than float32, the default here)", OpenELMWarning, stacklevel=2,
        )
    stored = weights
    weights = {
        name: array.astype(compute_dtype) if mx.issubdtype(array.dtype, mx.floating) else array
        for name, array in weights.items()
    }
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    _evaluate_finite(model.parameters(), folder, stored)
    if adapter_path is not None:
        from .tuning.adapters import load_adapters

        load_adapters(model, adapter_path)
    return model


def _list_problems(problems: list[WeightProblem], most: int = 8) -> str:
    """All problems in a line: missing and unexpected names grouped, then each mismatch."""
    parts = []
    for kind, label in (("missing", "missing tensors"), ("unexpected", "unexpected tensors")):
        names = sorted(p.name for p in problems if p.kind == kind)
        if names:
            parts.append(f"{label}: {', '.join(names[:most])}{' ...' if len(names) > most else ''}")
    mismatches = [p.describe() for p in problems if p.kind in ("shape", "dtype")]
    parts += mismatches[:most] + (["..."] if len(mismatches) > most else [])
    return "; ".join(parts)


def _evaluate_finite(parameters: Mapping[str, Any], folder: Path, stored: Mapping[str, mx.array]) -> None:
    """Evaluate the parameters, checking in the same pass that every float is finite (`stored`,
    the tensors as read, tells a value the compute dtype cannot hold from a NaN in the file)."""
    flat = tree_flatten(parameters)
    finite = {name: mx.isfinite(a).all() for name, a in flat if mx.issubdtype(a.dtype, mx.floating)}
    mx.eval([a for _, a in flat], finite)
    bad = [name for name, ok in finite.items() if not ok.item()]
    if bad and bad[0] in stored and mx.isfinite(stored[bad[0]]).all().item():
        dtype = DTYPE_NAMES.get(dict(flat)[bad[0]].dtype, str(dict(flat)[bad[0]].dtype))
        raise CheckpointError(f"{folder}: tensor '{bad[0]}' holds values too large for {dtype} (the compute "
                              "dtype); load it in float32 or bfloat16 (`dtype`)")
    if bad:
        raise CheckpointError(f"{folder}: tensor '{bad[0]}' holds NaN or infinite values"
                              + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))


def load(
    path: Union[str, Path, None],
    tokenizer: Union[str, Path, None] = None,
    dtype: DTypeLike = None,
    log: Optional[Callable[[str], None]] = None,
    adapter_path: Union[str, Path, None] = None,
    chat_template: Union[str, Path, None] = None,
) -> tuple[Model, Tokenizer]:
    """Load a model and its tokenizer; returns `(model, tokenizer)`.

    `path` is a model folder or a Hugging Face repo id (see `mlx_openelm.hub`; None: the
    default, ``apple/OpenELM-270M-Instruct``). The tokenizer is `tokenizer` (a
    `tokenizer.model` or `tokenizer.json` file, a folder holding one, or a repo id), else
    the model folder's own (tokenizer.model first), else the default Llama-2 tokenizer
    repo; when none is found the error says what to pass. A tokenizer.json gets its BOS
    and EOS from config.json (`special_token_ids`). `log` receives one-line notices
    (which tokenizer was picked). `adapter_path`: a LoRA/DoRA adapter folder (ours or
    mlx-lm's) to add to the model, as in `load_model`. `chat_template`: a Jinja file used instead
    of the tokenizer folder's chat template. Every ``eos_token_id`` of the model folder's
    generation_config.json ends a reply too (`Tokenizer.eos_ids`).
    """
    folder = check_model_folder(resolve_model_path(path))
    config = read_config(folder / CONFIG_FILE)  # a folder that is no model is said before any tokenizer question
    tokenizer_path = resolve_tokenizer(folder, tokenizer, log=log)
    tok = Tokenizer(tokenizer_path, **special_token_ids(config))
    tok.eos_ids = tok.eos_ids | {i for i in read_generation_defaults(folder, config).eos_token_ids
                                 if i < tok.vocab_size}
    if chat_template is not None:
        tok.chat_template = ChatTemplate.from_file(chat_template)
    model = load_model(folder, dtype=dtype, adapter_path=adapter_path)
    check_tokenizer_fits(tok, model.args.vocab_size)
    return model, tok


def special_token_ids(config: Mapping[str, Any]) -> dict[str, int]:
    """``{"bos_id": ..., "eos_id": ...}`` from a config.json dict: its ``bos_token_id`` and
    ``eos_token_id``, or their defaults (1 and 2, Apple's) where absent. A value that is not
    an id is left to `ModelArgs`, which names the key when the model is built."""
    ids = {}
    for option, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id")):
        value = config.get(key, KEYS[key].default) if isinstance(config, Mapping) else KEYS[key].default
        ids[option] = value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
            else KEYS[key].default
    return ids


def check_tokenizer_fits(tok: Tokenizer, vocab_size: int) -> None:
    """Refuse a tokenizer with more pieces than the model's vocabulary; warn when it has fewer
    (except the known padded case), since the model may then generate ids it cannot decode."""
    if tok.vocab_size > vocab_size:
        raise CheckpointError(
            f"{tok.path}: tokenizer has {tok.vocab_size} pieces but the model's vocab_size is "
            f"{vocab_size}; is this the right tokenizer?"
        )
    if tok.vocab_size < vocab_size and not same_vocabulary(tok.vocab_size, vocab_size):
        warnings.warn(
            f"{tok.path}: tokenizer has {tok.vocab_size} pieces, fewer than the model's vocab_size "
            f"{vocab_size}; the model may generate ids it cannot decode (is this the right tokenizer?)",
            OpenELMWarning, stacklevel=3,
        )


def model_dtype(model: nn.Module) -> mx.Dtype:
    """The float dtype the model computes in (its norms' weights are never quantized)."""
    return model.transformer.norm.weight.dtype
