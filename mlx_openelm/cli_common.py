"""Click helpers shared by the `mlx-openelm` subcommands.

Error translation (`user_errors`), the model and sampling options, loading with a log
line, the statistics line, the streaming echo loop, prompt cleaning and the display
of library warnings. Nothing here imports MLX at import time.
"""

from __future__ import annotations

import functools
import re
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import click

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


# ---- errors and notes ------------------------------------------------------------

def note(message: str) -> None:
    """A dim one-line notice on stderr."""
    click.echo(click.style(message, dim=True), err=True)


def os_error_message(error: OSError) -> str:
    """'PATH: reason' for an OS error (the path the user gave, the system's reason)."""
    reason = error.strerror or str(error)
    if error.filename is None:
        return reason
    return f"{error.filename}: {reason}"


def user_errors(fn):
    """Turn mlx-openelm's own errors, bad values and OS errors on a named file into a
    one-line `Error:` and exit 1. Library warnings show as one-line `warning:` notes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import OpenELMError

        show_warnings()
        try:
            return fn(*args, **kwargs)
        except (OpenELMError, ValueError) as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if e.filename is None:  # not about a file the user named: a real bug, keep the traceback
                raise
            raise click.ClickException(os_error_message(e)) from None

    return wrapper


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def show_warnings() -> None:
    """Show `OpenELMWarning`s as one-line `warning: ...` notes on stderr, each once.

    Installed process-wide (the CLI owns the process); other warnings keep Python's format.
    """
    from .errors import OpenELMWarning

    if getattr(warnings.formatwarning, "_mlx_openelm", False):
        return
    plain = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, OpenELMWarning):
            return _format_warning(message, category, filename, lineno, line)
        return plain(message, category, filename, lineno, line)

    formatwarning._mlx_openelm = True
    warnings.formatwarning = formatwarning
    warnings.filterwarnings("once", category=OpenELMWarning)


def check_output_path(path: str | None, option: str) -> Path | None:
    """Fail before any work when `path` cannot be written: its folder must exist and be
    writable, and the path must not be a folder. Returns the path (None stays None)."""
    import os

    if path is None:
        return None
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    problem = None
    if target.is_dir():
        problem = "is a folder"
    elif not parent.is_dir():
        problem = f"folder {parent} does not exist" if not parent.exists() else f"{parent} is not a folder"
    elif target.exists() and not target.is_file():
        problem = "is not a regular file"
    elif not os.access(parent if not target.exists() else target, os.W_OK):
        problem = "permission denied (not writable)"
    if problem:
        raise click.BadParameter(f"{path}: {problem}", param_hint=f"'{option}'")
    return target


# ---- prompts ----------------------------------------------------------------------

def clean_prompt(text: str, where: str, warned: set | None = None) -> str:
    """`text` with undecodable bytes (surrogate escapes, lone surrogates) replaced by U+FFFD;
    says so once per `where` (on stderr) when anything was replaced."""
    text, replaced = _replace_invalid(text)
    if replaced:
        seen = warned if warned is not None else set()
        if where not in seen:
            seen.add(where)
            click.echo(f"warning: {where} is not valid UTF-8; invalid bytes replaced with U+FFFD", err=True)
    return text


def _replace_invalid(text: str) -> tuple[str, bool]:
    # Python keeps undecodable bytes as lone surrogates (argv, surrogateescape streams);
    # each becomes U+FFFD. TODO: tokenizer.clean_text once the core helper lands it.
    cleaned = _SURROGATES.sub("\ufffd", text)
    return cleaned, cleaned != text


_SURROGATES = re.compile("[\ud800-\udfff]")


def read_stdin() -> str:
    """All of stdin as text; invalid UTF-8 survives as surrogate escapes for `clean_prompt`."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    return data.decode("utf-8", errors="surrogateescape") if isinstance(data, bytes) else data


# ---- options ----------------------------------------------------------------------

def _apply(options, fn):
    for option in reversed(options):
        fn = option(fn)
    return fn


def sampling_options(fn):
    """The sampling flags shared by `generate` and `chat`."""
    return _apply([
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
    ], fn)


def model_options(fn):
    """`--model`, `--tokenizer` and `--dtype`."""
    return _apply([
        click.option("--model", "model_path", required=True,
                     help="Model folder (HF OpenELM or converted MLX) or Hugging Face repo id "
                          "(apple/OpenELM-270M-Instruct, fetched once into the HF cache)."),
        click.option("--tokenizer", "tokenizer_path", default=None,
                     help="Llama-2 tokenizer.model, a folder holding it, or a repo id (default: the model "
                          "folder's, else $MLX_OPENELM_TOKENIZER_REPO or NousResearch/Llama-2-7b-hf)."),
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                     help="Compute dtype (default: float32 on CPU; bfloat16/float16 on GPU)."),
    ], fn)


def make_generation_kwargs(temp, top_k, top_p, min_p, repetition_penalty, seed) -> dict:
    """`sampler` and `logits_processors` for `stream_generate` from the sampling options."""
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


# ---- output -----------------------------------------------------------------------

def format_memory(gigabytes: float) -> str:
    return f"{gigabytes:.2f} GB" if gigabytes >= 1 else f"{gigabytes * 1000:.1f} MB"


def format_stats(response) -> str:
    """The statistics line of a finished generation."""
    return (
        f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tok/s | "
        f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tok/s | "
        f"peak memory: {format_memory(response.peak_memory_gb)}"
    )


def echo_stream(responses: Iterable, echo: bool = True, pieces: list | None = None):
    """Stream each response's text to stdout as it comes (unless `echo` is false),
    collecting the texts in `pieces`; returns the last response (None if there was none)."""
    last = None
    for response in responses:
        if pieces is not None:
            pieces.append(response.text)
        if echo:
            click.echo(response.text, nl=False)
            sys.stdout.flush()
        last = response
    return last
