"""Click helpers shared by the `mlx-openelm` subcommands.

Error translation (`user_errors`), the model and sampling options, loading with a log
line, the statistics line, the streaming echo loop, prompt cleaning and the display
of library warnings. Nothing here imports MLX at import time.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import click

from .signals import signals_as_exit

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


# ---- errors, warnings, signals and notes ------------------------------------------------------------

def note(message: str) -> None:
    """A dim one-line notice on stderr."""
    click.echo(click.style(message, dim=True), err=True)


def os_error_message(error: OSError) -> str:
    """'PATH: reason' for an OS error (the path the user gave, the system's reason)."""
    reason = error.strerror or str(error)
    if error.filename is None:
        return reason
    return f"{error.filename}: {reason}"


# A write with no file named that fails for want of space is the output (stdout) filling a disk:
# the user's environment, not a bug.
OUTPUT_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the buffered text cannot fail again at exit (as Python's docs advise)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


_LEADING_NAME = re.compile(r"^(\w+):")
_QUOTED_NAME = re.compile(r"`(\w+)(?:=([^`]*))?`")


def _flag(param: click.Parameter) -> str:
    return next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])


def as_flags(message: str) -> str:
    """A library message as the command's user reads it. Library errors name the parameters of the
    call, never flags: the one at fault leads (`mlx_path: ...`), others are quoted (`force=True`,
    `batch_size=4`, `average`); here each that is an option of the running command becomes its flag
    (`--mlx-path: ...`, `--force`, `--batch-size 4`, `--average`). Other text stays as it is."""
    context = click.get_current_context(silent=True)
    if context is None:
        return message
    flags = {p.name: _flag(p) for p in context.command.params if isinstance(p, click.Option)}

    def quoted(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if name not in flags:
            return match.group(0)
        return flags[name] if value in (None, "True") else f"{flags[name]} {value}"

    leading = _LEADING_NAME.match(message)
    if leading and leading.group(1) in flags:
        message = flags[leading.group(1)] + message[leading.end(1):]
    return _QUOTED_NAME.sub(quoted, message)


def user_errors(fn):
    """Run a command the way every subcommand runs: mlx-openelm's own errors (bad files,
    keys, options, prompts) and OS errors on a named file become a one-line `Error:` and
    exit 1 (any other exception is a bug and keeps its traceback); library warnings
    show as one-line `warning:` notes; SIGTERM/SIGHUP end the command like an exception
    (`signals.signals_as_exit`: cleanup runs, exit status 128 + signal number, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import OpenELMError

        with warnings_as_notes(), signals_as_exit():
            try:
                return fn(*args, **kwargs)
            except OpenELMError as e:
                raise click.ClickException(as_flags(str(e))) from None
            except OSError as e:
                if e.filename is None and e.errno in OUTPUT_FULL_ERRNOS:  # stdout on a full disk or /dev/full
                    _silence_stdout()
                    raise click.ClickException(f"cannot write the output: {e.strerror}") from None
                if e.filename is None:  # not about a file the user named: a real bug, keep the traceback
                    raise
                raise click.ClickException(os_error_message(e)) from None

    return wrapper


@contextlib.contextmanager
def warnings_as_notes():
    """Within the block, each distinct `OpenELMWarning` prints once as `warning: MESSAGE`
    on stderr (no source line); other warnings keep Python's format."""
    from .errors import OpenELMWarning

    with warnings.catch_warnings():
        plain = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, OpenELMWarning):
                click.echo(f"warning: {as_flags(str(message))}", err=True)
            else:
                plain(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("once", OpenELMWarning)
        yield


def check_output_path(path: str | None, option: str) -> Path | None:
    """Fail before any work when `path` cannot be written (missing or special folder,
    no permission, a folder in the way), by creating and removing a scratch file beside
    it: the real test, for root and read-only file systems too. None stays None."""
    import tempfile

    if path is None:
        return None
    target = Path(path)
    parent = target.parent
    try:
        if target.is_dir():
            raise IsADirectoryError(21, "is a folder", str(target))
        if not parent.is_dir():
            what = "is not a folder" if parent.exists() else "does not exist"
            raise FileNotFoundError(2, f"{parent} {what}", str(target))
        if target.exists() and not os.access(target, os.W_OK):  # a read-only file is not replaced by a rename
            raise PermissionError(13, "permission denied", str(target))
        if target.exists() and not target.is_file():  # a device such as /dev/null or /dev/stdout
            return target
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.", suffix=".check"):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise click.BadParameter(f"cannot write {path}: {reason}", param_hint=f"'{option}'") from None
    return target


# ---- prompts ----------------------------------------------------------------------

def clean_prompt(text: str, where: str, warned: set | None = None) -> str:
    """`text` with undecodable bytes (surrogate escapes, lone surrogates) replaced by U+FFFD;
    says so once per `where` (on stderr) when anything was replaced."""
    from .tokenizer import clean_text  # no MLX import

    text, replaced = clean_text(text)
    if replaced:
        seen = warned if warned is not None else set()
        if where not in seen:
            seen.add(where)
            click.echo(f"warning: {where} is not valid UTF-8; invalid bytes replaced with U+FFFD", err=True)
    return text


def read_stdin() -> str:
    """All of stdin as text; invalid UTF-8 survives as surrogate escapes for `clean_prompt`."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    return data.decode("utf-8", errors="surrogateescape") if isinstance(data, bytes) else data


# ---- options ----------------------------------------------------------------------

def apply_options(options, fn):
    for option in reversed(options):
        fn = option(fn)
    return fn


FOLDER_DEFAULT = "default: the model folder's generation_config.json, else "


def sampling_options(fn):
    """The sampling flags shared by `generate`, `chat` and `serve` (None: the folder's default, see
    `sampling_settings`)."""
    return apply_options([
        click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=None,
                     help=f"Most tokens to generate ({FOLDER_DEFAULT}256)."),
        click.option("--temp", type=click.FloatRange(min=0), default=None,
                     help=f"Sampling temperature; 0 is greedy ({FOLDER_DEFAULT}0)."),
        click.option("--top-k", type=click.IntRange(min=0), default=None,
                     help=f"Keep the k most likely tokens (0: off; {FOLDER_DEFAULT}0)."),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
                     help=f"Nucleus sampling mass (1: off; {FOLDER_DEFAULT}1)."),
        click.option("--min-p", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0,
                     show_default=True, help="Drop tokens below min-p times the top probability (0: off)."),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=None,
                     help=f"Hugging Face repetition penalty (1: off; {FOLDER_DEFAULT}1.2 for Apple's OpenELM, "
                          "1 for other models; 1 under --json-schema, --regex or --grammar)."),
        click.option("--seed", type=int, default=None, help="Seed for sampling."),
    ], fn)


def chat_template_option(fn):
    """`--chat-template FILE`: a Jinja chat template used instead of the tokenizer folder's."""
    return click.option("--chat-template", "chat_template", default=None, metavar="FILE",
                        type=click.Path(dir_okay=False),
                        help="Jinja chat template to use instead of the model's (chat_template.jinja or "
                             "tokenizer_config.json; OpenELM-Instruct's format where it has none).")(fn)


def sampling_settings(model_ref, max_tokens, temp, top_k, top_p, repetition_penalty, constrained=False) -> dict:
    """The sampling options with each one left out taken from the model folder's defaults
    (`read_generation_defaults`): explicit values always win; under a constraint the penalty is 1 unless given."""
    if constrained and repetition_penalty is None:  # penalised quotes, commas and keys steer a grammar's choices
        repetition_penalty = 1.0
    from .generation_config import read_generation_defaults
    from .hub import resolve_model_path

    defaults = read_generation_defaults(resolve_model_path(model_ref))
    given = {"max_tokens": max_tokens, "temperature": temp, "top_k": top_k, "top_p": top_p,
             "repetition_penalty": repetition_penalty}
    return {key: getattr(defaults, key) if value is None else value for key, value in given.items()}


def model_options(fn):
    """`--model`, `--tokenizer` and `--dtype`."""
    return apply_options([
        click.option("--model", "model_path", default=None,
                     help="Model folder (HF OpenELM or converted MLX) or Hugging Face repo id, fetched once "
                          "into the HF cache (default: apple/OpenELM-270M-Instruct)."),
        click.option("--tokenizer", "tokenizer_path", default=None,
                     help="tokenizer.model (Llama-2's SentencePiece) or tokenizer.json, a folder holding one, or "
                          "a repo id (default: the model folder's, tokenizer.model first, else "
                          "$MLX_OPENELM_TOKENIZER_REPO or NousResearch/Llama-2-7b-hf)."),
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                     help="Compute dtype (default: float32 on CPU; bfloat16/float16 on GPU)."),
    ], fn)


