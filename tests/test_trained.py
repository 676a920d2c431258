"""The product on trained weights (SmolLM2-135M-Instruct imported as OpenELM; tests/trained.py).

Random weights prove exactness, never quality: each test here fails on a random or broken
model. The model costs ~0.2 s per token on MLX's CPU backend here, so the tests share a few
short forward passes (module fixtures) of real English text.
"""

from __future__ import annotations

import json
import math
import random
import signal

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import trained
from serving import start_server
from mlx_openelm import generate_step, load_model, make_cache
from mlx_openelm.config import ModelArgs
from mlx_openelm.speculative import SpeculativeOptions

SAMPLE_TOKENS = 96


@pytest.fixture(scope="module")
def model(trained_model_path):
    return load_model(trained_model_path, dtype="float32")


@pytest.fixture(scope="module")
def hf_tokenizer(trained_model_path):
    """The `tokenizers` library's own reading of the folder's tokenizer.json (not the product's)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(trained_model_path / "tokenizer.json"))


@pytest.fixture(scope="module")
def encode(hf_tokenizer):
    return lambda text: [1] + hf_tokenizer.encode(text, add_special_tokens=False).ids  # BOS first


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
    assert [s.token for s in generate_step(prompt, model, max_tokens=24, draft_model=draft, num_draft_tokens=2)] \
        == plain  # the default, adaptive draft length
    # the draft's acceptance, at a fixed length (the adaptive one pauses after rounds it rejects)
    fixed = SpeculativeOptions(draft_model=draft, num_draft_tokens=2, adaptive=False)
    steps = list(generate_step(prompt, model, max_tokens=24, speculative=fixed))
    assert [s.token for s in steps] == plain
    # measured 50% over 48 tokens (4-bit top-1 agreement on real text: 68%); random weights: about 5%
    accepted, drafted = steps[-1].accepted_tokens, steps[-1].drafted_tokens
    assert drafted and accepted / drafted >= 0.3, (accepted, drafted)


# ---- the product's commands on the trained folder (real subprocesses; a few tokens each) ----

PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"
NEW_TOKENS = 8


def _json_output(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer):
    """PROMPT as the product encodes it on this folder: no BOS (its tokenizer_config.json: add_bos_token false)."""
    return hf_tokenizer.encode(PROMPT, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def greedy_text(model, prompt_ids, hf_tokenizer):
    """The library's greedy continuation of PROMPT (no repetition penalty), decoded by `tokenizers`."""
    return hf_tokenizer.decode([s.token for s in generate_step(prompt_ids, model, max_tokens=NEW_TOKENS)])


@pytest.fixture(scope="module")
def converted_4bit(run_cli, trained_model_path, tmp_path_factory):
    """`convert -q` of the trained folder (the default method, group 64), without the KL check."""
    folder = tmp_path_factory.mktemp("trained-q4") / "q4"
    report = _json_output(run_cli("convert", "--hf-path", trained_model_path, "--mlx-path", folder, "-q",
                                  "--no-eval", "--json"))
    return folder, report


def test_generate_command_continues_with_the_librarys_greedy_tokens(run_cli, trained_model_path, prompt_ids,
                                                                    greedy_text):
    out = _json_output(run_cli("generate", "--model", trained_model_path, "-p", PROMPT, "-m", NEW_TOKENS,
                               "--repetition-penalty", 1, "--json"))
    assert out["text"] == greedy_text and out["generation_tokens"] == NEW_TOKENS
    assert out["prompt_tokens"] == len(prompt_ids)  # the folder's tokenizer.json, no BOS (SmolLM2's rule)
    assert greedy_text.startswith(" Paris"), greedy_text  # a trained model knows it; a random one does not


def test_speculative_generate_command_gives_the_plain_greedy_text(run_cli, trained_model_path, converted_4bit,
                                                                 greedy_text):
    how = ["--draft-model", converted_4bit[0], "--num-draft-tokens", 3]
    out = _json_output(run_cli("generate", "--model", trained_model_path, "-p", PROMPT, "-m", NEW_TOKENS,
                               "--repetition-penalty", 1, "--json", *how))
    assert out["text"] == greedy_text
    assert out["drafted_tokens"] > 0 and 0 < out["target_passes_per_token"] <= 1


def test_prompt_lookup_by_default_gives_the_plain_greedy_text(run_cli, trained_model_path):
    prompt = "Roses are red, violets are blue. Roses are red, violets are blue. Roses are"
    base = ["generate", "--model", trained_model_path, "-p", prompt, "-m", 12, "--repetition-penalty", 1, "--json"]
    plain = _json_output(run_cli(*base, "--prompt-lookup", 0))
    looked_up = _json_output(run_cli(*base))  # prompt lookup, 4 tokens
    assert looked_up["text"] == plain["text"] and plain["drafted_tokens"] == 0
    assert looked_up["accepted_tokens"] > 0 and looked_up["target_passes_per_token"] < 1, looked_up


def test_convert_4_bit_then_eval_against_the_float_folder(run_cli, trained_model_path, converted_4bit, words,
                                                          tmp_path):
    folder, report = converted_4bit
    assert 4.4 < report["bits_per_weight"] < 4.6, report
    text = tmp_path / "held-out.txt"
    text.write_text(" ".join(words[:24]))
    out = _json_output(run_cli("eval", "--model", folder, "--text", text, "--context", 64,
                               "--reference", trained_model_path, "--json"))
    # measured on these 39 tokens: perplexity 224 (float) -> 313 (4-bit), KL 0.47, top-1 agreement 61.5%;
    # a random 49152-token model is near 49152, a broken quantization near 0% agreement
    assert out["reference_perplexity"] < 1000, out
    assert out["perplexity"] < 2 * out["reference_perplexity"] and out["top1_agreement"] >= 0.45, out
    assert out["kl_mean"] < 1.0, out


def test_chat_command_answers_in_the_models_own_template(run_cli, trained_model_path, model):
    from mlx_openelm.chat import ChatSession
    from mlx_openelm.tokenizer import Tokenizer

    proc = run_cli("chat", "--model", trained_model_path, "-m", NEW_TOKENS, "--repetition-penalty", 1, "-q",
                   input=QUESTION + "\n")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    session = ChatSession(model, Tokenizer(trained_model_path / "tokenizer.json", bos_id=1, eos_id=2))
    expected = "".join(r.text for r in session.send(QUESTION, max_tokens=NEW_TOKENS))
    assert proc.stdout == expected + "\n"
    assert session.conversation_ids()[:3] == [1, 9690, 198]  # SmolLM2's ChatML: <|im_start|>system\n
    assert "Paris" in expected, expected


def test_serve_answers_the_openai_client(trained_model_path):
    openai = pytest.importorskip("openai")

    server = start_server(trained_model_path, "--max-tokens", str(NEW_TOKENS), "--repetition-penalty", "1")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}])
    finally:
        server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0, "".join(server.log)
    assert "Paris" in reply.choices[0].message.content, reply
