"""`mlx-openelm eval`: perplexity on a text file, or task accuracy through lm-eval (`--tasks`), either
optionally against a reference model."""

from __future__ import annotations

import json
import sys

import click

from .cli_common import adapter_option, load_model_and_tokenizer, model_options, note, user_errors
from .evaluate_tasks_cli import task_options


def format_result(result: dict) -> str:
    """The evaluation as a readable table."""
    rows = [
        ("perplexity", f"{result['perplexity']:.4f}"),
        ("tokens scored", f"{result['tokens']:,} in {result['windows']} window(s) "
                          f"(context {result['context']}, stride {result['stride']})"),
    ]
    if result["bits_per_byte"] is not None:
        rows.append(("bits per byte", f"{result['bits_per_byte']:.4f} ({result['bytes']:,} bytes)"))
    if result["kl_mean"] is not None:
        rows += [
            ("reference perplexity", f"{result['reference_perplexity']:.4f}"),
            ("KL(reference || model)", f"mean {result['kl_mean']:.4e}, max {result['kl_max']:.4e} nats/token"),
            ("top-1 agreement", f"{100 * result['top1_agreement']:.2f}%"),
        ]
    rows.append(("time", f"{result['seconds']:.1f} s ({result['tokens_per_second']:.1f} tokens/s)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def read_text(path: str) -> str:
    import os
    import stat

    if stat.S_ISCHR(os.stat(path).st_mode) or stat.S_ISBLK(os.stat(path).st_mode):  # /dev/zero never ends
        raise click.ClickException(f"{path}: a device, not a text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise click.ClickException(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})")


@click.command("eval")
@model_options
@adapter_option
@click.option("--text", "text_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Plain UTF-8 text file to score (perplexity).")
@click.option("--context", type=click.IntRange(min=2), default=1024, show_default=True,
              help="--text: most tokens a window holds: each token is predicted from up to context - 1 earlier ones.")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="--text: tokens between window starts, less than --context (default: half of it); smaller gives "
                   "each token more history, at more compute.")
@click.option("--reference", "reference_path", default=None, metavar="PATH_OR_REPO",
              help="Compare with this model (e.g. the float original of a quantized --model): with --text, "
                   "KL(reference || model) and top-1 agreement; with --tasks, paired accuracy differences.")
@task_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@user_errors
def eval_command(model_path, tokenizer_path, dtype, text_path, context, stride, reference_path, as_json, adapter_path,
                 **task_kwargs):
    """Perplexity of a model on a text (sliding window), bits per byte, and optionally its
    divergence from a reference model on the same text; or (--tasks) its accuracy on lm-eval's
    tasks, scored as lm-eval's Hugging Face backend scores them for Apple's runs, optionally
    against a reference model item by item.

    \b
    mlx-openelm eval --model ./openelm-270m-4bit --text wiki.txt --reference apple/OpenELM-270M
    mlx-openelm eval --model apple/OpenELM-270M --tasks paper-zeroshot
    mlx-openelm eval --model ./q4 --tasks arc_easy,piqa --reference ./float --limit 500
    """
    if (text_path is None) == (task_kwargs["tasks"] is None):
        raise click.UsageError("give either --text FILE (perplexity) or --tasks NAMES (task accuracy)")
    if task_kwargs["tasks"] is not None:
        from .evaluate_tasks_cli import run_task_command

        return run_task_command(model_path, tokenizer_path, dtype, adapter_path, reference_path, as_json,
                                **task_kwargs)
    text_eval(model_path, tokenizer_path, dtype, text_path, context, stride, reference_path, as_json, adapter_path)


def text_eval(model_path, tokenizer_path, dtype, text_path, context, stride, reference_path, as_json, adapter_path):
    """The perplexity evaluation of `--text`."""
    stride = stride or max(1, context // 2)
    if stride >= context:
        raise click.BadParameter(f"{stride} must be less than --context {context}", param_hint="'--stride'")
    from .evaluate import evaluate
    from .hub import resolve_model_path
    from .loading import load_model

    text = read_text(text_path)
    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype, quiet=as_json, adapter_path=adapter_path)
    reference = None
    if reference_path is not None:
        if not as_json:
            note(f"Loading reference {reference_path} ...")
        reference = load_model(resolve_model_path(reference_path), dtype="float32")
        if reference.args.vocab_size != model.args.vocab_size:
            raise click.ClickException(f"--reference: vocabulary of {reference.args.vocab_size} tokens, "
                                       f"--model has {model.args.vocab_size}; they cannot be compared")

    tokens = tokenizer.encode(text)
    if len(tokens) < 2:
        raise click.ClickException(f"{text_path}: no text to score (a text needs at least one token)")
    with click.progressbar(length=max(len(tokens) - 1, 1), label="scoring", file=sys.stderr, show_pos=True) as bar:
        result = evaluate(model, tokens, context=context, stride=stride, reference=reference,
                          num_bytes=len(text.encode("utf-8")), progress=lambda done, _total: bar.update(done - bar.pos))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_result(result.to_dict()))