def adapter_option(fn):
    """`--adapter-path`: a fine-tuned adapter (ours or mlx-lm's) added to the model as it loads."""
    return click.option("--adapter-path", "adapter_path", default=None, type=click.Path(), metavar="DIR",
                        help="Adapter folder from `mlx-openelm lora` or mlx-lm (adapter_config.json + "
                             "adapters.safetensors) to apply to the model.")(fn)


def _nonempty_stops(ctx, param, value):
    if any(text == "" for text in value):
        raise click.BadParameter("an empty text would end every reply at once", ctx=ctx, param=param)
    return value


def stop_option(fn):
    """`--stop TEXT`, repeatable: generation ends before the first of these texts (not printed)."""
    return click.option("--stop", "stop", multiple=True, metavar="TEXT", callback=_nonempty_stops,
                        help="End the reply before this text, which is not printed (repeatable; "
                             "a newline: --stop $'\\n').")(fn)


def make_generation_kwargs(temp, top_k, top_p, min_p, repetition_penalty, seed, stop=()) -> dict:
    """`sampler`, `logits_processors` (and `stop`, from --stop) for `stream_generate` from the options."""
    from .sampling import make_logits_processors, make_sampler
    from .stopping import normalize_stops

    kwargs = {
        "sampler": make_sampler(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed),
        "logits_processors": make_logits_processors(repetition_penalty),
    }
    if stop:
        kwargs["stop"] = list(normalize_stops(stop))  # refused here, before chat waits for its first line
    return kwargs


def load_model_and_tokenizer(model_ref, tokenizer_ref, dtype, quiet: bool = False, adapter_path=None,
                             chat_template=None):
    """Resolve `--model` / `--tokenizer` (paths or Hugging Face repo ids; no model: the default) and load both,
    with the `--adapter-path` adapter and the `--chat-template` file if given."""
    from .loading import load

    def log(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    if model_ref is None:
        from .hub import DEFAULT_MODEL

        log(f"Loading {DEFAULT_MODEL} (the default; choose another with --model) ...")
    else:
        log(f"Loading {model_ref} ...")
    model, tokenizer = load(model_ref, tokenizer=tokenizer_ref, dtype=dtype, log=log, adapter_path=adapter_path,
                            chat_template=chat_template)
    if adapter_path is not None:
        log(f"Adapter {adapter_path} applied")
    return model, tokenizer


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


def format_finish(response) -> str:
    """Why generation ended: 'finish: stop', 'finish: length', or the full context said plainly."""
    if getattr(response, "context_full", False):
        return "finish: length (the model's context is full)"
    return f"finish: {response.finish_reason}"


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
