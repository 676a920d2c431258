"""The speculative-decoding options of `generate`, `chat` and `serve` (`--draft-model`,
`--num-draft-tokens`, `--prompt-lookup`), and how their statistics print."""

from __future__ import annotations

from typing import Optional

import click

from .cli_common import apply_options
from .drafting import LOOKUP_MIN_NGRAM, LOOKUP_NGRAM, SINGLE_STREAM_LOOKUP


def speculative_options(single_stream: bool):
    """`--draft-model`, `--num-draft-tokens` and `--prompt-lookup` (speculative decoding). With
    `single_stream` (generate, chat) prompt lookup is on unless asked otherwise or a draft model is given
    (`drafting.SINGLE_STREAM_LOOKUP`); the server, which decodes many streams in one batch, keeps it off."""
    default = f"{SINGLE_STREAM_LOOKUP}, 0 with --draft-model" if single_stream else "0"
    return lambda fn: apply_options([
        click.option("--draft-model", "draft_path", default=None, metavar="PATH_OR_REPO",
                     help="A smaller OpenELM, or a quantized copy of --model, drafting tokens that the model "
                          "verifies in one pass (speculative decoding: the same output, faster when drafts "
                          "are accepted)."),
        click.option("--num-draft-tokens", type=click.IntRange(min=1), default=3, show_default=True,
                     help="Most tokens the draft model proposes per verification pass (fewer while rejected)."),
        click.option("--prompt-lookup", type=click.IntRange(min=0), default=None if single_stream else 0,
                     metavar="N",
                     help="Propose up to N tokens copied from the context after its longest earlier match of "
                          f"{LOOKUP_MIN_NGRAM} to {LOOKUP_NGRAM} tokens (prompt lookup decoding: the same output, "
                          "faster where the reply "
                          "copies its input; drafting pauses while proposals are rejected). 0: off. "
                          f"[default: {default}]"),
    ], fn)


def load_speculative(draft_path, num_draft_tokens: int, prompt_lookup: Optional[int], dtype, quiet: bool = False):
    """The `SpeculativeOptions` of the speculative options, loading the draft model (the library
    checks it against the model where the two meet). `prompt_lookup` None: the single-stream default."""
    from .speculative import SpeculativeOptions

    if draft_path and prompt_lookup:
        raise click.UsageError("--draft-model and --prompt-lookup are two ways to propose tokens; pick one")
    if prompt_lookup is None:
        prompt_lookup = 0 if draft_path else SINGLE_STREAM_LOOKUP
    draft = None
    if draft_path:
        from .hub import resolve_model_path
        from .loading import load_model

        if not quiet:
            click.echo(f"Loading draft model {draft_path} ...", err=True)
        draft = load_model(resolve_model_path(draft_path), dtype=dtype)
    return SpeculativeOptions(draft_model=draft, num_draft_tokens=num_draft_tokens, prompt_lookup=prompt_lookup)


def format_speculative(response) -> str:
    """'drafts: 45/60 accepted (75%), 0.41 target passes/token' for a finished generation."""
    rate = f" ({response.acceptance_rate:.0%})" if response.acceptance_rate is not None else ""
    return (f"drafts: {response.accepted_tokens}/{response.drafted_tokens} accepted{rate}, "
            f"{passes_per_token(response):.2f} target passes/token")


def passes_per_token(response) -> float:
    return response.target_forward_passes / response.generation_tokens


def speculative_fields(response) -> dict:
    """The speculative-decoding statistics for `--json` (plain decoding: nothing drafted, 1 pass a token)."""
    return {
        "drafted_tokens": response.drafted_tokens,
        "accepted_tokens": response.accepted_tokens,
        "acceptance_rate": response.acceptance_rate,
        "target_forward_passes": response.target_forward_passes,
        "target_passes_per_token": passes_per_token(response),
    }
