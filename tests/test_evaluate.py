"""`mlx-openelm eval`: sliding-window perplexity, bits per byte, KL against a reference."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm.errors import ContextLengthError
from mlx_openelm.evaluate import evaluate, evaluate_text, sliding_windows
from mlx_openelm.loading import load, load_model
from synthetic import TINY_CONFIG, TOKENIZER_TEXT, random_weights, write_hf_checkpoint

TOKENS = [1] + np.random.default_rng(0).integers(3, TINY_CONFIG["vocab_size"], size=39).tolist()  # 40 tokens


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def full_log_probs(model, tokens) -> np.ndarray:
    """Log-probabilities of one full forward pass, in numpy float64."""
    return log_softmax(np.array(model(mx.array([tokens]))[0]))


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint, dtype=mx.float32)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """The tiny architecture with other random weights: a model whose predictions differ."""
    folder = tmp_path_factory.mktemp("ckpt") / "OpenELM-tiny-other"
    return write_hf_checkpoint(folder, TINY_CONFIG, random_weights(TINY_CONFIG, seed=7))


@pytest.mark.parametrize("n, context, stride", [
    (40, 8, 3), (40, 8, 7), (40, 8, 1), (40, 64, 16), (2, 2, 1), (17, 5, 4), (100, 16, 7), (9, 9, 8),
])
def test_windows_score_every_token_once_with_bounded_history(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    assert scored == list(range(1, n))  # each target once, in order; token 0 has no history
    for w in windows:
        assert w.end - w.begin <= context and w.begin < w.first < w.end <= n
        assert w.begin % stride == 0  # windows start every `stride` tokens


def test_windows_match_hugging_face_perplexity_guide():
    """The guide's loop: windows at 0, stride, 2*stride, ..., each scoring end - prev_end targets."""
    n, context, stride = 50, 12, 5
    expected, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        expected.append((begin, end, max(prev_end, 1)))
        prev_end = end
        if end == n:
            break
    assert [tuple(w) for w in sliding_windows(n, context, stride)] == expected


def test_bad_windows_are_refused():
    for stride in (0, 4, 5):  # stride == context would leave a token per window unscored
        with pytest.raises(ValueError, match=r"stride must be at least 1 and less than the context \(4\)"):
            sliding_windows(10, 4, stride)
    with pytest.raises(ValueError, match="context must be at least 2"):
        sliding_windows(10, 1, 1)


def test_perplexity_is_exp_mean_nll_of_the_full_forward(model):
    result = evaluate(model, TOKENS, context=64, stride=32, num_bytes=123)
    log_p = full_log_probs(model, TOKENS)
    nll = -np.mean([log_p[t - 1, TOKENS[t]] for t in range(1, len(TOKENS))])
    assert result.tokens == len(TOKENS) - 1 and result.windows == 1
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nll * (len(TOKENS) - 1) / math.log(2) / 123, rel=1e-5)
    assert result.kl_mean is None and result.seconds > 0


def test_sliding_window_scores_each_token_from_its_own_window(model):
    """Context 8, stride 3: each token's log-probability comes from a forward of its window's
    prefix alone (an independent computation), and the total is their sum."""
    context, stride = 8, 3
    result = evaluate(model, TOKENS, context=context, stride=stride)
    nll = 0.0
    for begin, end, first in sliding_windows(len(TOKENS), context, stride):
        log_p = full_log_probs(model, TOKENS[begin:end])
        nll -= sum(log_p[t - 1 - begin, TOKENS[t]] for t in range(first, end))
    assert result.nll == pytest.approx(nll, rel=1e-5)
    full = evaluate(model, TOKENS, context=64, stride=32)
    assert result.nll != pytest.approx(full.nll, rel=1e-6)  # less history: a different number


def test_kl_is_zero_against_itself(model):
    result = evaluate(model, TOKENS, context=16, stride=5, reference=model)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-6) and result.kl_max == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agreement == 1.0 and result.reference_nll == pytest.approx(result.nll, rel=1e-6)


