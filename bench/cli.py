"""`mlx-openelm bench`: prompt and generation throughput, peak memory and bandwidth.

MLX is imported inside the command body only, so `mlx-openelm --help` stays instant.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import click

from mlx_openelm.cli_common import check_output_path, user_errors
from mlx_openelm.quantization import BITS, GROUP_SIZES

from .settings import BenchSettings, Progress

BITS_CHOICES = (16, *sorted(BITS, reverse=True))  # 16: unquantized


class ListOf(click.ParamType):
    """A comma-separated list, each item converted (and validated) by `convert_item`."""

    def __init__(self, name: str, convert_item):
        self.name = name
        self._convert_item = convert_item

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail("expected at least one value", param, ctx)
        out = []
        for item in items:
            try:
                out.append(self._convert_item(item))
            except ValueError as e:
                self.fail(str(e), param, ctx)
        return list(dict.fromkeys(out))


def _bits(item: str) -> int:
    try:
        bits = int(item)
    except ValueError:
        raise ValueError(f"{item!r} is not a bit width; choose from {', '.join(map(str, BITS_CHOICES))}") from None
    if bits not in BITS_CHOICES:
        raise ValueError(f"{bits} bits is not supported; choose from 16 (float), "
                         f"{', '.join(map(str, BITS_CHOICES[1:]))}")
    return bits


def _count(minimum: int):
    def convert(item: str) -> int:
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a whole number") from None
        if value < minimum:
            raise ValueError(f"{value} is too small; it must be at least {minimum}")
        return value

    return convert


def _preset(item: str) -> str:
    """A published size (270M, 450M, 1_1B, 3B) or a path to an OpenELM config.json."""
    from mlx_openelm.config import PRESET_NAMES, preset_config
    from mlx_openelm.errors import ConfigError

    if Path(item).suffix == ".json" or Path(item).is_file():
        if not Path(item).is_file():
            raise ValueError(f"config file {item!r} not found")
        return str(Path(item))
    try:
        preset_config(item)
    except ConfigError:
        raise ValueError(
            f"unknown preset {item!r}; choose one of {', '.join(PRESET_NAMES)} or give a path to a config.json"
        ) from None
    return item


def _one_preset(value, param, ctx):
    if value is None:
        return None
    try:
        return _preset(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None


@click.command("bench")
@click.option("--model", "models", multiple=True, metavar="PATH",
              help="Model folder the runtime loads (repeatable). Mutually exclusive with --preset.")
@click.option("--preset", "presets", type=ListOf("PRESET[,..]", _preset), default=None,
              help="OpenELM size(s) built with random weights in memory, no download: 270M, 450M, 1_1B, 3B "
                   "(comma list), or a path to an OpenELM config.json for another architecture.")
@click.option("--bits", "bits_list", type=ListOf("BITS[,..]", _bits), default=None,
              help=f"16 (unquantized, in --dtype) or {', '.join(map(str, BITS_CHOICES[1:]))}; comma list to sweep. "
                   "Default: 16 (presets) or as stored (--model); the paper protocol: 16,4.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Float dtype of activations and of unquantized weights/quantization scales. "
                   "Default: float32 on MLX's CPU backend (half precision is emulated there), "
                   "else float16 (bfloat16 for 3B).")
@click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default="64", show_default=True,
              help="Quantization group size for --bits 8/4.")
@click.option("--prompt-tokens", type=ListOf("N[,..]", _count(1)), default=None,
              help="Prompt length(s) in tokens. Default 512 (paper protocol: 35).")
@click.option("--generation-tokens", type=ListOf("N[,..]", _count(2)), default=None,
              help="Tokens generated per trial (EOS ignored). Default 128 (paper protocol: 1024).")
@click.option("--trials", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed trials per configuration (median and min-max reported).")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Run each engine once (16 tokens, untimed) before its trials.")
@click.option("--protocol", type=click.Choice(["default", "paper"]), default="default", show_default=True,
              help="default: 512-token random prompt, 128 tokens. paper: Table 7b's settings "
                   "(35-token fixed prompt, 1024 tokens, 16- and 4-bit) beside the paper's M2 Max figures.")
@click.option("--reference-json", "reference_path", default=None, metavar="PATH",
              help="Figures to print beside ours, e.g. the paper's Table 7b: a JSON file "
                   '{"source": ..., "rows": [{"model": "270M", "bits": 16, "generation_tps": ...}, ...]} '
                   "(any of prompt_tps, generation_tps, total_tps per row).")
@click.option("--ablation", type=click.Choice(["rmsnorm"]), default=None,
              help="rmsnorm: the same configuration with a naive RMSNorm (separate ops) and with the fused "
                   "mx.fast.rms_norm, interleaved, with their ratio (the paper's Table 8 on your machine).")
@click.option("--compare", type=click.Choice(["mlx-lm"]), default=None,
              help="Also run mlx-lm's OpenELM on the same weights, dtype and bits, interleaved (A B A B).")
@click.option("--draft-model", default=None, metavar="PATH_OR_REPO",
              help="Speculative decoding with this draft model, against plain decoding, interleaved.")
@click.option("--draft-preset", callback=lambda ctx, param, value: _one_preset(value, param, ctx), default=None,
              help="Speculative decoding with a random-weights draft of this size (the source's own preset "
                   "with the same --seed is a self-draft: an upper bound on acceptance).")
@click.option("--draft-bits", type=click.Choice([str(b) for b in BITS_CHOICES]), default=None,
              help="Quantize the draft model (16: keep it float); --draft-preset SAME --draft-bits 4 is a 4-bit "
                   "copy drafting for its float self.")
@click.option("--num-draft-tokens", type=click.IntRange(min=1), default=3, show_default=True,
              help="Tokens the draft model proposes per verification pass.")
@click.option("--prompt-lookup", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Speculative decoding with prompt lookup (up to N tokens copied after an n-gram match), "
                   "against plain decoding, interleaved.")
@click.option("--bandwidth", type=click.FloatRange(min=0, min_open=True), default=None, metavar="GB/s",
              help="Peak memory bandwidth of this machine (default: known Apple M-series chips only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights and prompt.")
@click.option("--json", "json_path", default=None, metavar="PATH",
              help="Write every configuration and trial, the machine and the settings as JSON.")
@click.option("--csv", "csv_path", default=None, metavar="PATH",
              help="Write one CSV line per trial.")
@click.option("--plot", "plot_path", default=None, metavar="PATH",
              help="Draw generation tok/s per configuration to a PNG (needs matplotlib).")
@user_errors
def bench(models, presets, bits_list, dtype, group_size, prompt_tokens, generation_tokens, trials, warmup,
          protocol, reference_path, ablation, compare, draft_model, draft_preset, draft_bits, num_draft_tokens, prompt_lookup,
          bandwidth, seed, json_path, csv_path, plot_path):
    """Measure prompt and generation throughput, peak memory and memory bandwidth.

    \b
    mlx-openelm bench --preset 270M --bits 16,8,4 --compare mlx-lm
    mlx-openelm bench --preset 270M,450M --protocol paper --json out.json
    mlx-openelm bench --preset 270M --ablation rmsnorm
    mlx-openelm bench --model ./OpenELM-270M-Instruct --trials 5
    mlx-openelm bench --preset 270M --draft-preset 270M --draft-bits 4
    """
    if bool(models) == bool(presets):
        raise click.UsageError("give either --model PATH or --preset NAME (one of the two)")
    if ablation and compare:
        raise click.UsageError("--ablation and --compare run separately; pick one")
    outputs = {option: check_output_path(path, option)
               for option, path in (("--json", json_path), ("--csv", csv_path), ("--plot", plot_path))}
    _check_outputs_apart(outputs, [*models, *(presets or []), reference_path])
    _check_extras(plot_path, compare)
    reference = _load_reference(reference_path)
    chosen = {"bits": [None if b == 16 else b for b in bits_list] if bits_list else None,
              "prompt_tokens": prompt_tokens, "generation_tokens": generation_tokens}
    settings = BenchSettings(
        models=list(models), presets=list(presets or []), dtype=dtype, group_size=int(group_size), trials=trials,
        warmup=warmup, protocol=protocol, ablation=ablation, compare=compare, bandwidth_gbs=bandwidth, seed=seed,
        command=_command_line(),
        **{**_protocol_defaults(protocol), **{key: value for key, value in chosen.items() if value}},
        draft_model=draft_model, draft_preset=draft_preset,
        draft_bits=None if draft_bits in (None, "16") else int(draft_bits),
        num_draft_tokens=num_draft_tokens, prompt_lookup=prompt_lookup,
    )
    from .runner import run_benchmark

    document = run_benchmark(settings, progress=ClickProgress())
    document["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if reference is not None:
        document["reference"] = reference
    _print_report(document, settings)
    _write_outputs(document, outputs)


def _check_outputs_apart(outputs: dict, inputs: list) -> None:
    """Two outputs at one path would silently keep only the last; an output onto an input
    (a --preset config.json, --reference-json, an existing file in a --model folder) would destroy it."""
    seen: dict = {}
    for option, path in outputs.items():
        if path is None or not path.parent.is_dir():
            continue
        where = path.resolve()
        if where in seen and (path.is_file() or not path.exists()):  # two writers to one device are fine
            raise click.BadParameter(f"{path} is also the {seen[where]} output", param_hint=f"'{option}'")
        seen[where] = option
        for item in inputs:
            if item is None or not Path(item).exists():
                continue  # a preset name or repo id: no file of the user's
            source = Path(item).resolve()
            if where == source or (source in where.parents and path.exists()):  # a new file beside is fine
                raise click.BadParameter(f"{path} would overwrite the input {item}", param_hint=f"'{option}'")


def _protocol_defaults(protocol: str) -> dict:
    """Settings a protocol implies unless given: the paper's are Table 7b's."""
    if protocol != "paper":
        return {}
    from .paper import PAPER_BITS, PAPER_GENERATION_TOKENS, PAPER_PROMPT_TOKENS

    return {"prompt": "fixed", "prompt_tokens": [PAPER_PROMPT_TOKENS],
            "generation_tokens": [PAPER_GENERATION_TOKENS], "bits": list(PAPER_BITS)}


def _load_reference(path):
    if path is None:
        return None
    from .paper import load_reference

    return load_reference(path)


def _check_extras(plot_path, compare) -> None:
    """Optional dependencies, checked before any work."""
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.BadParameter(
                "drawing needs matplotlib: pip install 'mlx-openelm[plot]'", param_hint="'--plot'"
            ) from None
    if compare == "mlx-lm":
        from .core import MLX_LM_HINT

        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            raise click.BadParameter(MLX_LM_HINT, param_hint="'--compare'") from None


def _command_line():
    return " ".join(["mlx-openelm", *sys.argv[1:]]) if Path(sys.argv[0]).name == "mlx-openelm" else None


class ClickProgress(Progress):
    """Trial results on stderr; a per-token counter when stderr is a terminal."""

    def message(self, text: str) -> None:
        click.echo(text, err=True)

    def tokens(self, label: str, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        if done == 1 or done == total or done % 8 == 0:
            click.echo(f"\r{label} {done}/{total} tokens", err=True, nl=False)
        if done == total:
            click.echo("\r" + " " * (len(label) + 24) + "\r", err=True, nl=False)


RATIO_TITLES = {
    "ablation": "RMSNorm ablation: fused mx.fast.rms_norm / naive RMSNorm (x>1: fused is faster)",
    "compare": "mlx-openelm / mlx-lm (x>1: ours is faster, or for peak GB uses more memory)",
    "speculative": "speculative / plain decoding (x>1: speculative is faster)",
}


def _print_report(document: dict, settings) -> None:
    from mlx_openelm.blas import describe

    from . import report
    from . import paper

    blas = document["machine"].get("blas")
    if blas:
        click.echo(f"BLAS: {describe(blas)}, float32 matmul {blas['sgemm_gflops']:.1f} GFLOP/s")
    click.echo(report.results_table(document["rows"]))
    if document["ratios"]:
        click.echo()
        kind = "ablation" if settings.ablation else "speculative" if settings.speculative else "compare"
        click.echo(report.ratio_table(document["ratios"], RATIO_TITLES[kind]))
    if settings.protocol == "paper":
        click.echo()
        lines = paper.protocol_rows(document["rows"], settings.to_dict(), document.get("machine", {}))
        click.echo(report.protocol_table(lines, f"Protocol of the {paper.PAPER_SOURCE}"))
    if "reference" in document:
        click.echo()
        pairs = paper.compare_rows(document["rows"], document["reference"])
        if pairs:
            click.echo(report.reference_table(pairs, document["reference"]["source"]))
        else:
            click.echo(f"{document['reference']['source']}: no row for the sizes and bits measured here")
    elif settings.protocol == "paper":
        click.echo()
        click.echo("The paper's own figures are not bundled: pass them with --reference-json FILE "
                   "to print them beside ours (see --help for the file's shape).")
    for line in document["notes"]:
        click.echo(f"note: {line}", err=True)


def _plot_title(document: dict) -> str:
    from .paper import machine_title

    protocol = document["settings"].get("protocol")
    return machine_title(document["machine"]) + (" (OpenELM paper protocol)" if protocol == "paper" else "")


def _write_outputs(document: dict, outputs: dict) -> None:
    from . import report

    writers = {
        "--json": lambda path: report.write_json(path, document),
        "--csv": lambda path: report.write_csv(path, document["rows"]),
        "--plot": lambda path: report.write_plot(
            path, document["rows"], title=_plot_title(document)),
    }
    for option, path in outputs.items():
        if path is not None:
            _write_replacing(path, writers[option])
            click.echo(f"wrote {path}", err=True)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_replacing(path: Path, write) -> None:
    """`write(file)` into a scratch file beside `path`, renamed over it once complete, so a full
    disk or failed write leaves the user's old file as it was (a device is written directly);
    an OS error names `path`."""
    import os
    import tempfile

    scratch, real = None, path.resolve() if path.is_symlink() else path  # a link's file is replaced, not the link
    try:
        if real.exists() and not real.is_file():
            write(real)
            return
        fd, scratch = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=real.suffix)
        os.close(fd)
        os.chmod(scratch, real.stat().st_mode & 0o7777 if real.exists() else 0o666 & ~_umask())  # not mkstemp's 0600
        write(Path(scratch))
        os.replace(scratch, real)
        scratch = None
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        if scratch is not None:
            Path(scratch).unlink(missing_ok=True)
