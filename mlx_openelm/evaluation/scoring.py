"""Log-likelihood scoring of (context, continuation) pairs, exact to lm-eval's Hugging Face backend.

The rules (lm-eval's `TemplateLM` and `HFLM._loglikelihood_tokens`, with Apple's `add_bos_token=True`):
the context's trailing spaces move to the continuation; the context is encoded with BOS and the
continuation is `encode(ctx + cont)[len(encode(ctx)):]`; an empty context is the one prefix token
(EOS in the lm-eval Apple ran, BOS in today's); a pair longer than the model's context is
left-truncated, the model reading `(ctx + cont)[-(max_len + 1):][:-1]`; log-softmax in float32,
and `is_greedy` when every argmax is the continuation's token.

Fast paths, each giving the same numbers: requests are sorted by length and batched (right-padded:
in a causal model padding after every real token changes none of them); requests that read the same
tokens (one-token answers such as MMLU's " A"/" B"/" C"/" D") share one row; with `share_prefixes`,
the context shared by several continuations (HellaSwag's four endings) is read once, and the
continuations are scored as a batch from copies of its KV cache.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, NamedTuple, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from ..errors import OptionError
from ..model import make_cache

Progress = Callable[[int, int], None]  # (requests scored so far, requests to score)
BatchSize = Union[int, str]

EMPTY_CONTEXT_TOKENS = ("eos", "bos")  # eos: the lm-eval Apple ran (dc90fec); bos: today's lm-eval
AUTO_TOKENS = 8192  # `batch_size="auto"`: rows per forward so that rows x padded length stays under this
HEAD_ROWS = 1024  # positions whose vocabulary-wide logits exist at once (1024 x 49152 float32: 200 MB)
# A forward's padding stays within the cost of one more forward: on this CPU a forward's fixed cost
# (reading the weights) is about that of 32 tokens, and a padded position costs as much as a real one
# (docs/accuracy.md, "Where the time goes").
FORWARD_TOKENS = 32


def check_batch_size(value: BatchSize) -> BatchSize:
    """A positive number of rows per forward, or "auto" (a budget of tokens per forward)."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(value).strip() != str(number):
        raise OptionError(f"batch size must be a positive whole number or 'auto', got {value!r}")
    return number


def check_empty_context(value: str) -> str:
    if value not in EMPTY_CONTEXT_TOKENS:
        raise OptionError(f"empty-context token must be one of {', '.join(EMPTY_CONTEXT_TOKENS)}, got {value!r}")
    return value


def encode_pair(tokenizer, context: str, continuation: str, empty_context: str = "eos") -> tuple[list, list]:
    """(context ids, continuation ids) as lm-eval's HF backend encodes them with BOS."""
    if context == "":
        prefix = tokenizer.eos_id if empty_context == "eos" else tokenizer.bos_id
        continuation_ids = tokenizer.encode(continuation, add_bos=False)
        if continuation_ids and continuation_ids[0] == prefix:  # lm-eval: a continuation starting with it
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_bos=True)  # whatever the folder's add_bos_token says
    context_ids = tokenizer.encode(context, add_bos=True)
    return context_ids, whole[len(context_ids):]


class Scores(list):
    """`[(logprob, is_greedy)]`, one per request in order; `truncated` counts the requests left-truncated."""

    truncated: int = 0


class _Request(NamedTuple):
    inputs: tuple  # the tokens the model reads
    targets: tuple  # the continuation: predicted by the last len(targets) inputs


def _prepare(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int) -> tuple[list, int]:
    requests, truncated = [], 0
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise OptionError(f"request {i}: the context and the continuation need at least one token each")
        if len(continuation) > max_length:
            raise OptionError(f"request {i}: a continuation of {len(continuation)} tokens does not fit the "
                              f"model's context of {max_length}")
        whole = list(context) + list(continuation)
        truncated += len(whole) > max_length + 1
        requests.append(_Request(tuple(whole[-(max_length + 1):][:-1]), tuple(continuation)))
    return requests, truncated


def score(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: BatchSize = "auto",
          share_prefixes: bool = True, empty_context: str = "eos", progress: Optional[Progress] = None) -> Scores:
    """`[(logprob, is_greedy)]` of each (context, continuation) text pair, by lm-eval's rules (module docstring).

    `batch_size`: rows per forward, or "auto" (about `AUTO_TOKENS` tokens per forward). `share_prefixes`:
    read a context shared by several continuations once (False: every row reads its whole input; the
    numbers agree to float rounding). `empty_context`: the token an empty context becomes, "eos" (the
    lm-eval of Apple's paper runs) or "bos" (lm-eval today).
    """
    check_empty_context(empty_context)
    pairs = [encode_pair(tokenizer, context, continuation, empty_context) for context, continuation in requests]
    return score_tokens(model, pairs, batch_size=batch_size, share_prefixes=share_prefixes, progress=progress)


