"""Convert OpenELM checkpoints (Hugging Face safetensors or CoreNet .pt) to MLX folders.

`convert(...)` tells the story; each step lives in the module named for its job:
`sources` (reading inputs lazily, tensor by tensor), `mlx_openelm.quantization` (the plan),
`quantize` (casting or quantizing each tensor), `quality` (the layer-wise KL check); the folder
is written and installed by the core's `mlx_openelm.folder` (shards, config.json, tokenizer; temp
folder, atomic rename).
It holds about one output shard and one input tensor at a time.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import mlx.core as mx

from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import ConfigError, TokenizerError
from mlx_openelm.folder.install import check_replaceable, installing
from mlx_openelm.folder.names import GENERATION_CONFIG
from mlx_openelm.folder.writing import (DEFAULT_MAX_SHARD_BYTES, ShardWriter, copy_tokenizer, model_config,
                                        parse_size, write_config)
from mlx_openelm.hf_files import write_tokenizer_files
from mlx_openelm.hub import resolve_tokenizer
from mlx_openelm.loading import DTYPE_NAMES, check_tokenizer_fits, fp16_is_safe, parse_dtype
from mlx_openelm.quantization import DEFAULT_METHOD, QuantizationPlan, check_options, plan_quantization
from mlx_openelm.tokenizer import Tokenizer

from .calibration import OPTION as CALIBRATION_OPTION
from .calibration import CalibrationText, FoldedSource, calibrate, calibration_text
from .importance import data_free_importance
from .quality import eval_tokens, kl_divergence, model_logits, reference_logits
from .quantize import convert_tensor
from .report import ConvertReport, layer_bits, peak_memory_mb
from .sources import AveragedSource, Source, leaves, open_source



@dataclass(frozen=True)
class ConvertProgress:
    """How far the conversion is: tensors and weights (elements) converted so far, of the totals."""

    tensors_done: int
    tensors_total: int
    weights_done: int
    weights_total: int
    name: str  # the tensor about to be converted ("" once all are)


Progress = Callable[[ConvertProgress], None]


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
    method: str = DEFAULT_METHOD,
    tokenizer: Union[str, Path, None] = None,
    calibration_text: Union[str, Path, None] = None,
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
        (allowed values: `mlx_openelm.quantization`); recipe 'mixed-LOW-HIGH' gives the sensitive
        layers (output head, every qkv_proj, the last decoder layer) HIGH bits and the rest LOW bits.
    method: 'optimal' (error-minimising scales and biases) or 'minmax' (mx.quantize, as mlx-lm).
    calibration_text: a UTF-8 text file; its activation statistics choose per-channel scales folded
        into each attn_norm/qkv_proj and ffn_norm/proj_1 pair (`calibration`); needs a tokenizer.
    evaluate: compare the output with the float input on a fixed token sequence (KL divergence).
    dequantize: the input is a quantized MLX folder; write its weights back in float.

    Raises ConfigError/CheckpointError/TokenizerError before writing anything for bad inputs
    or options; on any failure or interrupt while writing, the temporary folder is removed.
    An existing `mlx_path` is replaced only with `force`, even if it appears while converting.
    """
    start = time.perf_counter()
    references = _references(hf_path, average)
    default_bits = check_options(bits, group_size, recipe, method)
    out_dtype = parse_dtype(dtype, option="dtype") if dtype is not None else None
    max_bytes = parse_size(max_shard_size)
    if mlx_path is None or str(mlx_path) == "":
        raise ConfigError("mlx_path: an output folder is required")
    target = Path(mlx_path).expanduser()

    source = open_sources(references, preset, config)
    _check_inputs(source, target, force, dequantize, default_bits)
    args = source.args
    out_dtype = out_dtype or default_convert_dtype(args)
    tok = _checked_tokenizer(source, tokenizer)
    plan = plan_quantization(source.shapes(), default_bits, group_size, recipe, method) if default_bits else None
    calibration = _calibration(source, calibration_text, tok, plan)

    with installing(target, force, "mlx_path") as tmp:
        # a source reads each tensor once: calibration and the quality check open their own
        scratch = (lambda: open_sources(references, preset, config))
        report = (_write_model(source, tmp, out_dtype, plan, max_bytes, progress, _importance(scratch, plan))
                  if calibration is None else
                  _write_calibrated(source, scratch(), calibration, tmp, out_dtype, plan, max_bytes, progress))
        report.output, report.bits, report.recipe = str(target), default_bits, recipe
        report.method = method if plan else None
        _finish_folder(tmp, report, source, out_dtype, plan, tok,
                       open_sources(references, preset, config) if evaluate else None)
    report.seconds = time.perf_counter() - start
    report.peak_memory_mb = peak_memory_mb()
    return report


