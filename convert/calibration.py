"""Activation-aware calibration (in the spirit of AWQ), folded so the float model is unchanged.

Each decoder layer's qkv_proj reads attn_norm's output and proj_1 reads ffn_norm's. An
RMSNorm's output is x_hat * g, so scaling the linear's input columns by s and dividing g
by s computes the same function in float (W (x_hat g) = (W s)(x_hat g / s)), while the
quantizer now sees W s: input channels that carry large activations get a larger share
of each group's range. For each such pair we try s = mean|x|**alpha for a few alphas and
keep the one whose quantized linear reproduces the float output best on the calibration
activations; alpha = 0 (s = 1, the uncalibrated weights) is always a candidate and wins
ties, so a pair changes only where scaling measurably helps. The q/k norms, out_proj,
proj_2 and the embedding/head have no preceding per-channel scale to fold into.

The same run measures every quantized linear's input (and the head's: the final norm's output)
and gives the optimal quantizer its importance, the mean square of each input channel
(`importance.py`), in place of the data-free estimate (see docs/quantization.md for what each part gains).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import ConfigError
from mlx_openelm.model import Model
from mlx_openelm.quantization import DEFAULT_METHOD, MODE, QuantizationPlan
from mlx_openelm.tokenizer import Tokenizer

from .importance import NORM_INPUTS, head_weight_name, normalised
from .quality import load_module
from mlx_openelm.quantizers import quantize
from .sources import Source

OPTION = "calibration_text"
MAX_TOKENS = 512  # enough for per-channel means; keeps calibration to seconds on 270M
ERROR_ROWS = 256  # activation rows the output error is measured on
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# (norm, linear reading its output) within a decoder layer
FOLDS = NORM_INPUTS
RECORDED = ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")  # each layer's linears


@dataclass(frozen=True)
class CalibrationText:
    """The calibration text's file name and its tokens (BOS first, at most MAX_TOKENS)."""

    name: str
    tokens: list[int]

    def config_entry(self) -> dict:
        return {"text": self.name, "tokens": len(self.tokens)}


def read_calibration_text(path: Union[str, Path]) -> str:
    """The text of `path`; a one-line ConfigError naming the option and file if it is not
    readable, non-empty UTF-8 text."""
    where = f"{OPTION}: {path}"
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{where}: a folder, not a text file")
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):  # /dev/zero would never end
            raise ConfigError(f"{where}: a device, not a text file")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{where}: permission denied") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read ({e.strerror or e})") from None
    if not text.strip():
        raise ConfigError(f"{where}: the file is empty")
    return text


def calibration_text(path: Union[str, Path], tokenizer: Tokenizer, args: ModelArgs,
                     max_tokens: int = MAX_TOKENS) -> CalibrationText:
    """Read and tokenize the calibration text, keeping its first `max_tokens` tokens."""
    text = read_calibration_text(path)
    tokens = tokenizer.encode(text)[: min(max_tokens, args.max_context_length)]
    return CalibrationText(Path(path).name, tokens)


class _Recorder:
    """Stands in for a Linear, keeping the input it was called with."""

    def __init__(self, linear):
        self.linear = linear
        self.input: Optional[mx.array] = None

    def __call__(self, x: mx.array) -> mx.array:
        self.input = x
        return self.linear(x)


@dataclass
class Calibration:
    """What calibration found: the per-channel `scales` folded into norm/linear pairs (by linear
    path, only where some alpha > 0 won) and the measured `importance` of every quantized weight's
    input columns (mean square activation, divided by s**2 where s is folded in; by weight name)."""

    scales: dict[str, mx.array]
    importance: dict[str, mx.array]


def calibrate(
    source: Source, plan: QuantizationPlan, tokens: Sequence[int], dtype: mx.Dtype,
    alphas: Optional[Sequence[float]] = None, progress: Optional[Callable[[int, int], None]] = None,
) -> Calibration:
    """Scales to fold and importances, from the float model (float32) run one layer at a time over
    `tokens`, as the quality check does. `alphas` defaults to ALPHAS; `progress(done, total)` is
    called after each layer."""
    alphas = ALPHAS if alphas is None else alphas
    model = Model(source.args)
    load_module(model.transformer.token_embeddings, "transformer.token_embeddings.", source.get)
    h = model.embed(mx.array([list(tokens)]))
    found = Calibration({}, {})
    for i, layer in enumerate(model.layers):
        skeleton = layer.parameters()
        load_module(layer, f"transformer.layers.{i}.", source.get)
        recorders = {}
        for linear_name in RECORDED:
            parent, attr = linear_name.split(".")
            recorders[linear_name] = _Recorder(getattr(layer, parent)[attr])
            getattr(layer, parent)[attr] = recorders[linear_name]
        h = model.run_layer(i, h)
        mx.eval(h)
        for linear_name, recorder in recorders.items():
            parent, attr = linear_name.split(".")
            getattr(layer, parent)[attr] = recorder.linear
            _calibrate_linear(found, f"transformer.layers.{i}.{linear_name}", layer, recorder, plan, dtype, alphas)
        layer.update(skeleton)  # release this layer's weights
        if progress is not None:
            progress(i + 1, len(model.layers))
    load_module(model.transformer.norm, "transformer.norm.", source.get)
    found.importance[head_weight_name(source.args)] = mean_square(model.transformer.norm(h)[0])
    return found


