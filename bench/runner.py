"""Running a benchmark sweep: sources x bits x prompt/generation lengths x engines.

A library: `run_benchmark(BenchSettings(...), progress=...)` returns the result
document (machine, settings, rows, ratios, notes); `bench/cli.py` formats it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_openelm import __version__
from mlx_openelm.config import ModelArgs, preset_args
from mlx_openelm.errors import ConfigError
from mlx_openelm.folder.names import CONFIG_FILE
from mlx_openelm.loading import DTYPE_NAMES, default_dtype, load_model, model_dtype, parse_dtype
from mlx_openelm.model import Model
from mlx_openelm.quantization import BITS, plan_quantization
from mlx_openelm.speculative import SpeculativeOptions

from . import core
from .hardware import machine_info
from .settings import BenchSettings, Progress

METRICS = ("prompt_tps", "generation_tps", "total_tps", "peak_memory_gb", "ttft_s", "generation_s")
SPECULATIVE_METRICS = ("acceptance_rate", "target_passes_per_token")


def check_group_size(args: ModelArgs, group_size: int, label: str) -> None:
    """The bench quantizes every matrix: the quantization policy must keep none in float
    (an input width that is not a multiple of the group size)."""
    shapes = {name: p.shape for name, p in tree_flatten(Model(args).parameters())}  # lazy: nothing computed
    skipped = plan_quantization(shapes, BITS[0], group_size).skipped
    if skipped:
        raise ConfigError(
            f"{label}: input widths {sorted(set(skipped.values()))} are not multiples of {group_size}; "
            "pick another --group-size"
        )


class Source:
    """One model to benchmark. `model(bits)` builds it afresh each time (random weights
    are seeded, so identical), so no float copy outlives its configuration and the
    peak memory of a quantized run holds only the quantized weights."""

    def __init__(self, ref: str, kind: str, dtype_name: Optional[str], seed: int):
        self.ref, self.kind, self.seed = ref, kind, seed
        self.requested = parse_dtype(dtype_name, "--dtype")
        self.stored_quantization = None
        if kind == "preset":
            if Path(ref).is_file():
                self.args = ModelArgs.from_file(ref)
                self.label = Path(ref).parent.name if Path(ref).name == CONFIG_FILE else Path(ref).stem
            else:
                self.args = preset_args(ref)
                self.label = ref
            self.dtype = self.requested or default_dtype(self.args)
        else:
            from mlx_openelm.config import read_config
            from mlx_openelm.hub import resolve_model_path

            self.folder = resolve_model_path(ref)
            config = read_config(Path(self.folder) / CONFIG_FILE)
            self.args = ModelArgs.from_dict(config, source=str(Path(self.folder) / CONFIG_FILE))
            self.stored_quantization = config.get("quantization")
            self.label = Path(self.folder).name
            self.dtype = None  # known once loaded

    def model(self, bits: Optional[int], group_size: int) -> Model:
        if self.kind == "preset":
            model = core.random_model(self.args, self.dtype, seed=self.seed)
        else:
            model = load_model(self.folder, dtype=self.requested)
            self.dtype = model_dtype(model)
        if bits is not None and not self.stored_quantization:
            core.quantize(model, bits, group_size)
        mx.eval(model.parameters())
        return model


def _dtype_notes(source: Source, bits: Optional[int], notes: list) -> None:
    dtype = DTYPE_NAMES[source.dtype]
    if bits is None and not source.stored_quantization and source.dtype == mx.float32:
        note = (f"{source.label}: --bits 16 ran unquantized in float32 (the compute dtype here); "
                "pass --dtype float16 or bfloat16 for 16-bit weights")
    elif mx.default_device() == mx.cpu and source.dtype != mx.float32:
        note = (f"{source.label}: {dtype} on MLX's CPU backend is emulated and slow (quantized matmuls "
                "with half activations especially); float32 is the CPU default")
    else:
        return
    if note not in notes:
        notes.append(note)


def _engines(model: Model, settings: BenchSettings, draft: Optional[tuple]) -> list:
    ablation, compare = settings.ablation, settings.compare
    if settings.speculative:
        draft_model, label = draft or (None, "")
        options = SpeculativeOptions(draft_model, settings.num_draft_tokens, settings.prompt_lookup)
        spec = core.SpeculativeEngine(model, options, label)
        return [spec, core.OursEngine(model)]
    if ablation == "rmsnorm":
        return [core.OursEngine(model, "fused"), core.OursEngine(model, "naive")]
    engines = [core.OursEngine(model)]
    if compare == "mlx-lm":
        engines.append(core.MlxLmEngine(core.mlx_lm_model(model)))
    return engines


def _row(engine, source: Source, bits: Optional[int], group_size: int, model: Model, trials: list, peak_bw) -> dict:
    quantized = bits is not None
    row = {
        "engine": engine.name,
        "variant": engine.variant,
        "model": source.label,
        "source": source.kind,
        "bits": bits,
        "group_size": group_size if quantized else None,
        "quantized": quantized,
        "dtype": DTYPE_NAMES[source.dtype],
        "prompt_tokens": trials[0].prompt_tokens,
        "generation_tokens": trials[0].generation_tokens,
        "num_trials": len(trials),
    }
    for key in SPECULATIVE_METRICS if trials[0].extra else ():
        row[key] = core.summarize([t.extra[key] for t in trials if t.extra[key] is not None])["median"]
    for key in METRICS:
        stats = core.summarize([getattr(t, key) for t in trials])
        row[key] = stats["median"]
        row[f"{key}_min"] = stats["min"]
        row[f"{key}_max"] = stats["max"]
    per_token = core.bytes_per_token(model, source.args, source.dtype, row["prompt_tokens"], row["generation_tokens"])
    row["weight_bytes"] = core.parameter_bytes(model)
    row["bytes_per_token"] = per_token
    row["bandwidth_gbs"] = per_token * row["generation_tps"] / 1e9 if row["generation_tps"] else None
    row["peak_bandwidth_gbs"] = peak_bw
    row["bandwidth_share"] = row["bandwidth_gbs"] / peak_bw if peak_bw and row["bandwidth_gbs"] else None
    row["trials"] = []
    for t in trials:
        values = t.as_dict()
        gen = values["generation_tps"]
        values["bandwidth_gbs"] = per_token * gen / 1e9 if gen and not math.isnan(gen) else None
        row["trials"].append(values)
    return row


def _bits_to_run(source: Source, settings: BenchSettings) -> tuple[list[Optional[int]], int]:
    """The bit widths and group size to measure `source` at; checks that they apply."""
    stored = source.stored_quantization
    if stored:
        stored_bits = int(stored.get("bits", 0))
        if settings.bits is not None and settings.bits != [stored_bits]:
            raise ConfigError(
                f"{source.ref} is stored {stored_bits}-bit; benchmark it as stored (omit --bits) or use an "
                f"unquantized checkpoint to sweep bit widths")
        return [stored_bits], int(stored.get("group_size", settings.group_size))
    bits_list = settings.bits or [None]
    if any(b is not None for b in bits_list):
        check_group_size(source.args, settings.group_size, source.label)
    return bits_list, settings.group_size


def _check_lengths(source: Source, lengths: list[tuple[int, int]]) -> None:
    for prompt_len, gen_len in lengths:
        if prompt_len + gen_len - 1 > source.args.max_context_length:
            raise ConfigError(
                f"--prompt-tokens/--generation-tokens: {prompt_len} prompt + {gen_len} generated tokens exceed "
                f"{source.label}'s context of {source.args.max_context_length} tokens")


def engine_label(engine) -> str:
    return f"{engine.name}{' ' + engine.variant if engine.variant else ''}"


def _measure(engines: list, prompt: mx.array, gen_len: int, name: str, settings: BenchSettings,
             progress: Progress) -> dict:
    """Warm-up, then the trials of every engine interleaved (A B A B); trials per engine."""
    if settings.warmup:
        for engine in engines:
            progress.message(f"{name} {engine_label(engine)}: warm-up")
            core.run_trial(engine, prompt, min(gen_len, settings.warmup_tokens))
    results = {id(e): [] for e in engines}
    for t in range(settings.trials):
        for engine in engines:
            label = f"{name} {engine_label(engine)} trial {t + 1}/{settings.trials}"
            trial = core.run_trial(engine, prompt, gen_len,
                                   on_token=lambda n, label=label: progress.tokens(label, n, gen_len))
            results[id(engine)].append(trial)
            progress.message(f"{label}: prompt {trial.prompt_tps:.1f} tok/s, "
                             f"generation {trial.generation_tps:.1f} tok/s, peak {trial.peak_memory_gb:.2f} GB")
    return results


def _ratio(a: dict, b: dict) -> dict:
    entry = {key: a[key] for key in ("model", "bits", "group_size", "quantized", "dtype", "prompt_tokens",
                                     "generation_tokens")}
    entry["numerator"], entry["denominator"] = core_label(a), core_label(b)
    for key in ("prompt_tps", "generation_tps", "total_tps", "peak_memory_gb"):
        entry[key] = a[key] / b[key] if a.get(key) and b.get(key) else None
    entry.update({key: a[key] for key in SPECULATIVE_METRICS if key in a})
    return entry


def _draft(settings: BenchSettings, progress: Progress) -> Optional[tuple[Model, str]]:
    """The draft model (built once, for every source) and its label, or None."""
    ref, kind = (settings.draft_model, "model") if settings.draft_model else (settings.draft_preset, "preset")
    if not ref:
        return None
    progress.message(f"building draft {ref} ...")
    source = Source(ref, kind, settings.dtype, settings.seed)
    bits = settings.draft_bits
    if bits is not None and not source.stored_quantization:
        check_group_size(source.args, settings.group_size, f"draft {source.label}")
    model = source.model(bits, settings.group_size)
    return model, source.label + (f" q{bits}" if bits is not None and not source.stored_quantization else "")


def _sources(settings: BenchSettings) -> list[tuple[str, str]]:
    return [(m, "model") for m in settings.models] + [(p, "preset") for p in settings.presets]


def run_benchmark(settings: BenchSettings, progress: Optional[Progress] = None) -> dict:
    """Measure every source x bit width x lengths x engine; returns the result document.

    Rows hold one configuration each (median and min-max over trials, bytes per token,
    bandwidth); with two engines (--ablation, --compare) `ratios` holds first/second.
    """
    progress = progress or Progress()
    machine = machine_info()
    peak_bw = settings.bandwidth_gbs or machine["peak_bandwidth_gbs"]
    lengths = [(p, g) for p in settings.prompt_tokens for g in settings.generation_tokens]
    notes: list[str] = []
    rows: list[dict] = []
    ratios: list[dict] = []
    draft = _draft(settings, progress)
    for ref, kind in _sources(settings):
        progress.message(f"building {ref} ...")
        source = Source(ref, kind, settings.dtype, settings.seed)
        bits_list, group = _bits_to_run(source, settings)
        _check_lengths(source, lengths)
        for bits in bits_list:
            model = source.model(bits, group)
            _dtype_notes(source, bits, notes)
            engines = _engines(model, settings, draft)
            weights = DTYPE_NAMES[source.dtype] if bits is None else f"q{bits}/g{group}"
            for prompt_len, gen_len in lengths:
                prompt = core.make_prompt(source.args.vocab_size, prompt_len, settings.seed)
                name = f"{source.label} {weights} {prompt_len}+{gen_len}"
                results = _measure(engines, prompt, gen_len, name, settings, progress)
                config_rows = [_row(e, source, bits, group, model, results[id(e)], peak_bw) for e in engines]
                rows.extend(config_rows)
                if len(config_rows) == 2:
                    ratios.append(_ratio(*config_rows))
            del engines, model
            mx.clear_cache()
    return {
        "tool": "mlx-openelm bench",
        "version": __version__,
        "machine": machine,
        "settings": settings.to_dict(),
        "rows": rows,
        "ratios": ratios,
        "notes": notes,
    }


def core_label(row: dict) -> str:
    return row["engine"] + (f" [{row['variant']}]" if row.get("variant") else "")
