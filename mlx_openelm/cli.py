"""The `mlx-openelm` command line.

Subcommands live in their own modules and are imported only when run, and no
module here imports MLX at import time, so `mlx-openelm --help` is instant.
"""

from __future__ import annotations

import functools
import importlib
import sys

import click

# name -> "module:function"; each module imports MLX inside its command body only.
COMMANDS = {
    "generate": "mlx_openelm.cli:generate_command",
    "chat": "mlx_openelm.cli:chat_command",
    "convert": "mlx_openelm.convert.cli:convert",
    "bench": "mlx_openelm.bench.cli:bench",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


def user_errors(fn):
    """Turn mlx-openelm's own errors (and bad values) into a one-line `Error:` and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import OpenELMError

        try:
            return fn(*args, **kwargs)
        except (OpenELMError, ValueError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-openelm")
def main():
    """Run Apple's OpenELM models with MLX: generate, chat, convert, bench."""


def sampling_options(fn):
    """The sampling flags shared by `generate` and `chat`."""
    options = [
        click.option("--max-tokens", "-m", type=click.IntRange(min=0), default=256, show_default=True,
                     help="Most tokens to generate."),
        click.option("--temp", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Sampling temperature; 0 is greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Keep the k most likely tokens (0: off)."),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0,
                     show_default=True, help="Nucleus sampling mass (1: off)."),
        click.option("--min-p", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0,
                     show_default=True, help="Drop tokens below min-p times the top probability (0: off)."),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.2,
                     show_default=True, help="Hugging Face repetition penalty (Apple recommends 1.2; 1: off)."),
        click.option("--seed", type=int, default=None, help="Seed for sampling."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def model_options(fn):
    options = [
        click.option("--model", "model_path", required=True,
                     help="Model folder (HF OpenELM or converted MLX) or Hugging Face repo id "
                          "(apple/OpenELM-270M-Instruct, fetched once into the HF cache)."),
        click.option("--tokenizer", "tokenizer_path", default=None,
                     help="Llama-2 tokenizer.model, a folder holding it, or a repo id (default: the model "
                          "folder's, else $MLX_OPENELM_TOKENIZER_REPO or NousResearch/Llama-2-7b-hf)."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="Compute dtype (default: float32 on CPU; bfloat16/float16 on GPU)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def make_generation_kwargs(temp, top_k, top_p, min_p, repetition_penalty, seed) -> dict:
    from .sampling import make_logits_processors, make_sampler

    return {
        "sampler": make_sampler(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed),
        "logits_processors": make_logits_processors(repetition_penalty),
    }


def load_model_and_tokenizer(model_ref, tokenizer_ref, dtype, quiet: bool = False):
    """Resolve `--model` / `--tokenizer` (paths or Hugging Face repo ids) and load both."""
    from .loading import load

    def log(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    log(f"Loading {model_ref} ...")
    return load(model_ref, tokenizer=tokenizer_ref, dtype=dtype, log=log)


def format_memory(gigabytes: float) -> str:
    return f"{gigabytes:.2f} GB" if gigabytes >= 1 else f"{gigabytes * 1000:.1f} MB"


def format_stats(response) -> str:
    return (
        f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tok/s | "
        f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tok/s | "
        f"peak memory: {format_memory(response.peak_memory_gb)}"
    )


@click.command("generate")
@model_options
@click.option("--prompt", "-p", required=True, help="Prompt text, or '-' to read it from stdin.")
@click.option("--chat", "--chat-template", "chat", is_flag=True,
              help="Wrap the prompt in OpenELM-Instruct's chat format (a user turn, then the assistant's).")
@click.option("--system", "-s", default=None, help="System prompt for --chat (implies --chat).")
@sampling_options
@click.option("--quiet", "-q", is_flag=True, help="Print only the generated text.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text and statistics) at the end.")
@user_errors
def generate_command(model_path, tokenizer_path, dtype, prompt, chat, system, max_tokens, temp, top_k, top_p,
                     min_p, repetition_penalty, seed, quiet, as_json):
    """Generate text from a prompt, streaming it to stdout (statistics go to stderr)."""
    import json

    from .generation import stream_generate

    if prompt == "-":
        prompt = sys.stdin.read()
    kwargs = make_generation_kwargs(temp, top_k, top_p, min_p, repetition_penalty, seed)
    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype, quiet=quiet or as_json)
    if chat or system is not None:
        messages = [{"role": "system", "content": system}] if system else []
        prompt = tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}])

    pieces, last = [], None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        pieces.append(response.text)
        if not as_json:
            click.echo(response.text, nl=False)
            sys.stdout.flush()
        last = response
    if as_json:
        fields = {} if last is None else {
            "prompt_tokens": last.prompt_tokens,
            "prompt_tps": last.prompt_tps,
            "generation_tokens": last.generation_tokens,
            "generation_tps": last.generation_tps,
            "peak_memory_gb": last.peak_memory_gb,
            "finish_reason": last.finish_reason,
        }
        click.echo(json.dumps({"text": "".join(pieces), **fields}))
        return
    click.echo()
    if not quiet and last is not None:
        click.echo(format_stats(last) + f" | finish: {last.finish_reason}", err=True)


@click.command("chat")
@model_options
@click.option("--system", "-s", default=None, help="System prompt (kept when old turns are dropped).")
@sampling_options
@click.option("--quiet", "-q", is_flag=True, help="No loading message or statistics lines.")
@user_errors
def chat_command(model_path, tokenizer_path, dtype, system, max_tokens, temp, top_k, top_p, min_p,
                 repetition_penalty, seed, quiet):
    """Chat with an OpenELM-Instruct model in the terminal (or through a pipe, one message a line).

    Replies stream to stdout; statistics and notices go to stderr. Commands: /reset,
    /help, /exit (or Ctrl-D). Ctrl-C stops a reply and keeps the conversation.
    """
    from .chat import ChatSession, run_repl

    kwargs = make_generation_kwargs(temp, top_k, top_p, min_p, repetition_penalty, seed)
    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype, quiet=quiet)

    def notify(message: str) -> None:
        click.echo(click.style(message, dim=True), err=True)

    session = ChatSession(model, tokenizer, system=system, notify=notify)
    run_repl(session, max_tokens=max_tokens, quiet=quiet, **kwargs)


if __name__ == "__main__":
    main()