def _stage(source: Source, progress: Optional[Progress]) -> Optional[Callable[[int, int], None]]:
    """Calibration's layer-by-layer progress, told through `progress` before any tensor is converted."""
    if progress is None:
        return None
    names, shapes = source.names(), source.shapes()
    total = sum(math.prod(shapes[n]) for n in names)
    return lambda done, layers: progress(ConvertProgress(0, len(names), 0, total,
                                                         f"calibrating: layer {done}/{layers}"))


def _finish_folder(folder: Path, report: ConvertReport, source: Source, dtype: mx.Dtype,
                   plan: Optional[QuantizationPlan], tokenizer: Optional[Tokenizer], reference: Optional[Source]
                   ) -> None:
    """Everything after the weights: tokenizer files, the source's generation_config.json, the quality
    check against `reference` (None: skipped), and config.json last."""
    args = source.args
    generation = Path(source.path) / GENERATION_CONFIG
    if generation.is_file():
        shutil.copyfile(generation, folder / GENERATION_CONFIG)
    if tokenizer is not None:
        copy_tokenizer(folder, tokenizer)
        # so transformers and mlx-lm open it too
        write_tokenizer_files(folder, args.max_context_length, tokenizer.bos_id, tokenizer.eos_id)
        report.tokenizer = str(tokenizer.path)
    out_config = model_config(args, dtype, plan.quantization if plan else None, source.architectures)
    if reference is not None:
        _evaluate(report, reference, folder, out_config)
    write_config(folder, out_config)


def _importance(scratch: Callable[[], Source], plan: Optional[QuantizationPlan]) -> dict[str, mx.array]:
    """The data-free importance of input columns (from the RMSNorm weights and qkv_proj, proj_1; read from a
    `scratch()` source) for the optimal method; none for min/max or no quantization."""
    if plan is None or (plan.quantization.method or DEFAULT_METHOD) != "optimal":
        return {}
    source = scratch()
    return data_free_importance(source.args, source.get)


def _write_calibrated(source: Source, scratch: Source, calibration: CalibrationText, folder: Path,
                      dtype: mx.Dtype, plan: QuantizationPlan, max_bytes: int, progress: Optional[Progress]
                      ) -> ConvertReport:
    """`_write_model` with calibration's per-channel scales (found running `scratch`) folded in."""
    found = calibrate(scratch, plan, calibration.tokens, dtype, progress=_stage(source, progress))
    plan.quantization = replace(plan.quantization, calibration=calibration.config_entry())
    importance = found.importance if (plan.quantization.method or DEFAULT_METHOD) == "optimal" else {}
    report = _write_model(FoldedSource(source, found.scales), folder, dtype, plan, max_bytes, progress, importance)
    report.inputs = [str(s.path) for s in leaves(source)]
    report.calibration = {**calibration.config_entry(), "folded_layers": len(found.scales)}
    return report


def _calibration(source: Source, path, tokenizer: Optional[Tokenizer], plan: Optional[QuantizationPlan]
                 ) -> Optional[CalibrationText]:
    """The tokenized calibration text, refused (before any work) when it or its prerequisites are missing."""
    if path is None:
        return None
    if plan is None:
        raise ConfigError(f"{CALIBRATION_OPTION}: calibration only applies when quantizing (`bits` or `recipe`)")
    if tokenizer is None:
        raise TokenizerError(f"{CALIBRATION_OPTION}: {source.path} has no tokenizer.model or tokenizer.json "
                             "to tokenize the text; pass `tokenizer`")
    return calibration_text(path, tokenizer, source.args)


def _checked_tokenizer(source: Source, tokenizer) -> Optional[Tokenizer]:
    """The tokenizer to copy (given, else the input's), refused before any work if the output could not use it.
    A tokenizer.json takes BOS/EOS from the model's config, as loading the output will."""
    path = source.tokenizer if tokenizer is None else resolve_tokenizer(None, tokenizer)
    if path is None:
        return None
    tok = Tokenizer(path, bos_id=source.args.bos_token_id, eos_id=source.args.eos_token_id)
    check_tokenizer_fits(tok, source.args.vocab_size)
    return tok


def default_convert_dtype(args: ModelArgs) -> mx.Dtype:
    """float16, except for models that overflow it (3B-class: model_dim >= 3072): bfloat16."""
    return mx.float16 if fp16_is_safe(args) else mx.bfloat16


