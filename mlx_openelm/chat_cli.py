"""`mlx-openelm chat`: the terminal REPL around the library's `ChatSession`."""

from __future__ import annotations

import sys
from typing import TextIO

import click

from .cli_common import (
    adapter_option,
    chat_template_option,
    clean_prompt,
    echo_stream,
    load_model_and_tokenizer,
    make_generation_kwargs,
    model_options,
    note,
    sampling_options,
    sampling_settings,
    stop_option,
    user_errors,
)
from .constrain.cli import constraint_options, validate_constraint_options
from .speculative_cli import format_speculative, load_speculative, speculative_options

HELP = """Commands:
  /reset   start a new conversation (the system prompt stays)
  /help    show this help
  /exit    quit (Ctrl-D works too)
Ctrl-C stops a reply and keeps the conversation. Start a message with // to send a literal '/'."""


def _read_line(stdin: TextIO, interactive: bool) -> str | None:
    """One line of input, None at end of input."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line


def _command(session, text: str) -> bool:
    """Run a /command; False when it asks to quit."""
    command = text.split()[0].lower()
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        session.reset()
        note("[new conversation]")
    elif command == "/help":
        click.echo(HELP, err=True)
    else:
        note(f"unknown command {command}; /help lists the commands")
    return True


def _reply(session, text: str, max_tokens: int, quiet: bool, gen_kwargs: dict) -> None:
    """Stream one reply; Ctrl-C stops it and keeps the conversation."""
    from .errors import ContextLengthError

    gen_kwargs = dict(gen_kwargs)
    constraint = gen_kwargs.pop("constraint", None)  # a grammar processor serves one reply: a new one each
    if constraint is not None:
        gen_kwargs["logits_processors"] = [*gen_kwargs.get("logits_processors", []), constraint()]
    replies = session.send(text, max_tokens=max_tokens, **gen_kwargs)
    try:
        last = echo_stream(replies)
    except KeyboardInterrupt:
        replies.close()
        click.echo("")
        note("[interrupted: the reply so far stays in the conversation]")
        return
    except ContextLengthError as e:
        click.echo(click.style(f"Error: {e}", fg="red"), err=True)
        return
    click.echo("")
    speculative = session.speculative.enabled
    if last is not None and not quiet:
        note(
            f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"prompt: {session.last_prefill_tokens} new tokens, {last.prompt_tps:.1f} tok/s"
            f"{' | ' + format_speculative(last) if speculative else ''}"
            f"{_cut_note(session, last)}]"
        )


def _cut_note(session, last) -> str:
    if session.finish_reason != "length":
        return ""
    return " | cut: the model's context is full" if last.context_full else " | cut at the token limit"


def run_repl(
    session,
    max_tokens: int = 256,
    stdin: TextIO | None = None,
    interactive: bool | None = None,
    quiet: bool = False,
    **gen_kwargs,
) -> None:
    """Read messages and commands line by line, streaming `session`'s replies to stdout.

    Notices, statistics (unless `quiet`) and errors go to stderr; the `>>> ` prompt
    shows only when `interactive` (default: stdin is a terminal). Lines with bytes that
    are not UTF-8 are sent with U+FFFD in their place (said once). Returns at /exit or
    end of input.
    """
    stdin = stdin if stdin is not None else sys.stdin
    if interactive is None:
        interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - Windows
            pass
        note("Type a message and press Enter. /help lists the commands; /exit or Ctrl-D quits.")
    warned: set = set()
    while True:
        try:
            line = _read_line(stdin, interactive)
        except KeyboardInterrupt:
            if not interactive:
                return
            click.echo("", err=True)
            note("(/exit or Ctrl-D quits)")
            continue
        if line is None:
            if interactive:
                click.echo("", err=True)
            return
        text = clean_prompt(line.strip(), "a chat line", warned)
        if not text:
            continue
        if text.startswith("//"):
            text = text[1:]
        elif text.startswith("/"):
            if not _command(session, text):
                return
            continue
        _reply(session, text, max_tokens, quiet, gen_kwargs)


def _tolerant_stdin() -> None:
    """Keep undecodable input bytes as surrogate escapes (cleaned per line) instead of
    letting a UnicodeDecodeError end the chat."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")


@click.command("chat")
@model_options
@adapter_option
@chat_template_option
@click.option("--system", "-s", default=None, help="System prompt (kept when old turns are dropped).")
@sampling_options
@speculative_options(single_stream=True)
@stop_option
@constraint_options
@click.option("--quiet", "-q", is_flag=True, help="No loading message or statistics lines.")
@user_errors
def chat_command(model_path, tokenizer_path, dtype, system, max_tokens, temp, top_k, top_p, min_p,
                 repetition_penalty, seed, draft_path, num_draft_tokens, prompt_lookup, stop, json_schema, regex, grammar,
                 quiet, adapter_path, chat_template):
    """Chat with an instruction-tuned model in the terminal (or through a pipe, one message a line),
    in the model's chat template (OpenELM-Instruct's format where it has none); --json-schema, --regex
    or --grammar keep every reply inside a grammar.

    Replies stream to stdout; statistics and notices go to stderr. Commands: /reset,
    /help, /exit (or Ctrl-D). Ctrl-C stops a reply and keeps the conversation.
    """
    from .chat import ChatSession

    if system is not None:
        system = clean_prompt(system, "--system")
    spec = validate_constraint_options(json_schema, regex, grammar)
    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype, quiet=quiet, adapter_path=adapter_path,
                                                chat_template=chat_template)
    settings = sampling_settings(model_path, max_tokens, temp, top_k, top_p, repetition_penalty, spec is not None)
    max_tokens = settings["max_tokens"]
    kwargs = make_generation_kwargs(settings["temperature"], settings["top_k"], settings["top_p"], min_p,
                                    settings["repetition_penalty"], seed, stop)
    if spec is not None:
        from functools import partial

        from .constrain.processor import make_constraint

        kwargs["constraint"] = partial(make_constraint, tokenizer, spec=spec, vocab_size=model.args.vocab_size)
        kwargs["constraint"]()  # compile errors now, before the first line is read
    speculative = load_speculative(draft_path, num_draft_tokens, prompt_lookup, dtype, quiet)
    session = ChatSession(model, tokenizer, system=system, notify=note, speculative=speculative)
    _tolerant_stdin()
    run_repl(session, max_tokens=max_tokens, quiet=quiet, **kwargs)
