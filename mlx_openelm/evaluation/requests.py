"""lm-eval's two other request types, without lm-eval: rolling log-likelihood and greedy generation.

`loglikelihood_rolling` scores each token of a text once, as lm-eval's Hugging Face backend does
(`get_rolling_token_windows` with `context_len=1`, then `make_disjoint_window`): the windows are
`evaluate.sliding_windows` of `max_length + 1` tokens every `max_length`, the last one reaching back
a full context, and they are scored as (context, continuation) pairs by the batched core.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..evaluate import Window, sliding_windows
from ..stopping import normalize_stops
from .scoring import BatchSize, Progress, check_empty_context, score_tokens


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[tuple[list, list]]:
    """(context ids, continuation ids) windows predicting every token of `tokens` once (lm-eval's rule)."""
    sequence = [prefix_token] + list(tokens)
    windows = [Window(max(0, w.end - max_length - 1), w.end, w.first)
               for w in sliding_windows(len(sequence), max_length + 1, max_length)]
    return [(sequence[w.begin: w.first], sequence[w.first: w.end]) for w in windows]


def loglikelihood_rolling(model, tokenizer, texts: Sequence[str], empty_context: str = "eos",
                          batch_size: BatchSize = "auto", progress: Optional[Progress] = None) -> list[float]:
    """Summed log-likelihood of each text (BOS first), every token predicted once.

    The first window starts from the `empty_context` token ("eos", the lm-eval of Apple's runs, or "bos").
    """
    check_empty_context(empty_context)
    prefix = tokenizer.eos_id if empty_context == "eos" else tokenizer.bos_id
    max_length = model.args.max_context_length
    pairs, owners = [], []
    for t, text in enumerate(texts):
        windows = rolling_windows(tokenizer.encode(text, add_bos=True), prefix, max_length)
        pairs += windows
        owners += [t] * len(windows)
    totals = [0.0] * len(texts)
    for owner, (logprob, _) in zip(owners, score_tokens(model, pairs, batch_size=batch_size, progress=progress)):
        totals[owner] += logprob
    return totals


def generate_until(model, tokenizer, context: str, until: Sequence[str] = (), max_gen_toks: int = 256) -> str:
    """Greedy completion of `context` (BOS first), cut before the first of the `until` strings or at EOS.

    The context is left-truncated to leave room for `max_gen_toks` tokens, as lm-eval's backend does.
    """
    from ..generation import stream_generate

    max_gen_toks = max(1, min(int(max_gen_toks), model.args.max_context_length - 1))
    ids = tokenizer.encode(context, add_bos=True)[-(model.args.max_context_length - max_gen_toks):]
    stops = normalize_stops([u for u in until if u])  # lm-eval may pass "" (no stop)
    return "".join(r.text for r in stream_generate(model, tokenizer, ids, max_tokens=max_gen_toks,
                                                   stop=stops or None))