def score_tokens(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: BatchSize = "auto",
                 share_prefixes: bool = True, progress: Optional[Progress] = None) -> Scores:
    """`score` on already encoded (context ids, continuation ids) pairs (lm-eval's `_loglikelihood_tokens`)."""
    batch_size = check_batch_size(batch_size)
    requests, truncated = _prepare(pairs, model.args.max_context_length)
    results: list = [None] * len(requests)
    done = [0]

    def finish(indices, values):
        for i, value in zip(indices, values):
            results[i] = value
        done[0] += len(indices)
        if progress is not None:
            progress(done[0], len(requests))

    plain = list(range(len(requests)))
    if share_prefixes:
        groups, plain = _prefix_groups(requests)
        for chunk in _chunks(groups, batch_size, lambda g: (len(g[0]) + _suffix_width(requests, g[1]),
                                                            len(_unique_suffixes(requests, g[1])), len(g[0]))):
            for indices, values in _score_shared(model, requests, chunk, batch_size):
                finish(indices, values)
    rows = _unique_rows(requests, plain)
    for chunk in _chunks(rows, batch_size, lambda row: (len(row[0]), 1, len(row[0]))):
        finish(*_score_plain(model, requests, chunk))
    scores = Scores(results)
    scores.truncated = truncated
    return scores


# ---- batching ----------------------------------------------------------------------------------

def _unique_rows(requests: list, indices: Sequence[int]) -> list[tuple[tuple, list]]:
    """(inputs, [request indices]) for each distinct input, longest first (lm-eval's order)."""
    rows = defaultdict(list)
    for i in indices:
        rows[requests[i].inputs].append(i)
    return sorted(rows.items(), key=lambda row: (-len(row[0]), row[0]))


def _prefix_groups(requests: list) -> tuple[list[tuple[tuple, list]], list[int]]:
    """(prefix, [request indices]) for prefixes that two or more requests share, and the other requests."""
    groups = defaultdict(list)
    for i, request in enumerate(requests):
        groups[request.inputs[: len(request.inputs) - len(request.targets)]].append(i)
    shared, alone = [], []
    for prefix, members in groups.items():
        if prefix and len(_unique_suffixes(requests, members)) > 1:
            shared.append((prefix, members))
        else:
            alone += members
    return sorted(shared, key=lambda group: (-len(group[0]), group[0])), alone


def _unique_suffixes(requests: list, members: Sequence[int]) -> dict:
    suffixes = defaultdict(list)
    for i in members:
        suffixes[requests[i].inputs[-len(requests[i].targets):]].append(i)
    return suffixes


def _suffix_width(requests: list, members: Sequence[int]) -> int:
    return max(len(requests[i].targets) for i in members)


def _chunks(items: list, batch_size: BatchSize, size: Callable):
    """Consecutive runs of `items` of at most `batch_size` rows (auto: about AUTO_TOKENS tokens); at least one item.

    `size(item)` is (padded length it needs, rows it adds, length it is padded from); items come longest
    first, so the first sets the length. A run also ends before an item that would take the run's padding
    past FORWARD_TOKENS positions (a padded position costs a real one; a new forward, about that many).
    """
    chunk, rows, width, top, padding = [], 0, 0, 0, 0
    for item in items:
        length, n, own = size(item)
        new_width = max(width, length)
        full = (rows + n > batch_size) if batch_size != "auto" else (rows + n) * new_width > AUTO_TOKENS
        if chunk and (full or padding + top - own > FORWARD_TOKENS):
            yield chunk
            chunk, rows, new_width = [], 0, length
        if not chunk:
            top, padding = own, 0
        padding += top - own
        chunk.append(item)
        rows, width = rows + n, new_width
    if chunk:
        yield chunk


# ---- the forward passes ------------------------------------------------------------------------

def _hidden(model, tokens: mx.array, cache=None, mask=None) -> mx.array:
    """The decoder's final hidden states (before the head, which runs only where a score is needed)."""
    h = model.embed(tokens)
    for i in range(len(model.layers)):
        h = model.run_layer(i, h, None if cache is None else cache[i], mask)
    return h


def _pad(rows: Sequence[Sequence[int]], width: int, left: bool = False) -> mx.array:
    padded = np.zeros((len(rows), width), dtype=np.int32)
    for r, row in enumerate(rows):
        if row:
            if left:
                padded[r, width - len(row):] = row
            else:
                padded[r, : len(row)] = row
    return mx.array(padded)