def _references(hf_path, average: Sequence) -> list:
    if isinstance(average, (str, bytes, Path)):  # its characters would be read as paths ('/' among them)
        raise TypeError(f"average must be a list of checkpoints, got {type(average).__name__}")
    if hf_path is not None and average:
        raise ConfigError("give either `hf_path` or `average`, not both")
    if hf_path is None and not average:
        raise ConfigError("nothing to convert: give `hf_path` (or `average`: several checkpoints)")
    if average and len(average) < 2:
        raise ConfigError("average: needs at least two checkpoints")
    return [hf_path] if hf_path is not None else list(average)


def open_sources(references: Sequence, preset: Optional[str], config) -> Source:
    """One input, or the average of several."""
    sources = [open_source(r, preset, config) for r in references]
    return sources[0] if len(sources) == 1 else AveragedSource(sources)


def _is_within(path: Path, other: Path) -> bool:
    try:
        path.resolve().relative_to(other.resolve())
        return True
    except ValueError:
        return False


def _check_inputs(source: Source, target: Path, force: bool, dequantize: bool, bits: Optional[int]) -> None:
    """Refuse what cannot work before anything is written."""
    inputs = [s.path for s in leaves(source)]
    for path in inputs:
        if _is_within(target, path) or _is_within(path, target):
            raise ConfigError(f"mlx_path: {target} overlaps the input {path}; choose another output folder")
    quantized_inputs = [s.path for s in leaves(source) if getattr(s, "quantization", None)]
    if dequantize and not quantized_inputs:
        raise ConfigError(f"dequantize: {inputs[0]} is not a quantized model")
    if quantized_inputs and not dequantize:
        raise ConfigError(
            f"{quantized_inputs[0]} holds a quantized model: pass `dequantize=True` to write it back in float "
            "(to quantize differently, convert the original checkpoint: re-quantizing compounds the error)"
        )
    if dequantize and bits is not None:
        raise ConfigError("dequantize: writes float weights; it cannot be combined with `bits` or `recipe`")
    if (target.exists() or target.is_symlink()) and not force:
        raise ConfigError(f"mlx_path: {target} already exists; pass `force=True` to replace it")
    check_replaceable(target, "mlx_path")


def _write_model(source: Source, folder: Path, dtype: mx.Dtype, plan: Optional[QuantizationPlan],
                 max_bytes: int, progress: Optional[Progress], importance: Mapping[str, mx.array]) -> ConvertReport:
    """Convert every tensor into shards in `folder` (`importance`: of each weight's input columns,
    by name); the report of what was written."""
    writer = ShardWriter(folder, max_bytes, metadata={"format": "mlx"})
    names = source.names()
    shapes = source.shapes()
    sizes = [math.prod(shapes[name]) for name in names]
    total, done = sum(sizes), 0
    worst, worst_name, stored_bits = 0.0, "", 0
    for i, name in enumerate(names):
        if progress is not None:
            progress(ConvertProgress(i, len(names), done, total, name))
        tensors, rel = convert_tensor(name, source.get(name), dtype, plan, str(source.path), importance.get(name))
        if rel >= worst:
            worst, worst_name = rel, name
        stored_bits += sum(a.nbytes for a in tensors.values()) * 8
        writer.add(tensors)
        del tensors
        done += sizes[i]
    if progress is not None:
        progress(ConvertProgress(len(names), len(names), total, total, ""))
    files = writer.finish()
    parameters = source.args.num_parameters()
    return ConvertReport(
        output="", inputs=[str(s.path) for s in leaves(source)], source_kind=source.kind,
        dtype=DTYPE_NAMES[dtype], bits=None, group_size=plan.quantization.group_size if plan else None,
        recipe=None, parameters=parameters, bits_per_weight=stored_bits / parameters,
        size_bytes=sum(f.stat().st_size for f in files), shards=len(files), layer_bits=layer_bits(plan),
        skipped_layers=dict(plan.skipped) if plan else {}, max_rel_error=worst, max_rel_error_tensor=worst_name,
    )


def _evaluate(report: ConvertReport, reference: Source, folder: Path, config: dict) -> None:
    """The output against the float input on a fixed token sequence: KL and top-1 agreement."""
    tokens = eval_tokens(reference.args)
    ref = reference_logits(reference, tokens)
    out = model_logits(folder, tokens, config)
    kl = kl_divergence(ref, out)
    report.kl_mean, report.kl_max = float(kl.mean()), float(kl.max())
    report.top1_agreement = float((ref.argmax(-1) == out.argmax(-1)).mean())
    report.eval_tokens = len(tokens)
