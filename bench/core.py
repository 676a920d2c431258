"""The measuring engine of `mlx-openelm bench`.

- `random_model` builds the exact OpenELM architecture with random weights in memory
  (throughput does not depend on weight values), `quantize` quantizes it in place.
- `naive_rmsnorm` swaps the fused `mx.fast.rms_norm` for separate square / mean /
  rsqrt / multiply ops (the paper's slow baseline, Table 8) and back.
- `OursEngine` / `MlxLmEngine` run greedy generation through each runtime's own
  `generate_step`; `run_trial` times one generation; `bytes_per_token` gives the
  bytes of weights and KV cache read for each generated token.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_openelm.config import ModelArgs
from mlx_openelm.generation import generate_step
from mlx_openelm.quantization import Quantization, apply_quantization, check_bits, check_group_size
from mlx_openelm.model import Model, make_cache
from mlx_openelm.sampling import greedy
from mlx_openelm.speculative import SpeculativeOptions

MLX_LM_HINT = "mlx-lm is not installed; install it with: pip install 'mlx-openelm[compare]'  (or: pip install mlx-lm)"


# ---- models -----------------------------------------------------------------------

def random_model(args: ModelArgs, dtype: mx.Dtype, seed: int = 0) -> Model:
    """`Model(args)` with small random weights in `dtype`: N(0, 1/fan_in) matrices, unit norms.

    Each parameter is drawn and evaluated on its own (with a key split from `seed`),
    so no full-model float32 copy or numpy array is ever built.
    """
    model = Model(args)
    key = mx.random.key(seed)
    new = []
    for name, param in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        if param.ndim == 1:  # RMSNorm weights
            value = mx.ones(param.shape, dtype=dtype)
        else:
            value = (mx.random.normal(param.shape, dtype=dtype, key=sub) * (param.shape[-1] ** -0.5)).astype(dtype)
        mx.eval(value)
        new.append((name, value))
    model.load_weights(new, strict=True)
    model.eval()
    return model


def quantize(model: nn.Module, bits: int, group_size: int) -> None:
    """Quantize every Linear and Embedding (the tied head included) in place."""
    apply_quantization(model, Quantization(check_bits(bits, "--bits"), check_group_size(group_size, "--group-size")))
    mx.eval(model.parameters())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters (quantized: weights + scales + biases). The tied
    embedding is stored once and read once per token, as the output head."""
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def kv_bytes_per_position(args: ModelArgs, dtype: mx.Dtype) -> int:
    """Bytes of keys and values cached per token, over all layers."""
    return sum(2 * kv * args.head_dim for kv in args.num_kv_heads) * dtype.size


def bytes_per_token(
    model: nn.Module, args: ModelArgs, dtype: mx.Dtype, prompt_tokens: int, generation_tokens: int
) -> int:
    """Bytes read per generated token: every weight once, plus the KV cache at the
    average context length of the generation phase."""
    average_context = prompt_tokens + generation_tokens / 2
    return int(parameter_bytes(model) + kv_bytes_per_position(args, dtype) * average_context)


# ---- the RMSNorm ablation -------------------------------------------------------------

