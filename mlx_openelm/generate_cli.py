"""`mlx-openelm generate`: one prompt, the reply streamed to stdout."""

from __future__ import annotations

import json

import click

from .cli_common import (
    adapter_option,
    chat_template_option,
    clean_prompt,
    echo_stream,
    format_finish,
    format_stats,
    load_model_and_tokenizer,
    make_generation_kwargs,
    model_options,
    read_stdin,
    sampling_options,
    sampling_settings,
    stop_option,
    user_errors,
)
from .constrain.cli import constraint_options, validate_constraint_options
from .speculative_cli import format_speculative, load_speculative, speculative_fields, speculative_options


def _json_fields(last) -> dict:
    if last is None:
        return {}
    return {
        "prompt_tokens": last.prompt_tokens,
        "prompt_tps": last.prompt_tps,
        "generation_tokens": last.generation_tokens,
        "generation_tps": last.generation_tps,
        "peak_memory_gb": last.peak_memory_gb,
        "finish_reason": last.finish_reason,
        "context_full": last.context_full,
        **speculative_fields(last),
    }


@click.command("generate")
@model_options
@adapter_option
@click.option("--prompt", "-p", required=True, help="Prompt text, or '-' to read it from stdin.")
@click.option("--chat", "chat", is_flag=True,
              help="Wrap the prompt in the model's chat template (a user turn, then the assistant's; "
                   "OpenELM-Instruct's format where the model has none).")
@chat_template_option
@click.option("--system", "-s", default=None, help="System prompt for --chat (implies --chat).")
@sampling_options
@speculative_options(single_stream=True)
@stop_option
@constraint_options
@click.option("--quiet", "-q", is_flag=True, help="Print only the generated text.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text and statistics) at the end.")
@user_errors
def generate_command(model_path, tokenizer_path, dtype, prompt, chat, chat_template, system, max_tokens, temp, top_k,
                     top_p, min_p, repetition_penalty, seed, draft_path, num_draft_tokens, prompt_lookup, stop,
                     json_schema, regex, grammar, quiet, as_json, adapter_path):
    """Generate text from a prompt, streaming it to stdout (statistics go to stderr). A plain prompt gets
    BOS first where the model's tokenizer adds one; --chat (implied by --system and --chat-template)
    wraps it in the chat template; --json-schema, --regex or --grammar keep the reply inside a grammar."""
    from .generation import stream_generate

    if prompt == "-":
        prompt = clean_prompt(read_stdin(), "the prompt (stdin)")
    else:
        prompt = clean_prompt(prompt, "--prompt")
    if system is not None:
        system = clean_prompt(system, "--system")
    constraint = validate_constraint_options(json_schema, regex, grammar)
    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype, quiet=quiet or as_json,
                                                adapter_path=adapter_path, chat_template=chat_template)
    settings = sampling_settings(model_path, max_tokens, temp, top_k, top_p, repetition_penalty, constraint is not None)
    max_tokens = settings["max_tokens"]
    kwargs = make_generation_kwargs(settings["temperature"], settings["top_k"], settings["top_p"], min_p,
                                    settings["repetition_penalty"], seed, stop)
    if constraint is not None:
        from .constrain.processor import make_constraint

        kwargs["logits_processors"].append(make_constraint(tokenizer, spec=constraint, vocab_size=model.args.vocab_size))
    speculative = load_speculative(draft_path, num_draft_tokens, prompt_lookup, dtype, quiet or as_json)
    kwargs["speculative"] = speculative
    if chat or system is not None or chat_template is not None:
        messages = [{"role": "system", "content": system}] if system else []
        prompt = tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}])

    pieces: list[str] = []
    responses = stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)
    last = echo_stream(responses, echo=not as_json, pieces=pieces)
    if as_json:
        click.echo(json.dumps({"text": "".join(pieces), **_json_fields(last)}))
        return
    click.echo()
    if not quiet and last is not None:
        drafts = f" | {format_speculative(last)}" if speculative.enabled else ""
        click.echo(f"{format_stats(last)}{drafts} | {format_finish(last)}", err=True)
