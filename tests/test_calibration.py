"""`convert --calibration-text`: activation-aware scales folded into norm/linear pairs."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm.convert import calibration, convert
from mlx_openelm.convert.calibration import FoldedSource, best_scale, calibrate, calibration_text
from mlx_openelm.quantizers import quantize
from mlx_openelm.convert.quality import eval_tokens, reference_logits
from mlx_openelm.convert.sources import open_source
from mlx_openelm.loading import load_model, read_weights
from mlx_openelm.quantization import plan_quantization
from mlx_openelm.tokenizer import Tokenizer
from synthetic import TINY_CONFIG, TOKENIZER_TEXT, random_weights, write_hf_checkpoint

OUTLIER_CHANNELS = [3, 17, 40, 51]


@pytest.fixture(scope="module")
def outlier_checkpoint(tmp_path_factory, tokenizer_path):
    """The tiny model with a few input channels of every qkv_proj/proj_1 carrying 30x larger
    activations (large attn_norm/ffn_norm weights there), as real LLMs' outlier channels do."""
    weights = random_weights(TINY_CONFIG, seed=3)
    for i in range(TINY_CONFIG["num_transformer_layers"]):
        for norm in ("attn_norm", "ffn_norm"):
            name = f"transformer.layers.{i}.{norm}.weight"
            weights[name] = weights[name].copy()
            weights[name][OUTLIER_CHANNELS] *= 30
    folder = tmp_path_factory.mktemp("outliers") / "OpenELM-outliers"
    return write_hf_checkpoint(folder, TINY_CONFIG, weights, tokenizer=tokenizer_path)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text("\n".join(TOKENIZER_TEXT * 4), encoding="utf-8")
    return path


def test_folding_keeps_the_float_model(outlier_checkpoint, tokenizer_path):
    source = open_source(outlier_checkpoint)
    plan = plan_quantization(source.shapes(), 4, 32)
    tokens = Tokenizer(tokenizer_path).encode(" ".join(TOKENIZER_TEXT))[:64]
    scales = calibrate(open_source(outlier_checkpoint), plan, tokens, mx.float32, alphas=(0.5,)).scales
    assert len(scales) == 2 * TINY_CONFIG["num_transformer_layers"]  # every qkv_proj and proj_1
    folded = FoldedSource(open_source(outlier_checkpoint), scales)
    name = "transformer.layers.1.attn_norm.weight"
    assert not np.allclose(np.array(folded.get(name)), np.array(open_source(outlier_checkpoint).get(name)))
    ids = eval_tokens(source.args)
    expected = reference_logits(source, ids)
    actual = reference_logits(FoldedSource(open_source(outlier_checkpoint), scales), ids)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["optimal", "minmax"])
def test_alpha_zero_is_the_uncalibrated_conversion_bit_for_bit(outlier_checkpoint, text_file, tmp_path,
                                                              tokenizer_path, monkeypatch, method):
    """With alpha = 0 only, nothing is folded: min/max gives the plain conversion bit for bit; optimal
    gives the plain quantizer's output for the importances calibration measured (the mean square of
    each linear's input), bit for bit."""
    plain = convert(outlier_checkpoint, tmp_path / "plain", bits=4, group_size=32, method=method, evaluate=False)
    monkeypatch.setattr(calibration, "ALPHAS", (0.0,))
    report = convert(outlier_checkpoint, tmp_path / "alpha0", bits=4, group_size=32, method=method,
                     evaluate=False, calibration_text=text_file)
    assert report.calibration["folded_layers"] == 0 and plain.calibration is None
    ours, theirs = read_weights(tmp_path / "alpha0"), read_weights(tmp_path / "plain")
    assert set(ours) == set(theirs)
    source = open_source(outlier_checkpoint)
    found = calibrate(open_source(outlier_checkpoint), plan_quantization(source.shapes(), 4, 32, method=method),
                      calibration_text(text_file, Tokenizer(tokenizer_path), source.args).tokens,
                      mx.float16, alphas=(0.0,))
    expected = dict(theirs)
    if method == "optimal":
        assert len(found.importance) == 4 * TINY_CONFIG["num_transformer_layers"] + 1  # every linear and the head
        for name, importance in found.importance.items():
            prefix = name[: -len("weight")]
            packed, scales, biases = quantize(source.get(name), 4, 32, "optimal", mx.float16, importance)
            expected.update({prefix + "weight": packed, prefix + "scales": scales, prefix + "biases": biases})
    for name, array in ours.items():
        assert array.dtype == expected[name].dtype and mx.array_equal(array, expected[name]).item(), name


def test_measured_importance_finds_the_outlier_channels(outlier_checkpoint, tokenizer_path):
    source = open_source(outlier_checkpoint)
    tokens = Tokenizer(tokenizer_path).encode(" ".join(TOKENIZER_TEXT))[:64]
    found = calibrate(source, plan_quantization(source.shapes(), 4, 32), tokens, mx.float32, alphas=(0.0,))
    for i in range(TINY_CONFIG["num_transformer_layers"]):
        for linear in ("attn.qkv_proj", "ffn.proj_1"):
            c = np.array(found.importance[f"transformer.layers.{i}.{linear}.weight"])
            assert abs(c.mean() - 1) < 1e-5 and (c >= 0).all()
            others = np.delete(c, OUTLIER_CHANNELS)
            assert c[OUTLIER_CHANNELS].min() > 100 * np.median(others)  # 30x activations: 900x squares