def _gather_scores(model, hidden: mx.array, spans: list[tuple[int, int, tuple]]) -> list[tuple[float, bool]]:
    """Scores of continuations at flat positions `hidden.reshape(-1, D)[start : start + len(targets)]`."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    positions = np.concatenate([np.arange(start, start + len(targets)) for start, _, targets in spans])
    targets = mx.array(np.concatenate([np.asarray(targets) for _, _, targets in spans]).astype(np.int32))
    positions = mx.array(positions.astype(np.int32))
    picked, greedy = [], []
    for at in range(0, positions.size, HEAD_ROWS):  # the vocabulary-wide logits of HEAD_ROWS positions at a time
        logits = model.head(flat[positions[at: at + HEAD_ROWS]]).astype(mx.float32)
        rows = targets[at: at + HEAD_ROWS]
        # log_softmax at the targets only: the vocabulary-wide subtraction is skipped (on this CPU
        # a pass over the vocabulary costs about as much as the head's matrix product)
        picked.append(mx.take_along_axis(logits, rows[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1))
        greedy.append(logits.argmax(axis=-1) == rows)
        mx.eval(picked[-1], greedy[-1])
    picked = np.concatenate([np.array(p, dtype=np.float64) for p in picked])
    greedy = np.concatenate([np.array(g) for g in greedy])
    out, at = [], 0
    for _, _, span_targets in spans:
        n = len(span_targets)
        out.append((float(picked[at: at + n].sum()), bool(greedy[at: at + n].all())))
        at += n
    return out


def _score_plain(model, requests: list, chunk: list[tuple[tuple, list]]):
    """One right-padded forward over the chunk's rows (each row: one input, the requests reading it)."""
    width = len(chunk[0][0])
    hidden = _hidden(model, _pad([inputs for inputs, _ in chunk], width))
    spans, indices = [], []
    for r, (inputs, members) in enumerate(chunk):
        for i in members:
            targets = requests[i].targets
            spans.append((r * width + len(inputs) - len(targets), i, targets))
            indices.append(i)
    return indices, _gather_scores(model, hidden, spans)


def _score_shared(model, requests: list, chunk: list[tuple[tuple, list]], batch_size: BatchSize):
    """Read the chunk's prefixes once (left-padded), then their continuations (right-padded) in batches of
    similar length, each row from a copy of its prefix's KV rows. Yields (request indices, scores) per batch."""
    prefixes = [prefix for prefix, _ in chunk]
    width = max(len(p) for p in prefixes)
    pads = np.array([width - len(p) for p in prefixes])
    cache = make_cache(model)
    keys = np.arange(width)
    mask = None
    if pads.any():
        real = (keys[None, None, :] >= pads[:, None, None]) | np.eye(width, dtype=bool)[None]  # padding sees itself
        mask = mx.array(((keys[None, :] <= keys[:, None])[None] & real)[:, None])
    _hidden(model, _pad(prefixes, width, left=True), cache, mask)
    mx.eval([layer.state for layer in cache])  # only the keys and values: the prefix's outputs are never read
    suffix_rows = [(suffix, readers, g) for g, (_, members) in enumerate(chunk)
                   for suffix, readers in _unique_suffixes(requests, members).items()]
    suffix_rows.sort(key=lambda row: -len(row[0]))
    for rows in _chunks(suffix_rows, batch_size, lambda row: (width + len(row[0]), 1, len(row[0]))):
        yield _score_suffixes(model, requests, cache, pads, rows)


def _score_suffixes(model, requests: list, cache: list, pads: np.ndarray, rows: list[tuple[tuple, list, int]]):
    """One forward over continuations `rows` (suffix, readers, prefix row), from copies of the prefix cache."""
    width, suffix_width = cache[0].offset, len(rows[0][0])
    row_group = np.array([g for _, _, g in rows])
    rows_cache = [layer.take(mx.array(row_group, dtype=mx.int32), room=suffix_width) for layer in cache]
    mask = None  # right padding needs none: the causal mask keeps every real position from the padding after it
    if pads[row_group].any():
        queries = np.arange(suffix_width)
        sees_prefix = np.arange(width)[None, None, :] >= pads[row_group][:, None, None]
        sees_prefix = np.broadcast_to(sees_prefix, (len(rows), suffix_width, width))
        sees_suffix = np.broadcast_to(queries[None, :] <= queries[:, None], (len(rows), suffix_width, suffix_width))
        mask = mx.array(np.concatenate([sees_prefix, sees_suffix], axis=-1)[:, None])
    hidden = _hidden(model, _pad([suffix for suffix, _, _ in rows], suffix_width), rows_cache, mask)
    spans, indices = [], []
    for r, (suffix, readers, _) in enumerate(rows):
        for i in readers:
            targets = requests[i].targets
            spans.append((r * suffix_width + len(suffix) - len(targets), i, targets))
            indices.append(i)
    return indices, _gather_scores(model, hidden, spans)
