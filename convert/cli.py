"""`mlx-openelm convert`: PyTorch/Hugging Face OpenELM checkpoints to MLX folders."""

from __future__ import annotations

import json
import sys

import click

from mlx_openelm.cli_common import user_errors
from mlx_openelm.quantization import BITS, DEFAULT_BITS, DEFAULT_METHOD, GROUP_SIZES, METHODS


def format_report(report: dict) -> str:
    """The conversion report as a readable table."""

    def size(n: int) -> str:
        for unit in ("B", "KB", "MB", "GB"):
            if n < 1000 or unit == "GB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
            n /= 1000
        return str(n)

    if report["bits"] is None:
        precision = report["dtype"]
    else:
        precision = f"{report['bits']}-bit affine ({report['method']}), group {report['group_size']}"
        if report["recipe"]:
            precision += f" (recipe {report['recipe']})"
        if report.get("calibration"):
            c = report["calibration"]
            precision += (f", calibrated on {c['text']} ({c['tokens']} tokens; "
                          f"{c['folded_layers']} norm/linear pairs rescaled)")
        precision += f"; float tensors {report['dtype']}"
    rows = [
        ("output", report["output"]),
        ("input" + ("s (averaged)" if len(report["inputs"]) > 1 else ""), ", ".join(report["inputs"])),
        ("precision", precision),
        ("parameters", f"{report['parameters']:,}"),
        ("bits per weight", f"{report['bits_per_weight']:.3f}"),
        ("size on disk", f"{size(report['size_bytes'])} in {report['shards']} file(s)"),
    ]
    if report["layer_bits"]:
        rows.append(("layers", ", ".join(
            f"{n} at {k}" + ("" if k == "float" else " bits") for k, n in sorted(report["layer_bits"].items())
        )))
    if report["skipped_layers"]:
        shown = ", ".join(f"{p} (width {w})" for p, w in list(report["skipped_layers"].items())[:4])
        more = len(report["skipped_layers"]) - 4
        rows.append((
            "kept in float",
            f"{shown}{f' and {more} more' if more > 0 else ''}: input width not a multiple of the group size",
        ))
    rows.append(("max relative error", f"{report['max_rel_error']:.3e} ({report['max_rel_error_tensor']})"))
    if report["kl_mean"] is not None:
        rows.append((
            "KL(float || output)",
            f"mean {report['kl_mean']:.3e}, max {report['kl_max']:.3e} nats over {report['eval_tokens']} tokens; "
            f"top-1 agreement {100 * report['top1_agreement']:.1f}%",
        ))
    rows.append(("tokenizer", report["tokenizer"] or "none (pass --tokenizer to include one)"))
    rows.append(("time", f"{report['seconds']:.1f} s, peak memory {report['peak_memory_mb']:.0f} MB"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class ProgressBar:
    """The conversion's progress on stderr: a bar over the weights, with tensors done and an ETA.

    `then` is a line shown once the bar is full (what the conversion does next)."""

    def __init__(self, then: str | None = None):
        self.bar = None
        self.then = then

    def __call__(self, step) -> None:
        if self.bar is None:
            label = f"converting {step.weights_total / 1e6:,.1f}M weights"
            self.bar = click.progressbar(length=max(step.weights_total, 1), label=label, file=sys.stderr,
                                         show_eta=True, show_percent=True, item_show_func=lambda item: item)
            self.bar.__enter__()
        calibrating = step.name.startswith("calibrating")
        self.bar.update(step.weights_done - self.bar.pos,
                        step.name if calibrating else f"{step.tensors_done}/{step.tensors_total} tensors")
        if step.tensors_done == step.tensors_total:
            self.close()
            if self.then:
                click.echo(self.then, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@click.command("convert")
@click.option("--hf-path", "--torch-path", "hf_path", default=None,
              help="Input: a Hugging Face OpenELM folder, or a CoreNet .pt checkpoint (with --preset).")
@click.option("--mlx-path", default="mlx_model", show_default=True,
              help="Output folder (refused if it exists, unless --force).")
@click.option("--average", "average", is_flag=True,
              help="Average the checkpoints given as arguments (float64) and convert the mean.")
@click.argument("checkpoints", nargs=-1)
@click.option("--preset", default=None, help="Architecture of a CoreNet .pt: 270M, 450M, 1_1B or 3B (vocab 32128).")
@click.option("--config", "config", default=None,
              help="Architecture of a CoreNet .pt as a config.json (instead of --preset).")
@click.option("--dtype", default=None, help="float16, bfloat16 or float32 (default: float16; bfloat16 for 3B).")
@click.option("-q", "--quantize", is_flag=True,
              help=f"Quantize linear layers and the embedding ({DEFAULT_BITS} bits unless --bits says otherwise).")
@click.option("--bits", "--q-bits", "bits", type=int, default=None,
              help=f"Quantize to {', '.join(map(str, BITS))} bits (implies --quantize).")
@click.option("--group-size", "--q-group-size", "group_size", type=int, default=64, show_default=True,
              help=f"Quantization group size: {', '.join(map(str, GROUP_SIZES))}.")
@click.option("--recipe", default=None,
              help="Per-layer bits 'mixed-LOW-HIGH' (e.g. mixed-3-6, mixed-4-8): HIGH bits for the sensitive "
                   "layers (the embedding/output head, every qkv_proj and the last decoder layer), LOW for the rest.")
@click.option("--quant-method", "method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
              help="optimal: per group, the scale and bias that minimise the reconstruction error, each input "
                   "column weighted by its estimated share of the output error; minmax: the group's min/max "
                   "(mlx-lm's output bit for bit). Same format and size either way.")
@click.option("--tokenizer", default=None,
              help="tokenizer.model or tokenizer.json to copy into the output (default: the input's own).")
@click.option("--calibration-text", "calibration_text", default=None, metavar="FILE",
              help="Plain UTF-8 text: activation-aware quantization. Its activations (first 512 tokens) weigh each "
                   "input column's error in every layer, and per-channel scales chosen on them are folded into each "
                   "attn_norm/qkv_proj and ffn_norm/proj_1 pair (the float model's function is unchanged). "
                   "Needs a tokenizer.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Split model.safetensors above this size.")
@click.option("--force", is_flag=True, help="Replace an existing --mlx-path (only once the new one is complete).")
@click.option("--no-eval", is_flag=True,
              help="Skip the KL check against the float model (saves its time).")
@click.option("--dequantize", is_flag=True, help="The input is a quantized MLX folder: write it back in float.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def convert(hf_path, mlx_path, average, checkpoints, preset, config, dtype, quantize, bits, group_size, recipe, method,
            tokenizer, calibration_text, max_shard_size, force, no_eval, dequantize, as_json):
    """Convert an OpenELM checkpoint to an MLX model folder, optionally quantized.

    \b
    mlx-openelm convert --hf-path ./OpenELM-1_1B-Instruct --mlx-path ./openelm-1b-4bit \\
        -q --tokenizer ./tokenizer.model
    mlx-openelm convert --preset 270M --average ckpt1.pt ckpt2.pt ckpt3.pt --mlx-path ./openelm-270m
    """
    if checkpoints and not average:
        raise click.UsageError(f"unexpected argument {checkpoints[0]!r} (to average checkpoints, pass --average)")
    if average and not checkpoints:
        raise click.UsageError("--average needs the checkpoints to average as arguments")

    from mlx_openelm.signals import Interrupted, handle_signals

    from .pipeline import convert as run_convert

    if quantize and bits is None and recipe is None:
        bits = DEFAULT_BITS
    bar = ProgressBar(then=None if no_eval else "checking the output against the input (KL divergence; "
                                                "--no-eval skips this) ...")
    try:
        with handle_signals():  # SIGTERM/SIGHUP stop it like Ctrl-C: the temp folder is removed
            report = run_convert(
                hf_path, mlx_path, average=checkpoints, preset=preset, config=config, dtype=dtype, bits=bits,
                group_size=group_size, recipe=recipe, method=method, tokenizer=tokenizer,
                calibration_text=calibration_text, force=force,
                max_shard_size=max_shard_size, evaluate=not no_eval, dequantize=dequantize, progress=bar,
            )
    except Interrupted as e:
        raise click.ClickException(f"interrupted ({e}); no temporary folder was left behind") from None
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_report(report.to_dict()))