def _calibrate_linear(found: Calibration, path: str, layer, recorder: "_Recorder", plan: QuantizationPlan,
                      dtype: mx.Dtype, alphas: Sequence[float]) -> None:
    spec = plan.spec(path)
    if spec is None:
        return
    x = recorder.input[0]
    importance = mean_square(x)
    linear_name = path.split(".", 3)[3]
    norm_name = dict((lin, nrm) for nrm, lin in FOLDS).get(linear_name)
    if norm_name is not None:
        s = best_scale(recorder.linear.weight, x, spec, plan.quantization.method, dtype, alphas,
                       getattr(layer, norm_name).weight)
        if s is not None:
            found.scales[path] = s
            importance = importance / mx.square(s)  # W s reads x / s
    found.importance[f"{path}.weight"] = normalised(importance)


def mean_square(x: mx.array) -> mx.array:
    """Mean of x**2 per channel (last axis) over the other axes, float32."""
    x = x.astype(mx.float32).reshape(-1, x.shape[-1])
    return mx.mean(mx.square(x), axis=0)


def best_scale(weight: mx.array, x: mx.array, spec: tuple[int, int], method: Optional[str], dtype: mx.Dtype,
               alphas: Sequence[float], norm: Optional[mx.array] = None) -> Optional[mx.array]:
    """The per-input-channel scale s (from mean|x|**alpha, alpha in `alphas`) whose quantized
    W s, divided back by s, best reproduces x W^T; None when no scaling beats s = 1.
    A candidate that would take the folded `norm` weight beyond `dtype`'s range is skipped."""
    bits, group_size = spec
    stat = mx.mean(mx.abs(x.astype(mx.float32)), axis=0)
    square_mean = mean_square(x)
    picks = np.linspace(0, x.shape[0] - 1, min(ERROR_ROWS, x.shape[0])).astype(np.int32)
    # the error matmuls in numpy: MLX's CPU matmul is ~20x slower here and they dominate the search
    rows = np.array(x[mx.array(picks)].astype(mx.float32))
    weight_np = np.array(weight.astype(mx.float32))
    best_error, best = float("inf"), None
    for alpha in alphas:
        s = None if alpha == 0 else _scale(stat, alpha)
        if s is not None and norm is not None and not mx.isfinite(fold_norm(norm, s).astype(dtype)).all().item():
            continue
        scaled = weight if s is None else fold_linear(weight, s)
        wq, q_scales, q_biases = quantize(scaled, bits, group_size, method or DEFAULT_METHOD, dtype,
                                          normalised(square_mean if s is None else square_mean / mx.square(s)))
        approx = mx.dequantize(wq, q_scales.astype(mx.float32), q_biases.astype(mx.float32),
                               group_size=group_size, bits=bits, mode=MODE)
        if s is not None:
            approx = approx / s
        error = float(np.square(rows @ (weight_np - np.array(approx)).T, dtype=np.float64).sum())
        if error < best_error:
            best_error, best = error, s
    return best


def _scale(stat: mx.array, alpha: float) -> mx.array:
    """stat**alpha normalised to a geometric mean of max and min of 1 (AWQ's normalisation)."""
    s = mx.power(mx.maximum(stat, 1e-6 * mx.max(stat) + 1e-30), alpha)
    return s / mx.sqrt(mx.max(s) * mx.min(s))


def fold_linear(weight: mx.array, s: mx.array) -> mx.array:
    """The linear's weight with its input columns multiplied by s."""
    return weight.astype(mx.float32) * s


def fold_norm(weight: mx.array, s: mx.array) -> mx.array:
    """The preceding RMSNorm's weight divided by s."""
    return weight.astype(mx.float32) / s


def folded_tensors(scales: dict[str, mx.array]) -> dict[str, Callable[[mx.array], mx.array]]:
    """Tensor name -> how to transform it as read from the source, for these scales."""
    transforms = {}
    for path, s in scales.items():
        prefix, linear_name = path.rsplit(".", 2)[0], ".".join(path.rsplit(".", 2)[1:])
        norm = dict((lin, nrm) for nrm, lin in FOLDS)[linear_name]
        transforms[f"{path}.weight"] = lambda w, s=s: fold_linear(w, s)
        transforms[f"{prefix}.{norm}.weight"] = lambda w, s=s: fold_norm(w, s)
    return transforms


class FoldedSource(Source):
    """A source whose norm and linear weights are read with the calibration scales folded in."""

    def __init__(self, source: Source, scales: dict[str, mx.array]):
        self.source = source
        self.path, self.args, self.kind, self.tokenizer = source.path, source.args, source.kind, source.tokenizer
        self.transforms = folded_tensors(scales)

    def names(self) -> list[str]:
        return self.source.names()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.source.shapes()

    def get(self, name: str) -> Union[np.ndarray, mx.array]:
        weight = self.source.get(name)
        transform = self.transforms.get(name)
        if transform is None:
            return weight
        if not isinstance(weight, mx.array):
            weight = mx.array(np.asarray(weight, dtype=np.float32))
        return transform(weight)
