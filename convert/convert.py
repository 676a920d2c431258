"""Convert OpenELM checkpoints (Hugging Face safetensors or CoreNet .pt) to MLX folders.

`convert(...)` reads the input tensor by tensor (lazily: safetensors through
`mx.load`, CoreNet archives through a restricted unpickler), casts or quantizes each
tensor, and writes output shards as they fill, so it holds about one output shard
and one input tensor at a time. The output goes to a temporary folder beside the
target that is renamed into place only when everything (including the quality
check) succeeded; on any failure it is removed and the file system is as before.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from mlx_openelm.config import ModelArgs, preset_args, read_config
from mlx_openelm.errors import CheckpointError, ConfigError
from mlx_openelm.hub import TOKENIZER_FILE, resolve_model_path, resolve_tokenizer
from mlx_openelm.loading import (
    DTYPE_NAMES,
    IGNORED_KEYS,
    check_weights,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    fp16_is_safe,
    parse_dtype,
    read_weights,
)

from .corenet import expected_shapes, read_corenet
from mlx_openelm.model import Model
from mlx_openelm.quantization import (
    QuantizationPlan,
    apply_quantization,
    check_options,
    plan_quantization,
    read_quantization,
)

CORENET_VOCAB_SIZE = 32128
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
EVAL_LENGTH = 64
EVAL_SEED = 1234

Progress = Callable[[int, int, str], None]


# ---- inputs ------------------------------------------------------------------------------

class Source:
    """One input checkpoint: its architecture and its tensors (our names), read lazily."""

    path: Path
    args: ModelArgs
    kind: str
    tokenizer: Optional[Path] = None

    def names(self) -> list[str]:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def get(self, name: str) -> Union[np.ndarray, mx.array]:
        """The tensor in float32 (float64 numpy for averages); read once, then forgotten."""
        raise NotImplementedError


class HFSource(Source):
    """A Hugging Face OpenELM folder (config.json plus safetensors), or a folder this
    converter quantized, whose weights are dequantized as they are read."""

    def __init__(self, folder: Path):
        self.path = folder
        config_path = folder / "config.json"
        config = read_config(config_path)
        self.args = ModelArgs.from_dict(config, source=str(config_path))
        # A quantized MLX folder (--dequantize): its tensors are dequantized as they are read.
        self.quantization = read_quantization(config, str(config_path))
        self.kind = "mlx-quantized" if self.quantization else "huggingface"
        self._arrays = {n: a for n, a in read_weights(folder).items() if n not in IGNORED_KEYS}  # lazy
        model = Model(self.args)  # a lazy skeleton: never evaluated
        if self.quantization is not None:
            apply_quantization(model, self.quantization, str(config_path), self._arrays)
        problems = check_weights(model, self._arrays)
        if problems:
            raise CheckpointError(f"{folder}: {problems[0].describe(str(config_path))}")
        # weight name -> (bits, group size) of each quantized layer
        self._quantized = {f"{path}.weight": (m.bits, m.group_size)
                           for path, m in model.named_modules() if hasattr(m, "scales")}
        self._shapes = expected_shapes(self.args)  # the float model's, in model order
        self._order = list(self._shapes)
        candidate = folder / TOKENIZER_FILE
        self.tokenizer = candidate if candidate.is_file() else None

    def names(self) -> list[str]:
        return list(self._order)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def get(self, name: str) -> mx.array:
        array = self._arrays.pop(name)  # evaluated data must not stay referenced here
        try:
            if name in self._quantized:
                module, (bits, group) = name[: -len(".weight")], self._quantized[name]
                scales = self._arrays.pop(f"{module}.scales").astype(mx.float32)  # dequantize in float32
                biases = self._arrays.pop(f"{module}.biases").astype(mx.float32)
                array = mx.dequantize(array, scales, biases, group_size=group, bits=bits)
            array = array.astype(mx.float32)
            mx.eval(array)
            return array
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({e})") from None


class CoreNetSource(Source):
    """A CoreNet `.pt` checkpoint. Its architecture is a named preset (with CoreNet's
    vocabulary of 32128) or a config.json (for other CoreNet OpenELM configurations)."""

    kind = "corenet"

    def __init__(self, path: Path, preset: Optional[str] = None, config: Union[str, Path, None] = None):
        self.path = path
        if config is not None:
            config_path = Path(config).expanduser()
            self.args = ModelArgs.from_dict(read_config(config_path), source=str(config_path))
            what = f"{config_path}"
        else:
            self.args = preset_args(preset, vocab_size=CORENET_VOCAB_SIZE)
            what = f"preset {preset} (vocab {CORENET_VOCAB_SIZE})"
        self._tensors = read_corenet(path, self.args, what)
        self.tokenizer = None

    def names(self) -> list[str]:
        return list(self._tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: t.shape for n, t in self._tensors.items()}

    def get(self, name: str) -> np.ndarray:
        array = self._tensors[name].load()
        return array if array.dtype in (np.float32, np.float64) else array.astype(np.float32)


class AveragedSource(Source):
    """The element-wise mean of several checkpoints of one architecture, in float64."""

    kind = "average"

    def __init__(self, sources: Sequence[Source]):
        first = sources[0]
        for other in sources[1:]:
            if other.args != first.args:
                raise ConfigError(f"--average: {other.path} has a different architecture from {first.path}")
        self.sources = list(sources)
        self.path = first.path
        self.args = first.args
        self.tokenizer = first.tokenizer

    def names(self) -> list[str]:
        return self.sources[0].names()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.sources[0].shapes()

    def get(self, name: str) -> np.ndarray:
        total = np.array(self.sources[0].get(name), dtype=np.float64)
        for source in self.sources[1:]:
            total += np.asarray(source.get(name), dtype=np.float64)
        return total / len(self.sources)


def _leaves(source: Source) -> list[Source]:
    return list(source.sources) if isinstance(source, AveragedSource) else [source]


def open_source(reference: Union[str, Path], preset: Optional[str] = None,
                config: Union[str, Path, None] = None) -> Source:
    """A folder is a Hugging Face checkpoint; a file is a CoreNet `.pt` (needs `preset` or `config`)."""
    path = resolve_model_path(reference)
    if path.is_dir():
        if preset is not None or config is not None:
            option = "--preset" if preset is not None else "--config"
            raise ConfigError(
                f"{option}: {path} is a Hugging Face folder whose config.json gives the architecture; "
                f"{option} is only for CoreNet .pt checkpoints"
            )
        return HFSource(path)
    if preset is not None and config is not None:
        raise ConfigError("give either --preset or --config for a CoreNet checkpoint, not both")
    if preset is None and config is None:
        raise ConfigError(f"{path}: a CoreNet .pt checkpoint needs --preset (270M, 450M, 1_1B or 3B) or --config")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    return CoreNetSource(path, preset=preset, config=config)


# ---- report --------------------------------------------------------------------------------

@dataclass
class ConvertReport:
    output: str
    inputs: list[str]
    source_kind: str
    dtype: str
    bits: Optional[int]
    group_size: Optional[int]
    recipe: Optional[str]
    parameters: int
    bits_per_weight: float
    size_bytes: int
    shards: int
    layer_bits: dict[str, int]  # "4": number of layers, "8": ..., "float": skipped
    skipped_layers: dict[str, int]  # module path -> input width not divisible by the group size
    max_rel_error: float
    max_rel_error_tensor: str
    kl_mean: Optional[float] = None
    kl_max: Optional[float] = None
    top1_agreement: Optional[float] = None
    eval_tokens: int = 0
    tokenizer: Optional[str] = None
    seconds: float = 0.0
    peak_memory_mb: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ---- conversion ----------------------------------------------------------------------------

def default_convert_dtype(args: ModelArgs) -> mx.Dtype:
    """float16, except for models that overflow it (3B-class: model_dim >= 3072): bfloat16."""
    return mx.float16 if fp16_is_safe(args) else mx.bfloat16


def parse_size(value: Union[str, int, float]) -> int:
    """'5GB', '500MB', '64KB', '123' (bytes) -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = int(value)
    else:
        text = str(value).strip().upper().replace("IB", "B")
        units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1}
        for unit, factor in units.items():
            if text.endswith(unit):
                try:
                    size = int(float(text[: -len(unit)]) * factor)
                except ValueError:
                    raise ConfigError(f"--max-shard-size: cannot read {value!r} (e.g. 5GB, 500MB)") from None
                break
        else:
            try:
                size = int(text)
            except ValueError:
                raise ConfigError(f"--max-shard-size: cannot read {value!r} (e.g. 5GB, 500MB)") from None
    if size <= 0:
        raise ConfigError(f"--max-shard-size: must be positive, got {value!r}")
    return size


