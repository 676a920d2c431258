"""The product on trained weights (SmolLM2-135M-Instruct imported as OpenELM; tests/trained.py).

Random weights prove exactness, never quality: each test here fails on a random or broken
model. The model costs ~0.2 s per token on MLX's CPU backend here, so the tests share a few
short forward passes (module fixtures) of real English text.
"""

from __future__ import annotations

import math
import random

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import trained
from mlx_openelm import generate_step, load_model, make_cache
from mlx_openelm.config import ModelArgs

SAMPLE_TOKENS = 96


@pytest.fixture(scope="module")
def model(trained_model_path):
    return load_model(trained_model_path, dtype="float32")


@pytest.fixture(scope="module")
def encode(trained_model_path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(trained_model_path / "tokenizer.json"))
    return lambda text: [1] + tokenizer.encode(text, add_special_tokens=False).ids  # BOS first


@pytest.fixture(scope="module")
def words():
    return trained.real_text("eval")[:4000].split()


@pytest.fixture(scope="module")
def real(model, encode, words):
    """(token ids, float32 logits) of the held-out text's start."""
    tokens = encode(" ".join(words))[:SAMPLE_TOKENS]
    return tokens, model(mx.array([tokens]))[0]


def _mean_nll(logits: mx.array, tokens) -> float:
    logprobs = logits[:-1] - mx.logsumexp(logits[:-1], axis=-1, keepdims=True)
    return -mx.take_along_axis(logprobs, mx.array(tokens[1:])[:, None], axis=-1).mean().item()


def test_import_keeps_the_architecture_a_special_case_of_openelm(trained_model_path, model):
    args = ModelArgs.from_file(trained_model_path)
    assert set(args.num_query_heads) == {9} and set(args.num_kv_heads) == {3} and set(args.ffn_dims) == {1536}
    assert (args.num_gqa_groups, args.rms_norm_eps, args.rope_freq_constant) == (3, 1e-5, 100000.0)
    assert not args.normalize_qk_projections and args.share_input_output_layers
    assert 134e6 < args.num_parameters() < 136e6


def test_real_text_is_far_more_likely_than_the_same_words_shuffled(model, encode, words, real):
    tokens, logits = real
    shuffled = words[:]
    random.Random(0).shuffle(shuffled)
    shuffled_tokens = encode(" ".join(shuffled))[:SAMPLE_TOKENS]
    real_ppl = math.exp(_mean_nll(logits, tokens))
    shuffled_ppl = math.exp(_mean_nll(model(mx.array([shuffled_tokens]))[0], shuffled_tokens))
    # measured 72 vs 513 on 128 tokens; a random 49152-token model is near 49152 for both
    assert real_ppl < 200 and shuffled_ppl > 3 * real_ppl, (real_ppl, shuffled_ppl)


def test_rotate_half_import_equals_the_gguf_layout_with_traditional_rope(real):
    """The q/k row permutation is undone right: mlx-lm's llama with interleaved RoPE on GGUF's rows
    computes what our rotate-half model computes on the imported rows."""
    tokens, logits = real
    config, gguf_weights = trained.gguf_layout_weights()
    gguf_model = trained.mlx_lm_llama(gguf_weights, config, traditional_rope=True)
    reference = gguf_model(mx.array([tokens[:32]]))[0]
    np.testing.assert_allclose(np.array(logits[:32]), np.array(reference), atol=2e-4, rtol=1e-4)
    # and the permutation matters: the imported rows under interleaved RoPE compute something else
    assert not np.allclose(np.array(logits[:32]), np.array(
        trained.mlx_lm_llama(gguf_weights, config, traditional_rope=False)(mx.array([tokens[:32]]))[0]), atol=1e-1)


def test_matches_mlx_lm_llama_on_real_text(trained_model_path, model, real):
    tokens, logits = real
    config = ModelArgs.from_file(trained_model_path).to_dict()
    tokens, logits = tokens[:48], logits[:48]
    theirs = trained.mlx_lm_llama(dict(tree_flatten(model.parameters())), config)(mx.array([tokens]))[0]
    np.testing.assert_allclose(np.array(logits), np.array(theirs), atol=2e-4, rtol=1e-4)
    assert abs(_mean_nll(logits, tokens) / _mean_nll(theirs, tokens) - 1) < 1e-5


def test_cached_decoding_equals_the_full_forward(model, real):
    tokens, logits = real
    cache = make_cache(model)
    split = len(tokens) - 8
    steps = [model(mx.array([tokens[:split]]), cache=cache)[0, -1]]
    steps += [model(mx.array([[t]]), cache=cache)[0, -1] for t in tokens[split:-1]]
    np.testing.assert_allclose(np.array(mx.stack(steps)), np.array(logits[split - 1 : -1]), atol=2e-4, rtol=1e-4)


def test_8_bit_quantization_keeps_perplexity_and_the_top_1_token(trained_model_path, real):
    """Measured over 1024 tokens of the text: perplexity 12.92 -> 12.93, top-1 agreement 97.7% (8 bits,
    group 64, head included); 96.9% on this 96-token sample."""
    tokens, logits = real
    quantized = load_model(trained_model_path, dtype="float32")
    nn.quantize(quantized, group_size=64, bits=8)
    out = quantized(mx.array([tokens]))[0]
    agreement = (out.argmax(-1) == logits.argmax(-1)).mean().item()
    assert agreement >= 0.94, agreement
    assert abs(_mean_nll(out, tokens) - _mean_nll(logits, tokens)) < 0.02  # perplexity within 2%


def test_greedy_with_a_4_bit_self_draft_is_plain_greedy_and_accepts_most(trained_model_path, model, encode):
    prompt = encode("The Python interpreter reads a program as a sequence of")
    plain = [s.token for s in generate_step(prompt, model, max_tokens=24)]
    draft = load_model(trained_model_path, dtype="float32")
    nn.quantize(draft, group_size=64, bits=4)
    steps = list(generate_step(prompt, model, max_tokens=24, draft_model=draft, num_draft_tokens=2))
    assert [s.token for s in steps] == plain
    # measured 50% over 48 tokens (4-bit top-1 agreement on real text: 68%); random weights: about 5%
    accepted, drafted = steps[-1].accepted_tokens, steps[-1].drafted_tokens
    assert drafted and accepted / drafted >= 0.3, (accepted, drafted)