def test_kl_matches_numpy(model, other_checkpoint):
    reference = load_model(other_checkpoint, dtype=mx.float32)
    result = evaluate(model, TOKENS, context=64, stride=32, reference=reference)
    log_p = full_log_probs(reference, TOKENS)[:-1]  # positions predicting tokens 1..n-1
    log_q = full_log_probs(model, TOKENS)[:-1]
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    assert kl.mean() > 1e-3  # the two models really differ
    assert result.kl_mean == pytest.approx(kl.mean(), rel=1e-4)
    assert result.kl_max == pytest.approx(kl.max(), rel=1e-4)
    assert result.top1_agreement == pytest.approx((log_p.argmax(-1) == log_q.argmax(-1)).mean())
    ref_nll = -sum(log_p[t - 1, TOKENS[t]] for t in range(1, len(TOKENS)))
    assert result.reference_nll == pytest.approx(ref_nll, rel=1e-5)


def test_evaluate_text_counts_bytes_and_prepends_bos(hf_checkpoint):
    model, tokenizer = load(hf_checkpoint, dtype="float32")
    text = " ".join(TOKENIZER_TEXT)
    result = evaluate_text(model, tokenizer, text, context=32, stride=16)
    assert result.bytes == len(text.encode("utf-8")) and result.tokens == len(tokenizer.encode(text)) - 1
    direct = evaluate(model, [tokenizer.bos_id] + tokenizer.encode(text, add_bos=False), context=32, stride=16)
    assert result.nll == pytest.approx(direct.nll, rel=1e-6)


def test_context_beyond_the_model_and_too_short_texts_are_refused(model):
    with pytest.raises(ContextLengthError, match="`context=4096` exceeds the model's context of 2048"):
        evaluate(model, TOKENS, context=4096, stride=512)
    with pytest.raises(ValueError, match="at least two are needed"):
        evaluate(model, [1], context=8, stride=4)


# ---- command line ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(TOKENIZER_TEXT * 2), encoding="utf-8")
    return path


def test_cli_json_matches_the_library(any_checkpoint, other_checkpoint, text_file, invoke_cli):
    result = invoke_cli("eval", "--model", str(any_checkpoint), "--text", str(text_file), "--context", "24",
                        "--stride", "8", "--reference", str(other_checkpoint), "--json", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model, tokenizer = load(any_checkpoint, dtype="float32")
    expected = evaluate_text(model, tokenizer, text_file.read_text(), context=24, stride=8,
                             reference=load_model(other_checkpoint, dtype=mx.float32))
    assert data["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert data["kl_mean"] == pytest.approx(expected.kl_mean, rel=1e-5)
    assert data["tokens"] == expected.tokens and data["bytes"] == expected.bytes
    assert data["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert 0 <= data["top1_agreement"] <= 1 and data["windows"] == len(sliding_windows(expected.tokens + 1, 24, 8))


def test_cli_table(hf_checkpoint, text_file, invoke_cli):
    result = invoke_cli("eval", "--model", str(hf_checkpoint), "--text", str(text_file), "--context", "64",
                        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for label in ("perplexity", "tokens scored", "bits per byte", "time"):
        assert label in result.stdout
    assert "KL" not in result.stdout and "scoring" in result.stderr
    assert "(context 64, stride 32)" in result.stdout  # the stride defaults to half the context


@pytest.mark.parametrize("args, message", [
    (["--context", "8", "--stride", "8"], "Invalid value for '--stride': 8 must be less than --context 8"),
    (["--context", "4096"], "Error: --context 4096 exceeds the model's context of 2048 tokens"),
])
def test_cli_bad_windows(hf_checkpoint, text_file, args, message, invoke_cli):
    result = invoke_cli("eval", "--model", str(hf_checkpoint), "--text", str(text_file), *args, catch_exceptions=False)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_cli_refuses_text_that_is_not_utf8(hf_checkpoint, tmp_path, invoke_cli):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    result = invoke_cli("eval", "--model", str(hf_checkpoint), "--text", str(path), catch_exceptions=False)
    assert result.exit_code == 1 and f"Error: {path}: not UTF-8 text (byte 0xe9 at offset 3)" in result.output


def test_cli_refuses_an_empty_text_naming_it(hf_checkpoint, tmp_path, invoke_cli):
    path = tmp_path / "empty.txt"
    path.write_text("")
    result = invoke_cli("eval", "--model", str(hf_checkpoint), "--text", str(path), catch_exceptions=False)
    assert result.exit_code == 1 and f"Error: {path}: no text to score" in result.output
    assert "scoring" not in result.stderr  # refused before any work starts