def _resolve_tokenizer(tokenizer: Union[str, Path, None], source: Source) -> Optional[Path]:
    """--tokenizer (a file, a folder holding one, or a repo id), else the input's own, else none."""
    if tokenizer is None:
        return source.tokenizer
    return resolve_tokenizer(None, tokenizer)


def _is_within(path: Path, other: Path) -> bool:
    try:
        path.resolve().relative_to(other.resolve())
        return True
    except ValueError:
        return False


class _ShardWriter:
    """Collects converted tensors and writes a safetensors shard whenever the next would overflow."""

    def __init__(self, folder: Path, max_bytes: int, metadata: dict):
        self.folder, self.max_bytes, self.metadata = folder, max_bytes, metadata
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, group: dict[str, mx.array]) -> None:
        size = sum(a.nbytes for a in group.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(group)
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.files) + 1:05d}.safetensors"
        mx.save_safetensors(str(path), self.pending, metadata=self.metadata)
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Give the shards their final names; write the index when there are several."""
        self.flush()
        if len(self.files) == 1:
            final = self.folder / SAFETENSORS_FILE
            os.replace(self.files[0][0], final)
            return [final]
        n = len(self.files)
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self.files):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        return finals


def convert_tensor(
    name: str, weight: Union[np.ndarray, mx.array], dtype: mx.Dtype, plan: Optional[QuantizationPlan]
) -> tuple[dict[str, mx.array], float]:
    """Cast or quantize one float tensor: the output tensors by name, and their relative error.

    The relative error is ||w' - w|| / ||w|| with w the input tensor (float32/64) and w'
    what the output represents (the dequantized weight, or the cast one).
    """
    if isinstance(weight, np.ndarray):
        weight = mx.array(weight.astype(np.float32, copy=False))
    w32 = weight.astype(mx.float32)
    spec = plan.spec(name[: -len(".weight")]) if plan is not None and name.endswith(".weight") else None
    if spec is None:
        out = w32.astype(dtype)
        approx = out.astype(mx.float32)
        tensors = {name: out}
    else:
        bits, group_size = spec
        wq, scales, biases = mx.quantize(w32.astype(dtype), group_size=group_size, bits=bits, mode="affine")
        prefix = name[: -len("weight")]
        tensors = {name: wq, prefix + "scales": scales, prefix + "biases": biases}
        # in float32, as the runtime computes on CPU (load_model widens scales and biases)
        approx = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size,
                               bits=bits, mode="affine")
    num = mx.sqrt(mx.sum(mx.square(approx - w32)))
    den = mx.sqrt(mx.sum(mx.square(w32)))
    mx.eval(tensors, num, den)
    rel = float(num.item()) / float(den.item()) if float(den.item()) > 0 else float(num.item())
    return tensors, rel


def eval_tokens(args: ModelArgs, length: int = EVAL_LENGTH) -> list[int]:
    """A fixed token sequence: BOS then seeded pseudo-random ids of the vocabulary."""
    rng = np.random.default_rng(EVAL_SEED)
    high = max(4, min(args.vocab_size, 32000))
    length = min(length, args.max_context_length)
    return [args.bos_token_id] + rng.integers(3, high, size=length - 1).tolist()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(p_ref || p) per position, in float64."""
    log_p = _log_softmax(reference_logits.astype(np.float64))
    log_q = _log_softmax(logits.astype(np.float64))
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def layerwise_logits(
    args: ModelArgs,
    tensor: Callable[[str], mx.array],
    tokens: Sequence[int],
    quantization: Optional[dict] = None,
) -> np.ndarray:
    """Float32 logits (L, vocab) of `tokens`, computed one decoder layer at a time.

    `tensor(name)` returns a checkpoint tensor by our name (MLX or numpy). `Model(args)` is only a
    lazy skeleton: its random initial weights are never evaluated, each layer's real
    weights are loaded just before it runs and dropped after, so the check holds the
    embedding plus one layer, not a second copy of the whole model.
    """
    from mlx.utils import tree_flatten

    model = Model(args)
    if quantization is not None:
        apply_quantization(model, quantization)

    def load(module, prefix: str) -> None:
        names = [name for name, _ in tree_flatten(module.parameters())]
        weights = []
        for name in names:
            array = tensor(prefix + name)
            if not isinstance(array, mx.array):  # numpy from CoreNet files and float64 averages
                array = mx.array(np.asarray(array, dtype=np.float32))
            if mx.issubdtype(array.dtype, mx.floating):
                array = array.astype(mx.float32)  # the CPU runtime's compute dtype
            weights.append((name, array))
        module.load_weights(weights, strict=True)

    transformer = model.transformer
    load(transformer.token_embeddings, "transformer.token_embeddings.")
    h = transformer.token_embeddings(mx.array([list(tokens)]))
    for i, layer in enumerate(transformer.layers):
        load(layer, f"transformer.layers.{i}.")
        h = layer(h, "causal" if len(tokens) > 1 else None, None)
        mx.eval(h)
        transformer.layers[i] = None  # free this layer's weights
    load(transformer.norm, "transformer.norm.")
    h = transformer.norm(h)
    if "lm_head" in model:
        load(model.lm_head, "lm_head.")
        logits = model.lm_head(h)
    else:
        logits = transformer.token_embeddings.as_linear(h)
    return np.array(logits[0].astype(mx.float32))