class NaiveRMSNorm(nn.Module):
    """RMSNorm as separate ops (square, mean, rsqrt, two multiplies), like the paper's
    naive baseline and Hugging Face's OpenELM code: computed in float32, cast back,
    then scaled by the weight. Numerically the same as `nn.RMSNorm`."""

    def __init__(self, weight: mx.array, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        x32 = x.astype(mx.float32)
        mean_square = mx.mean(mx.square(x32), axis=-1, keepdims=True)
        normed = (x32 * mx.rsqrt(mean_square + self.eps)).astype(x.dtype)
        return normed * self.weight


def _rmsnorm_sites(model: nn.Module) -> list[tuple[object, object, nn.Module]]:
    """(parent, key, module) for every RMSNorm (fused or naive) in the model."""
    sites = []

    def visit(node):
        if isinstance(node, nn.Module):
            items = node.children().items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        elif isinstance(node, dict):
            items = node.items()
        else:
            return
        for key, child in items:
            if isinstance(child, (nn.RMSNorm, NaiveRMSNorm)):
                sites.append((node, key, child))
            else:
                visit(child)

    visit(model)
    return sites


def _set(parent, key, value):
    if isinstance(parent, nn.Module):
        setattr(parent, key, value)
    else:
        parent[key] = value


@contextmanager
def naive_rmsnorm(model: nn.Module) -> Iterator[int]:
    """Within the block, every `nn.RMSNorm` of `model` is a `NaiveRMSNorm` sharing its
    weight; yields how many were swapped. Restores the fused ones afterwards."""
    sites = [s for s in _rmsnorm_sites(model) if isinstance(s[2], nn.RMSNorm)]
    for parent, key, norm in sites:
        _set(parent, key, NaiveRMSNorm(norm.weight, norm.eps))
    try:
        yield len(sites)
    finally:
        for parent, key, norm in sites:
            _set(parent, key, norm)


# ---- engines ------------------------------------------------------------------------

class Engine:
    """Something that generates greedily: `tokens(prompt, n)` yields n token ids."""

    name: str = "?"
    variant: str = ""

    def tokens(self, prompt: mx.array, n: int) -> Iterator[int]:
        raise NotImplementedError

    def trial_stats(self) -> dict:
        """Engine-specific figures of the last generation (speculative decoding: acceptance)."""
        return {}

    @contextmanager
    def active(self):
        yield


class OursEngine(Engine):
    name = "mlx-openelm"

    def __init__(self, model: Model, rmsnorm: str = "fused"):
        self.model = model
        self.rmsnorm = rmsnorm
        self.variant = "" if rmsnorm == "fused" else "naive-rmsnorm"

    @contextmanager
    def active(self):
        if self.rmsnorm == "naive":
            with naive_rmsnorm(self.model):
                yield
        else:
            yield

    def tokens(self, prompt: mx.array, n: int) -> Iterator[int]:
        # generate_step never stops on EOS: it yields exactly n tokens (context permitting).
        for step in generate_step(prompt, self.model, max_tokens=n, sampler=greedy, cache=make_cache(self.model)):
            yield step.token


class SpeculativeEngine(OursEngine):
    """Our `generate_step` with a draft model or prompt lookup; records the acceptance of each trial."""

    def __init__(self, model: Model, options: SpeculativeOptions, draft_label: str = ""):
        super().__init__(model)
        self.options = options.for_target(model)  # the draft checked once, not in every trial
        self.variant = (f"draft {draft_label} k={options.num_draft_tokens}" if options.draft_model is not None
                        else f"lookup {options.prompt_lookup}")
        self.last: Optional[tuple] = None

    def tokens(self, prompt: mx.array, n: int) -> Iterator[int]:
        steps = generate_step(prompt, self.model, max_tokens=n, sampler=greedy, cache=make_cache(self.model),
                              speculative=self.options)
        for count, step in enumerate(steps, start=1):
            self.last = (count, step)
            yield step.token

    def trial_stats(self) -> dict:
        count, last = self.last
        return {
            "drafted_tokens": last.drafted_tokens,
            "accepted_tokens": last.accepted_tokens,
            "acceptance_rate": last.accepted_tokens / last.drafted_tokens if last.drafted_tokens else None,
            "target_passes_per_token": last.target_forward_passes / count,
        }


def import_mlx_lm():
    """mlx-lm's OpenELM model module and generate_step, or an ImportError with the fix."""
    try:
        from mlx_lm.generate import generate_step as lm_generate_step
        from mlx_lm.models import openelm as lm_openelm
        from mlx_lm.models.cache import make_prompt_cache
    except ImportError as e:
        raise ImportError(MLX_LM_HINT) from e
    return lm_openelm, lm_generate_step, make_prompt_cache


def mlx_lm_model(model: Model):
    """mlx-lm's OpenELM with the same architecture and the very same arrays as `model`.

    Modules quantized in `model` are quantized (same bits and group size) in mlx-lm's
    model before `model`'s arrays are loaded into it, so both hold identical weights,
    shared rather than copied. Module names match (`transformer.*`, `lm_head`), so
    the load is strict.
    """
    lm_openelm, _, _ = import_mlx_lm()
    config = model.args.to_dict()
    lm = lm_openelm.Model(lm_openelm.ModelArgs.from_dict(config))
    specs = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            specs[path] = {"bits": module.bits, "group_size": module.group_size}
    if specs:
        nn.quantize(lm, class_predicate=lambda path, m: specs.get(path, False))
    lm.load_weights(tree_flatten(model.parameters()), strict=True)
    lm.eval()
    return lm


class MlxLmEngine(Engine):
    name = "mlx-lm"

    def __init__(self, model):
        _, self._generate_step, self._make_cache = import_mlx_lm()
        self.model = model

    def tokens(self, prompt: mx.array, n: int) -> Iterator[int]:
        steps = self._generate_step(
            prompt, self.model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1),
            prompt_cache=self._make_cache(self.model),
        )
        for token, _ in steps:
            yield int(token)


# ---- measuring ----------------------------------------------------------------------

@dataclass
class Trial:
    prompt_tokens: int
    generation_tokens: int
    ttft_s: float  # prompt through the first generated token
    generation_s: float  # after the first token, through the last
    peak_memory_gb: float
    extra: Optional[dict] = None  # the engine's own figures (speculative decoding: acceptance)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s

    @property
    def generation_tps(self) -> float:
        return (self.generation_tokens - 1) / self.generation_s if self.generation_tokens > 1 else math.nan

    @property
    def total_tps(self) -> float:
        return (self.prompt_tokens + self.generation_tokens) / (self.ttft_s + self.generation_s)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "ttft_s": self.ttft_s,
            "generation_s": self.generation_s,
            "prompt_tps": self.prompt_tps,
            "generation_tps": self.generation_tps,
            "total_tps": self.total_tps,
            "peak_memory_gb": self.peak_memory_gb,
            **(self.extra or {}),
        }


def run_trial(engine: Engine, prompt: mx.array, generation_tokens: int,
              on_token: Optional[Callable[[int], None]] = None) -> Trial:
    """One timed generation from a fresh cache: time to the first token, then the rest."""
    mx.clear_cache()
    mx.reset_peak_memory()
    with engine.active():
        n = 0
        tic = first = time.perf_counter()
        for _ in engine.tokens(prompt, generation_tokens):
            n += 1
            if n == 1:
                first = time.perf_counter()
            if on_token is not None:
                on_token(n)
        end = time.perf_counter()
    if n != generation_tokens:
        raise RuntimeError(f"{engine.name} generated {n} tokens, expected {generation_tokens}")
    return Trial(
        prompt_tokens=int(prompt.size),
        generation_tokens=n,
        ttft_s=first - tic,
        generation_s=end - first,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        extra=engine.trial_stats(),
    )


def summarize(values: Sequence[float]) -> dict:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean)}


def make_prompt(vocab_size: int, length: int, seed: int) -> mx.array:
    """`length` token ids drawn uniformly from the vocabulary (ids 3.. skip unk/BOS/EOS)."""
    low = 3 if vocab_size > 3 else 0
    return mx.random.randint(low, vocab_size, (length,), key=mx.random.key(seed)).astype(mx.uint32)
