"""Speculative sampling end to end: the distributions the acceptance rule compares are the target's and
the draft's own, processed and filtered exactly as plain sampling would, with a history that includes
the proposals before each position (and so every accepted draft token)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm import generate_step, load_model, make_logits_processors, make_sampler, speculative
from mlx_openelm.sampling import make_filter
from synthetic import TINY_CONFIG, write_hf_checkpoint

PROMPT = [1, 40, 7, 250, 33, 12, 90]
PENALTY = 1.3
SAMPLING = {"temp": 0.7, "top_k": 60, "top_p": 0.9, "min_p": 0.02}


@pytest.fixture(scope="module")
def models(loaded, tiny_weights, tmp_path_factory):
    target, _ = loaded
    shallow_config = {**TINY_CONFIG, "num_transformer_layers": 2, "num_query_heads": [4, 8], "num_kv_heads": [1, 2],
                      "ffn_multipliers": [0.5, 1.0]}
    weights = {k: v for k, v in tiny_weights.items() if "layers.2." not in k}
    draft = load_model(write_hf_checkpoint(tmp_path_factory.mktemp("draft"), shallow_config, weights), dtype="float32")
    return target, draft


def penalised(logits: np.ndarray, history: list[int]) -> np.ndarray:
    """Hugging Face's repetition penalty, in numpy: the reference the processors must match."""
    logits = logits.copy()
    seen = np.unique(history)
    logits[seen] = np.where(logits[seen] < 0, logits[seen] * PENALTY, logits[seen] / PENALTY)
    return logits


def distributions(model, context: list[int], proposals: list[int], rows: int) -> np.ndarray:
    """What plain sampling would draw from after `context` + each of the first `rows` prefixes of
    `proposals`: one uncached forward pass, the penalty over each row's own history, then the filters."""
    tokens = context + proposals
    logits = np.array(model(mx.array(tokens)[None])[0].astype(mx.float32))
    filtered = make_filter(**SAMPLING)
    out = []
    for i in range(rows):
        row = penalised(logits[len(context) - 1 + i], tokens[: len(context) + i])
        logprobs = mx.array(row - np.log(np.exp(row - row.max()).sum()) - row.max())
        out.append(np.array(mx.softmax(filtered(logprobs[None]), axis=-1)[0]))
    return np.stack(out)


def test_target_and_draft_distributions_are_those_of_plain_sampling(models, monkeypatch):
    target, draft = models
    rounds = []
    real = speculative.speculative_sample

    def record(p, q, proposals, key=None):
        rounds.append((np.array(p), np.array(q), np.array(proposals).tolist()))
        return real(p, q, proposals, key)

    monkeypatch.setattr(speculative, "speculative_sample", record)
    fixed = speculative.SpeculativeOptions(draft_model=draft, num_draft_tokens=3, adaptive=False)  # 3 every round
    steps = list(generate_step(PROMPT, target, max_tokens=24, speculative=fixed,
                               sampler=make_sampler(**SAMPLING, seed=11),
                               logits_processors=make_logits_processors(PENALTY)))
    assert steps[-1].accepted_tokens > 0 and len(rounds) >= 4  # later rounds' histories hold accepted drafts
    context, produced = list(PROMPT), [s.token for s in steps]
    for p, q, proposals in rounds:
        k = len(proposals)
        np.testing.assert_allclose(p, distributions(target, context, proposals, k + 1), atol=2e-5)
        np.testing.assert_allclose(q, distributions(draft, context, proposals, k), atol=2e-5)
        assert all(q[i, t] > 0 for i, t in enumerate(proposals))  # each proposal was drawn from its q
        # the round kept its accepted proposals and one token of the target's: the next round's context
        kept = next(i for i in range(k + 1) if i == k or produced[len(context) - len(PROMPT) + i] != proposals[i])
        context += produced[len(context) - len(PROMPT):][: kept + 1]
    everything = PROMPT + produced
    assert everything[: len(context)] == context and len(everything) - len(context) <= 1  # a last 1-token pass