def reference_logits(source: Source, tokens: Sequence[int]) -> np.ndarray:
    """Logits of the float input model (float32 compute) on `tokens`."""
    return layerwise_logits(source.args, source.get, tokens)


def model_logits(folder: Path, tokens: Sequence[int]) -> np.ndarray:
    """Logits of a converted folder on `tokens`, as `load_model(folder, float32)` computes them."""
    config = read_config(folder / "config.json")
    weights = read_weights(folder)
    return layerwise_logits(ModelArgs.from_dict(config), weights.pop, tokens, read_quantization(config))


def _peak_memory_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 1024**2


def convert(
    hf_path: Union[str, Path, None] = None,
    mlx_path: Union[str, Path] = "mlx_model",
    *,
    average: Sequence[Union[str, Path]] = (),
    preset: Optional[str] = None,
    config: Union[str, Path, None] = None,
    dtype: Union[str, mx.Dtype, None] = None,
    bits: Optional[int] = None,
    group_size: int = 64,
    recipe: Optional[str] = None,
    tokenizer: Union[str, Path, None] = None,
    force: bool = False,
    max_shard_size: Union[str, int] = DEFAULT_MAX_SHARD_BYTES,
    evaluate: bool = True,
    dequantize: bool = False,
    progress: Optional[Progress] = None,
) -> ConvertReport:
    """Convert a checkpoint (or the average of several) into an MLX model folder at `mlx_path`.

    hf_path: a Hugging Face OpenELM folder, or a CoreNet `.pt` file (with `preset`, or
        `config`: a config.json describing a non-preset CoreNet architecture).
    average: several such checkpoints of one model, averaged in float64 (instead of hf_path).
    dtype: float dtype of the output (default float16; bfloat16 for 3B-class models).
    bits / group_size / recipe: affine quantization of every Linear layer and the embedding
        (see `mlx_openelm.quantization` for the allowed bits and group sizes); recipe 'mixed-4-8' keeps the head at 8 bits.
    evaluate: compare the output with the float input on a fixed token sequence (KL divergence).
    dequantize: the input is a quantized MLX folder; write its weights back in float.

    Raises ConfigError/CheckpointError/TokenizerError before writing anything for bad inputs
    or options; on any failure while writing, the temporary folder is removed.
    """
    start = time.perf_counter()
    # -- validate everything before touching the file system --
    if hf_path is not None and average:
        raise ConfigError("give either --hf-path or --average, not both")
    if hf_path is None and not average:
        raise ConfigError("nothing to convert: give --hf-path (or --average CKPT CKPT ...)")
    if average and len(average) < 2:
        raise ConfigError("--average needs at least two checkpoints")
    default_bits = check_options(bits, group_size, recipe)
    out_dtype = parse_dtype(dtype, option="--dtype") if dtype is not None else None
    max_bytes = parse_size(max_shard_size)
    if mlx_path is None or str(mlx_path) == "":
        raise ConfigError("--mlx-path: an output folder is required")
    target = Path(mlx_path).expanduser()

    references = [hf_path] if hf_path is not None else list(average)

    def open_all() -> Source:
        sources = [open_source(r, preset, config) for r in references]
        return sources[0] if len(sources) == 1 else AveragedSource(sources)

    source = open_all()
    inputs = [s.path for s in _leaves(source)]
    for path in inputs:
        if _is_within(target, path) or _is_within(path, target):
            raise ConfigError(f"--mlx-path: {target} overlaps the input {path}; choose another output folder")
    quantized_inputs = [s.path for s in _leaves(source) if getattr(s, "quantization", None)]
    if dequantize and not quantized_inputs:
        raise ConfigError(f"--dequantize: {inputs[0]} is not a quantized model")
    if quantized_inputs and not dequantize:
        raise ConfigError(
            f"{quantized_inputs[0]} holds a quantized model: pass --dequantize to write it back in float "
            "(to quantize differently, convert the original checkpoint: re-quantizing compounds the error)"
        )
    if dequantize and default_bits is not None:
        raise ConfigError("--dequantize writes float weights; it cannot be combined with --bits or --recipe")
    if target.exists() and not force:
        raise ConfigError(f"--mlx-path: {target} already exists; pass --force to replace it")
    args = source.args
    if out_dtype is None:
        out_dtype = default_convert_dtype(args)
    tokenizer_path = _resolve_tokenizer(tokenizer, source)
    shapes = source.shapes()
    plan = plan_quantization(shapes, default_bits, group_size, recipe) if default_bits is not None else None

    # -- write into a temporary folder beside the target --
    created_parents = _make_parents(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
        writer = _ShardWriter(tmp, max_bytes, metadata={"format": "mlx"})
        names = source.names()
        worst, worst_name, stored_bits = 0.0, "", 0
        for i, name in enumerate(names):
            if progress is not None:
                progress(i, len(names), name)
            tensors, rel = convert_tensor(name, source.get(name), out_dtype, plan)
            if rel >= worst:
                worst, worst_name = rel, name
            stored_bits += sum(a.nbytes for a in tensors.values()) * 8
            writer.add(tensors)
            del tensors
        if progress is not None:
            progress(len(names), len(names), "")
        files = writer.finish()

        out_config = args.to_dict()
        out_config["torch_dtype"] = DTYPE_NAMES[out_dtype]
        if plan is not None:
            out_config["quantization"] = plan.config_entry()
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)

        parameters = args.num_parameters()
        layer_bits: dict[str, int] = {}
        if plan is not None:
            for _path, (b, _g) in plan.specs.items():
                layer_bits[str(b)] = layer_bits.get(str(b), 0) + 1
            if plan.skipped:
                layer_bits["float"] = len(plan.skipped)
        report = ConvertReport(
            output=str(target),
            inputs=[str(p) for p in inputs],
            source_kind=source.kind,
            dtype=DTYPE_NAMES[out_dtype],
            bits=default_bits,
            group_size=group_size if plan is not None else None,
            recipe=recipe,
            parameters=parameters,
            bits_per_weight=stored_bits / parameters,
            size_bytes=sum(f.stat().st_size for f in files),
            shards=len(files),
            layer_bits=layer_bits,
            skipped_layers=dict(plan.skipped) if plan is not None else {},
            max_rel_error=worst,
            max_rel_error_tensor=worst_name,
            tokenizer=str(tokenizer_path) if tokenizer_path is not None else None,
        )

        if evaluate:
            tokens = eval_tokens(args)
            ref = reference_logits(open_all(), tokens)
            out = model_logits(tmp, tokens)
            kl = kl_divergence(ref, out)
            report.kl_mean = float(kl.mean())
            report.kl_max = float(kl.max())
            report.top1_agreement = float((ref.argmax(-1) == out.argmax(-1)).mean())
            report.eval_tokens = len(tokens)

        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created_parents):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    report.seconds = time.perf_counter() - start
    report.peak_memory_mb = _peak_memory_mb()
    return report


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and missing parents; return those created (outermost first)."""
    missing = []
    current = folder.absolute()
    while not current.exists():
        missing.append(current)
        current = current.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except OSError as e:
            for done in reversed(created):
                done.rmdir()
            raise ConfigError(f"--mlx-path: cannot create {path} ({e.strerror})") from None
        created.append(path)
    return created


def _install(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`. An existing target is moved aside first and deleted
    only once the new folder is in place, so a failure never loses it."""
    if not target.exists() and not target.is_symlink():
        os.rename(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
