"""`mlx-openelm lora`: fine-tune a model (LoRA, DoRA or full) on JSONL data, and test an adapter
(`--train`, `--test`: mlx_lm.lora's flags); `mlx-openelm fuse`. MLX loads inside the commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from mlx_openelm.cli_common import (chat_template_option, format_memory, load_model_and_tokenizer, model_options, note,
                                    user_errors)

PROJECTION_NAMES = ("qkv_proj", "out_proj", "proj_1", "proj_2")


def format_event(event: dict, iters: int) -> str:
    """One progress line for a trainer event."""
    head = f"iter {event['iteration']:>{len(str(iters))}}/{iters}"
    if event["event"] == "train":
        return (f"{head} | train loss {event['train_loss']:.4f} | lr {event['learning_rate']:.2e} | "
                f"{event['tokens_per_second']:.1f} tok/s | {event['iterations_per_second']:.2f} it/s | "
                f"peak memory {format_memory(event['peak_memory_gb'])}")
    if event["event"] == "val":
        return f"{head} | val loss {event['val_loss']:.4f} ({event['val_seconds']:.1f} s)"
    return f"{head} | saved {event['path']}"


def format_summary(summary: dict) -> str:
    rows = [("adapter", f"{summary['fine_tune_type']}, last {summary['num_layers']} layers, "
                        f"{summary['trainable_parameters']:,} trainable parameters "
                        f"({100 * summary['trainable_fraction']:.3f}%)"),
            ("iterations", str(summary["iterations"]))]
    for key, label in (("train_loss", "train loss"), ("first_val_loss", "val loss before"), ("val_loss", "val loss"),
                       ("test_loss", "test loss"), ("test_perplexity", "test perplexity")):
        if summary.get(key) is not None:
            rows.append((label, f"{summary[key]:.4f}"))
    if summary.get("tokens_per_second"):
        rows.append(("speed", f"{summary['tokens_per_second']:.1f} tokens/s (mean of the reports)"))
    rows += [("peak memory", format_memory(summary["peak_memory_gb"])), ("adapters", summary["path"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_test(summary: dict) -> str:
    rows = [("adapter", summary["adapter"] or "none (the base model)"), ("test examples", str(summary["test_examples"])),
            ("test loss", f"{summary['test_loss']:.4f}"), ("test perplexity", f"{summary['test_perplexity']:.4f}"),
            ("peak memory", format_memory(summary["peak_memory_gb"]))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _keys(values: tuple) -> list | None:
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return names or None


def check_output(adapter_path: Path, resume: str | None, force: bool) -> None:
    """Never replace adapters the user has without --force (resuming from them continues them)."""
    from mlx_openelm.errors import ConfigError
    from mlx_openelm.folder.names import ADAPTERS_FILE

    existing = adapter_path / ADAPTERS_FILE
    if adapter_path.exists() and not adapter_path.is_dir():
        raise ConfigError(f"--adapter-path: {adapter_path} exists and is not a folder")
    same = resume is not None and Path(resume).resolve() == existing.resolve()
    if existing.exists() and not force and not same:
        raise ConfigError(f"--adapter-path: {existing} exists; pass --force to replace it (or --resume-adapter-file "
                          "to continue training it)")


def resume_from(model, path: str, config) -> None:
    """Load `path` into the freshly adapted model; a file from another rank/layers/type is refused."""
    from mlx_openelm.errors import ConfigError
    from mlx_openelm.tuning.adapters import load_adapter_weights
    from mlx_openelm.folder.names import ADAPTER_CONFIG_FILE
    from mlx_openelm.tuning.config import read_adapter_config

    path = Path(path)
    beside = path.parent / ADAPTER_CONFIG_FILE
    if beside.is_file():
        saved = read_adapter_config(path.parent, len(model.layers))
        for key in ("fine_tune_type", "num_layers", "rank", "keys", "scale"):
            if getattr(saved, key) != getattr(config, key):
                raise ConfigError(f"--resume-adapter-file: {path} was trained with {key} {getattr(saved, key)!r} "
                                  f"({beside}), this run has {getattr(config, key)!r}; resume with the same settings")
    load_adapter_weights(model, path, config)


@click.command("lora")
@model_options
@chat_template_option
@click.option("--data", "data_path", required=True, type=click.Path(), metavar="DIR",
              help="Folder with train.jsonl (and valid.jsonl, test.jsonl): {\"text\"}, {\"prompt\", \"completion\"} "
                   "or {\"messages\"} lines.")
@click.option("--fine-tune-type", type=click.Choice(["lora", "dora", "full"]), default="lora", show_default=True)
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank.")
@click.option("--scale", type=float, default=None, help="LoRA scale (mlx-lm's; default 20).")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (Hugging Face PEFT's): scale = alpha / rank.")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Dropout on the LoRA input.")
@click.option("--num-layers", type=int, default=-1, show_default=True, help="Adapt the last N layers (-1: all).")
@click.option("--keys", "keys", multiple=True, metavar="NAMES",
              help=f"Projections to adapt, comma-separated or repeated (default all: {','.join(PROJECTION_NAMES)}).")
@click.option("--train", "train", is_flag=True,
              help="Train (mlx_lm.lora's flag; training is also what runs when --test is not given).")
@click.option("--test", is_flag=True,
              help="Report test.jsonl's loss and perplexity: after training with --train; alone, of the adapter "
                   "already in --adapter-path (--adapter-path '': the base model), without training.")
@click.option("--test-batches", type=int, default=-1, show_default=True, help="Test batches (-1: all).")
@click.option("--iters", type=int, default=1000, show_default=True, help="Training steps.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--learning-rate", type=float, default=1e-5, show_default=True, help="Adam's peak learning rate.")
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True,
              help="After the warmup: cosine decay to 0 at the last step, or constant.")
@click.option("--warmup", type=int, default=0, show_default=True, help="Steps of linear warmup from 0.")
@click.option("--max-seq-length", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Longer lines are truncated (with a warning).")
@click.option("--grad-checkpoint", is_flag=True, help="Recompute activations in the backward pass (less memory).")
@click.option("--val-batches", type=int, default=25, show_default=True, help="Validation batches (-1: all).")
@click.option("--steps-per-report", type=int, default=10, show_default=True)
@click.option("--steps-per-eval", type=int, default=200, show_default=True)
@click.option("--save-every", type=int, default=100, show_default=True, help="Checkpoint every N steps.")
@click.option("--resume-adapter-file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Start from these adapter weights (the same type, rank, layers and keys).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--adapter-path", default="adapters", show_default=True, type=click.Path(),
              help="Output folder: adapters.safetensors and adapter_config.json.")
@click.option("--force", is_flag=True, help="Replace adapters already in --adapter-path.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (and every event) as JSON.")
@user_errors
def lora_command(model_path, tokenizer_path, dtype, data_path, fine_tune_type, rank, scale, alpha, dropout, num_layers,
                 keys, train, test, test_batches, iters, batch_size, learning_rate, lr_schedule, warmup, max_seq_length,
                 grad_checkpoint, val_batches, steps_per_report, steps_per_eval, save_every, resume_adapter_file, seed,
                 adapter_path, force, as_json, chat_template):
    """Fine-tune --model on --data with LoRA, DoRA or full fine-tuning; adapters go to --adapter-path.

    A quantized --model (from `convert`) stays quantized and frozen (QLoRA). Chat lines are written
    in the model's chat template (or --chat-template). Ctrl-C saves the adapters trained so far and
    says where. `--test` alone evaluates the adapter in --adapter-path on test.jsonl without
    training; `--train --test` trains, then tests."""
    from mlx_openelm.tuning.config import scale_from_alpha
    from mlx_openelm.tuning.trainer import TrainSettings

    settings = TrainSettings(iters=iters, batch_size=batch_size, learning_rate=learning_rate, lr_schedule=lr_schedule,
                             warmup=warmup, steps_per_report=steps_per_report, steps_per_eval=steps_per_eval,
                             val_batches=val_batches, test_batches=test_batches, save_every=save_every,
                             grad_checkpoint=grad_checkpoint, seed=seed)
    if test and not train:
        summary = run_test(model_path, tokenizer_path, dtype, data_path, adapter_path, settings, max_seq_length,
                           as_json, chat_template)
        click.echo(json.dumps(summary, indent=2) if as_json else format_test(summary))
        return
    lora = {"fine_tune_type": fine_tune_type, "num_layers": num_layers, "rank": rank,
            "scale": scale_from_alpha(alpha, scale, rank), "dropout": dropout, "keys": _keys(keys)}
    check_output(Path(adapter_path), resume_adapter_file, force)
    record = {"model": model_path, "data": data_path, "iters": iters, "batch_size": batch_size,
              "learning_rate": learning_rate, "lr_schedule": lr_schedule, "warmup": warmup,
              "max_seq_length": max_seq_length, "grad_checkpoint": grad_checkpoint, "seed": seed}
    summary = run_training(model_path, tokenizer_path, dtype, data_path, lora, settings, max_seq_length,
                           resume_adapter_file, Path(adapter_path), record, test, as_json, chat_template)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


def run_training(model_path, tokenizer_path, dtype, data_path, lora: dict, settings, max_seq_length: int,
                 resume, adapter_path: Path, record: dict, test: bool, as_json: bool, chat_template=None) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_openelm.signals import handle_signals
    from mlx_openelm.tuning.adapters import adapter_weights, apply_adapters
    from mlx_openelm.tuning.config import check_adapter_config
    from mlx_openelm.tuning.data import load_splits
    from mlx_openelm.tuning.trainer import Trainer, evaluate

    events = []

    def report(event: dict) -> None:
        events.append(event)
        note(format_event(event, settings.iters))

    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype, quiet=as_json,
                                                chat_template=chat_template)
    config = check_adapter_config(model_layers=len(model.layers), **lora)  # errors: as_flags names the flags
    splits = load_splits(Path(data_path), tokenizer, max_seq_length, need=("train", "test") if test else ("train",))
    mx.random.seed(settings.seed)
    apply_adapters(model, config)
    if resume:
        resume_from(model, resume, config)
    trainable = sum(a.size for a in adapter_weights(model).values())
    total = sum(a.size for _, a in tree_flatten(model.parameters()))
    with handle_signals():
        result = Trainer(model, config, settings, adapter_path, record, report).train(splits["train"],
                                                                                      splits.get("valid"))
    summary = {**config.to_dict(), **result, "trainable_parameters": trainable, "trainable_fraction": trainable / total,
               "peak_memory_gb": mx.get_peak_memory() / 1e9}
    vals = [e["val_loss"] for e in events if e["event"] == "val"]
    speeds = [e["tokens_per_second"] for e in events if e["event"] == "train"]
    summary["first_val_loss"] = vals[0] if vals else None
    summary["tokens_per_second"] = sum(speeds) / len(speeds) if speeds else None
    if test:
        summary["test_loss"] = evaluate(model, splits["test"], settings.batch_size, settings.test_batches)
        summary["test_perplexity"] = math.exp(summary["test_loss"])
    if as_json:
        summary["events"] = events
    return summary


def run_test(model_path, tokenizer_path, dtype, data_path, adapter_path: str, settings, max_seq_length: int,
             as_json: bool, chat_template=None) -> dict:
    """test.jsonl's mean loss per target token (and perplexity) under the adapter in `adapter_path`
    ('': the base model), as `mlx_lm.lora --test` without --train: nothing is trained or written."""
    import mlx.core as mx

    from mlx_openelm.tuning.data import load_splits
    from mlx_openelm.tuning.trainer import evaluate

    adapter = str(adapter_path) or None
    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype, quiet=as_json, adapter_path=adapter,
                                                chat_template=chat_template)
    test = load_splits(Path(data_path), tokenizer, max_seq_length, need=("test",), splits=("test",))["test"]
    mx.reset_peak_memory()
    loss = evaluate(model, test, settings.batch_size, settings.test_batches)
    return {"adapter": adapter, "test_examples": len(test), "test_loss": loss, "test_perplexity": math.exp(loss),
            "peak_memory_gb": mx.get_peak_memory() / 1e9}


@click.command("fuse")
@click.option("--model", "model_path", required=True, help="The base model folder (float or quantized) or repo id.")
@click.option("--adapter-path", default="adapters", show_default=True, type=click.Path(),
              help="The adapter folder (ours or mlx-lm's).")
@click.option("--save-path", "--mlx-path", "save_path", default="fused_model", show_default=True, type=click.Path(),
              help="Output folder (written to a temporary folder and renamed into place).")
@click.option("--dequantize", is_flag=True, help="Write a quantized base back in float instead of re-quantizing.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def fuse_command(model_path, adapter_path, save_path, dequantize, force, as_json):
    """Merge an adapter into the model's weights: a normal model folder for every command and mlx-lm.

    A quantized base is dequantized, merged and re-quantized at each layer's own bits with the
    converter's quantizer (or written in float with --dequantize)."""
    from mlx_openelm.tuning.fuse import fuse

    report = fuse(model_path, adapter_path, save_path, dequantize=dequantize, force=force)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    rows = [("output", report["output"]), ("layers fused", str(report["fused_layers"])),
            ("weights", report["dtype"] + (" (dequantized)" if report["dequantized"] else ""))]
    if report["requantized_layers"]:
        rows.append(("re-quantized", f"{report['requantized_layers']} layers ({report['method']}), worst relative "
                                     f"error {report['max_requantization_error']:.4f}"))
    rows.append(("time", f"{report['seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    click.echo("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