@pytest.mark.parametrize("bits", [3, 4])
def test_calibration_lowers_kl_on_outlier_channels(outlier_checkpoint, text_file, tmp_path, bits):
    plain = convert(outlier_checkpoint, tmp_path / "plain", bits=bits, group_size=32)
    calibrated = convert(outlier_checkpoint, tmp_path / "calibrated", bits=bits, group_size=32,
                         calibration_text=text_file)
    assert calibrated.calibration["folded_layers"] > 0
    # measured 0.91x (3 bits) and 0.90x (4 bits): the data-free importance already sees the norms'
    # outlier weights, so what calibration adds is the measured rest (deterministic: seeded weights)
    assert calibrated.kl_mean < 0.95 * plain.kl_mean
    entry = json.loads((tmp_path / "calibrated" / "config.json").read_text())["quantization"]
    assert entry["calibration"] == {"text": "calibration.txt", "tokens": calibrated.calibration["tokens"]}
    assert 0 < entry["calibration"]["tokens"] <= calibration.MAX_TOKENS


def test_calibrated_folder_loads_in_mlx_lm_unchanged(outlier_checkpoint, text_file, tmp_path):
    lm_utils = pytest.importorskip("mlx_lm.utils")
    out = tmp_path / "calibrated"
    convert(outlier_checkpoint, out, bits=4, group_size=32, dtype="float32", calibration_text=text_file,
            evaluate=False)
    tokens = mx.array([eval_tokens(open_source(out).args, 16)])
    ours = load_model(out, dtype="float32")(tokens)
    theirs_model, _ = lm_utils.load_model(out)
    np.testing.assert_allclose(np.array(theirs_model(tokens)), np.array(ours), rtol=1e-3, atol=1e-3)


def test_cli_reports_calibration(outlier_checkpoint, text_file, tmp_path, invoke_cli):
    result = invoke_cli("convert", "--hf-path", str(outlier_checkpoint), "--mlx-path", str(tmp_path / "o"),
                        "--bits", "4", "--group-size", "32", "--no-eval", "--calibration-text", str(text_file))
    assert result.exit_code == 0, result.output
    assert "calibrated on calibration.txt" in result.output


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    (b"", "the file is empty"),
    (b"  \n\n", "the file is empty"),
    (b"caf\xe9 latin-1", "not UTF-8 text (byte 0xe9"),
    ("folder", "a folder, not a text file"),
])
def test_cli_refuses_bad_calibration_text(outlier_checkpoint, tmp_path, content, expected, invoke_cli):
    path = tmp_path / "text.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    out = tmp_path / "o"
    result = invoke_cli("convert", "--hf-path", str(outlier_checkpoint), "--mlx-path", str(out), "-q",
                        "--calibration-text", str(path))
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: --calibration-text: {path}: {expected}"), result.output
    assert result.output.count("\n") == 1  # one line, no traceback
    assert not out.exists()


def test_cli_refuses_calibration_without_quantization_or_tokenizer(outlier_checkpoint, hf_checkpoint, text_file,
                                                                   tmp_path, invoke_cli):
    result = invoke_cli("convert", "--hf-path", str(outlier_checkpoint), "--mlx-path", str(tmp_path / "f"),
                        "--calibration-text", str(text_file))
    assert result.exit_code == 1 and "--calibration-text: calibration only applies when quantizing" in result.output
    no_tokenizer = write_hf_checkpoint(tmp_path / "bare", TINY_CONFIG, random_weights(TINY_CONFIG))
    result = invoke_cli("convert", "--hf-path", str(no_tokenizer), "--mlx-path", str(tmp_path / "o"), "-q",
                        "--calibration-text", str(text_file))
    assert result.exit_code == 1 and "has no tokenizer.model" in result.output and "--tokenizer" in result.output
    assert not (tmp_path / "f").exists() and not (tmp_path / "o").exists()


def test_a_scale_that_would_overflow_the_folded_norm_is_skipped():
    rng = np.random.default_rng(0)
    weight = mx.array(rng.standard_normal((32, 64)).astype(np.float32))
    x = mx.array(rng.standard_normal((40, 64)).astype(np.float32)) * mx.array([50.0] * 4 + [1.0] * 60)
    scale = best_scale(weight, x, (3, 32), "minmax", mx.float16, alphas=(1.0,), norm=mx.ones((64,)))
    assert scale is not None and float(mx.min(scale)) < 1  # some channel's norm weight grows when folded
    big_norm = mx.full((64,), 60000.0)  # within float16, but not once divided by a scale below 1
    assert best_scale(weight, x, (3, 32), "minmax", mx.float16, alphas=(1.0,), norm=big_norm) is None
    assert best_scale(weight, x, (3, 32), "minmax", mx.float32, alphas=(1.0,), norm=big_norm) is not None
