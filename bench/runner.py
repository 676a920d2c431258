"""Running a benchmark sweep: sources x bits x prompt/generation lengths x engines."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import click
import mlx.core as mx

from mlx_openelm import __version__
from mlx_openelm.config import ModelArgs, preset_args
from mlx_openelm.loading import DTYPE_NAMES, default_dtype, load_model, model_dtype, parse_dtype
from mlx_openelm.model import Model
from mlx_openelm.quantization import BITS

from . import core
from .hardware import machine_info

METRICS = ("prompt_tps", "generation_tps", "total_tps", "peak_memory_gb", "ttft_s", "generation_s")


def _progress(message: str) -> None:
    click.echo(message, err=True)


def _token_progress(prefix: str, total: int):
    """A per-token counter on stderr when it is a terminal (nothing otherwise)."""
    if not sys.stderr.isatty():
        return None

    def show(n: int) -> None:
        if n == 1 or n == total or n % 8 == 0:
            click.echo(f"\r{prefix} {n}/{total} tokens", err=True, nl=False)
        if n == total:
            click.echo("\r" + " " * (len(prefix) + 24) + "\r", err=True, nl=False)

    return show


def check_group_size(args: ModelArgs, group_size: int, label: str) -> None:
    """Every quantized matrix's input width must be a multiple of the group size."""
    widths = {args.model_dim, *args.ffn_dims, *(q * args.head_dim for q in args.num_query_heads)}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        raise click.BadParameter(
            f"{label}: input widths {bad} are not multiples of {group_size}; pick another group size",
            param_hint="'--group-size'",
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
                self.label = Path(ref).parent.name if Path(ref).name == "config.json" else Path(ref).stem
            else:
                self.args = preset_args(ref)
                self.label = ref
            self.dtype = self.requested or default_dtype(self.args)
        else:
            from mlx_openelm.config import read_config
            from mlx_openelm.hub import resolve_model_path

            self.folder = resolve_model_path(ref)
            config = read_config(Path(self.folder) / "config.json")
            self.args = ModelArgs.from_dict(config, source=str(Path(self.folder) / "config.json"))
            self.stored_quantization = config.get("quantization")
            self.label = Path(self.folder).name
            self.dtype = None  # known once loaded

    def model(self, bits: int, group_size: int) -> Model:
        if self.kind == "preset":
            model = core.random_model(self.args, self.dtype, seed=self.seed)
        else:
            model = load_model(self.folder, dtype=self.requested)
            self.dtype = model_dtype(model)
        if bits in BITS and not self.stored_quantization:
            core.quantize(model, bits, group_size)
        mx.eval(model.parameters())
        return model


def _dtype_notes(source: Source, bits: int, notes: list) -> None:
    dtype = DTYPE_NAMES[source.dtype]
    if bits == 16 and not source.stored_quantization and source.dtype == mx.float32:
        note = (f"{source.label}: --bits 16 ran unquantized in float32 (the compute dtype here); "
                "pass --dtype float16 or bfloat16 for 16-bit weights")
    elif mx.default_device() == mx.cpu and source.dtype != mx.float32:
        note = (f"{source.label}: {dtype} on MLX's CPU backend is emulated and slow (quantized matmuls "
                "with half activations especially); float32 is the CPU default")
    else:
        return
    if note not in notes:
        notes.append(note)


def _engines(model: Model, ablation: Optional[str], compare: Optional[str]) -> list:
    if ablation == "rmsnorm":
        return [core.OursEngine(model, "fused"), core.OursEngine(model, "naive")]
    engines = [core.OursEngine(model)]
    if compare == "mlx-lm":
        engines.append(core.MlxLmEngine(core.mlx_lm_model(model)))
    return engines


def _row(engine, source: Source, bits: int, group_size: int, model: Model, trials: list, peak_bw) -> dict:
    quantized = bits in BITS
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


def run_benchmark(settings: dict, models: list, presets: list) -> dict:
    machine = machine_info()
    peak_bw = settings["bandwidth_gbs"] or machine["peak_bandwidth_gbs"]
    group_size = settings["group_size"]
    notes: list[str] = []
    rows: list[dict] = []
    pair_tables: list = []
    sources = [(m, "model") for m in models] + [(p, "preset") for p in presets]
    lengths = [(p, g) for p in settings["prompt_tokens"] for g in settings["generation_tokens"]]

    n_engines = 2 if (settings["ablation"] or settings["compare"]) else 1

    for ref, kind in sources:
        _progress(f"building {ref} ...")
        source = Source(ref, kind, settings["dtype"], settings["seed"])
        if source.stored_quantization:
            stored_bits = int(source.stored_quantization.get("bits", 0))
            bits_list = settings["bits"] or [stored_bits]
            if bits_list != [stored_bits]:
                raise click.BadParameter(
                    f"{ref} is stored {stored_bits}-bit; benchmark it as stored (omit --bits) or use an "
                    f"unquantized checkpoint to sweep bit widths", param_hint="'--bits'")
            group = int(source.stored_quantization.get("group_size", group_size))
        else:
            bits_list = settings["bits"] or [16]
            group = group_size
            if any(b in BITS for b in bits_list):
                check_group_size(source.args, group, source.label)
        for prompt_len, gen_len in lengths:
            if prompt_len + gen_len - 1 > source.args.max_context_length:
                raise click.BadParameter(
                    f"{prompt_len} prompt + {gen_len} generated tokens exceed {source.label}'s context of "
                    f"{source.args.max_context_length} tokens", param_hint="'--prompt-tokens'")

        for bits in bits_list:
            model = source.model(bits, group)
            _dtype_notes(source, bits, notes)
            engines = _engines(model, settings["ablation"], settings["compare"])
            for prompt_len, gen_len in lengths:
                prompt = core.make_prompt(source.args.vocab_size, prompt_len, settings["seed"])
                weights = f"{DTYPE_NAMES[source.dtype]}" if bits == 16 else f"q{bits}/g{group}"
                name = f"{source.label} {weights} {prompt_len}+{gen_len}"
                if settings["warmup"]:
                    for engine in engines:
                        _progress(f"{name} {engine.name}{' ' + engine.variant if engine.variant else ''}: warm-up")
                        core.run_trial(engine, prompt, min(gen_len, settings["warmup_tokens"]))
                results = {id(e): [] for e in engines}
                for t in range(settings["trials"]):
                    for engine in engines:  # interleaved: A B A B
                        label = f"{name} {engine.name}{' ' + engine.variant if engine.variant else ''}"
                        prefix = f"{label} trial {t + 1}/{settings['trials']}"
                        trial = core.run_trial(engine, prompt, gen_len, on_token=_token_progress(prefix, gen_len))
                        results[id(engine)].append(trial)
                        _progress(f"{prefix}: prompt {trial.prompt_tps:.1f} tok/s, "
                                  f"generation {trial.generation_tps:.1f} tok/s, "
                                  f"peak {trial.peak_memory_gb:.2f} GB")
                config_rows = [_row(e, source, bits, group, model, results[id(e)], peak_bw) for e in engines]
                rows.extend(config_rows)
                if n_engines == 2:
                    pair_tables.append((config_rows[0], config_rows[1]))
            del engines, model
            mx.clear_cache()

    ratios = []
    for a, b in pair_tables:
        entry = {"model": a["model"], "bits": a["bits"], "prompt_tokens": a["prompt_tokens"],
                 "generation_tokens": a["generation_tokens"],
                 "numerator": core_label(a), "denominator": core_label(b)}
        for key in ("prompt_tps", "generation_tps", "total_tps", "peak_memory_gb"):
            entry[key] = a[key] / b[key] if a.get(key) and b.get(key) else None
        ratios.append(entry)
    if settings["ablation"]:
        title = "RMSNorm ablation: fused mx.fast.rms_norm / naive RMSNorm (x>1: fused is faster)"
    else:
        title = "mlx-openelm / mlx-lm (x>1: ours is faster, or for peak GB uses more memory)"
    return {
        "tool": "mlx-openelm bench",
        "version": __version__,
        "machine": machine,
        "settings": settings,
        "rows": rows,
        "ratios": ratios,
        "notes": notes,
        "_pair_tables": [(pair_tables, title)] if pair_tables else [],
    }


def core_label(row: dict) -> str:
    return row["engine"] + (f" [{row['variant']}]" if row.get("variant") else "")
