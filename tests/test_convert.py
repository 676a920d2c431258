"""The converter: precision round trips, quantization, recipes, averaging, sharding, safety, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_openelm.config import preset_args
from mlx_openelm.convert import convert, pipeline
from mlx_openelm.convert.pipeline import default_convert_dtype
from mlx_openelm.convert.quality import kl_divergence
from mlx_openelm.folder.writing import parse_size
from mlx_openelm.errors import CheckpointError, ConfigError, OpenELMError, TokenizerError
from mlx_openelm.loading import load_model, read_weights
from mlx_openelm.quantization import apply_quantization
from synthetic import TINY_CONFIG, random_weights, write_hf_checkpoint

TOKENS = mx.array([[1, 5, 9, 33, 100, 200, 7, 8, 300, 12, 64, 2, 17, 383, 250, 3]])


def logits(model) -> np.ndarray:
    out = model(TOKENS)
    mx.eval(out)
    return np.array(out.astype(mx.float32))


def listing(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its size and mtime: equal listings mean nothing changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.stat()
            out[str(path.relative_to(root))] = (stat.st_size if path.is_file() else None, stat.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def float_logits(hf_checkpoint):
    return logits(load_model(hf_checkpoint, dtype=mx.float32))


# ---- precision -------------------------------------------------------------------------------

def test_float32_round_trip_gives_identical_logits(hf_checkpoint, tmp_path, float_logits):
    out = tmp_path / "fp32"
    report = convert(hf_checkpoint, out, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float32"
    np.testing.assert_array_equal(logits(load_model(out, dtype=mx.float32)), float_logits)
    assert report.max_rel_error == 0.0 and report.kl_mean == pytest.approx(0.0, abs=1e-9)
    # the tokenizer inside the input folder is copied; the vestigial classifier is dropped
    assert (out / "tokenizer.model").read_bytes() == (hf_checkpoint / "tokenizer.model").read_bytes()
    assert "transformer.classifier.weight" not in read_weights(out)
    assert report.parameters == load_model(out).args.num_parameters()
    assert report.bits_per_weight == pytest.approx(32.0)


@pytest.mark.parametrize("dtype, rel_tol", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_half_precision_is_the_cast_and_within_round_off(hf_checkpoint, tiny_weights, tmp_path, float_logits,
                                                          dtype, rel_tol):
    out = tmp_path / dtype
    report = convert(hf_checkpoint, out, dtype=dtype)
    stored = read_weights(out)
    for name, weight in stored.items():
        assert weight.dtype == getattr(mx, dtype)
        expected = mx.array(tiny_weights[name]).astype(getattr(mx, dtype))
        assert mx.array_equal(weight, expected).item(), name
    # each tensor within half a unit in the last place; logits within a few of them
    assert 0 < report.max_rel_error <= rel_tol
    got = logits(load_model(out, dtype=mx.float32))
    scale = np.abs(float_logits).max()
    assert np.abs(got - float_logits).max() <= 16 * rel_tol * scale
    assert report.bits_per_weight == pytest.approx(16.0)


def test_default_dtype_is_float16_but_bfloat16_for_3b(hf_checkpoint, tmp_path):
    report = convert(hf_checkpoint, tmp_path / "default", evaluate=False)
    assert report.dtype == "float16"
    assert default_convert_dtype(preset_args("3B")) == mx.bfloat16
    assert default_convert_dtype(preset_args("1_1B")) == mx.float16


def test_bf16_and_sharded_inputs_convert(bf16_checkpoint, sharded_checkpoint, hf_checkpoint, tmp_path, float_logits):
    convert(sharded_checkpoint, tmp_path / "from-shards", dtype="float32", evaluate=False)
    np.testing.assert_array_equal(logits(load_model(tmp_path / "from-shards", dtype=mx.float32)), float_logits)
    convert(bf16_checkpoint, tmp_path / "from-bf16", dtype="bfloat16", evaluate=False)
    np.testing.assert_array_equal(
        logits(load_model(tmp_path / "from-bf16", dtype=mx.float32)),
        logits(load_model(bf16_checkpoint, dtype=mx.float32)),
    )


# ---- quantization ------------------------------------------------------------------------------

def in_memory_quantized(source: Path, quantization: dict, dtype) -> nn.Module:
    """The float model quantized in memory the way config.json says, computing in float32."""
    model = load_model(source, dtype=dtype)
    apply_quantization(model, quantization)
    model.set_dtype(mx.float32)
    return model


@pytest.mark.parametrize("bits, group_size, dtype", [(8, 64, "float32"), (4, 64, "float32"), (4, 32, "float16")])
def test_quantized_output_matches_in_memory_quantization(hf_checkpoint, tmp_path, bits, group_size, dtype):
    out = tmp_path / f"q{bits}"
    convert(hf_checkpoint, out, bits=bits, group_size=group_size, dtype=dtype, method="minmax", evaluate=False)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["bits"] == bits and quantization["group_size"] == group_size
    assert quantization["method"] == "minmax"
    assert quantization["mode"] == "affine"
    loaded = load_model(out, dtype=mx.float32)
    np.testing.assert_array_equal(logits(loaded), logits(in_memory_quantized(hf_checkpoint, quantization, dtype)))
    assert isinstance(loaded.transformer.token_embeddings, nn.QuantizedEmbedding)
    assert loaded.layers[0].attn.qkv_proj.bits == bits


def test_layers_whose_width_is_not_a_group_multiple_stay_float(hf_checkpoint, tmp_path):
    # TINY_CONFIG's FFN widths are 32, 64, 96: with groups of 64 layers 0 and 2 cannot be quantized
    report = convert(hf_checkpoint, tmp_path / "q", bits=4, group_size=64, dtype="float32", evaluate=False)
    skipped = {"transformer.layers.0.ffn.proj_2": 32, "transformer.layers.2.ffn.proj_2": 96}
    assert report.skipped_layers == skipped
    layers = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["layers"]
    assert layers == {path: False for path in skipped}
    model = load_model(tmp_path / "q")
    assert type(model.layers[0].ffn.proj_2) is nn.Linear
    assert isinstance(model.layers[1].ffn.proj_2, nn.QuantizedLinear)
    assert report.layer_bits == {"4": 11, "float": 2}


def test_kl_of_4_bits_exceeds_8_bits_and_both_stay_below_thresholds(hf_checkpoint, tmp_path):
    # Measured on this model (group 32, fp32; embedding std 0.25): 8-bit KL ~9e-4 nats, 4-bit ~0.21.
    # The 4-bit step is 17x coarser and KL grows with the square of small perturbations (~290x; measured
    # ~240x), so a 10x gap is safe; the thresholds leave ~5x headroom over the measurements.
    r8 = convert(hf_checkpoint, tmp_path / "q8", bits=8, group_size=32, dtype="float32")
    r4 = convert(hf_checkpoint, tmp_path / "q4", bits=4, group_size=32, dtype="float32")
    assert r8.kl_mean < 5e-3
    assert r4.kl_mean < 1.0
    assert r4.kl_mean > 10 * r8.kl_mean
    assert r8.max_rel_error < 0.01 < r4.max_rel_error < 0.2
    assert r8.top1_agreement > r4.top1_agreement
    # the report's KL is the KL between the float model and the folder written
    ref = logits(load_model(hf_checkpoint, dtype=mx.float32))[0]
    got = logits(load_model(tmp_path / "q4", dtype=mx.float32))[0]
    assert kl_divergence(ref, got).mean() > 10 * r8.kl_mean
    # bits per weight: 4 bits + 2 float32 scale/bias per group of 32 = 6 bits, a bit more for the norms
    assert 6.0 < r4.bits_per_weight < 6.3 and 10.0 < r8.bits_per_weight < 10.3


@pytest.mark.parametrize("fixture, head", [("hf_checkpoint", "transformer.token_embeddings"),
                                           ("untied_checkpoint", "lm_head")])
def test_mixed_recipe_records_and_applies_8_bit_head(request, tmp_path, fixture, head):
    """mixed-4-8: the head(s), every qkv_proj and the last layer (here: layer 2 of 3) at 8 bits."""
    source = request.getfixturevalue(fixture)
    out = tmp_path / "mixed"
    report = convert(source, out, recipe="mixed-4-8", group_size=32, dtype="float32", method="minmax",
                     evaluate=False)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["bits"] == 4 and quantization["recipe"] == "mixed-4-8"
    heads = {p: s for p, s in quantization["layers"].items() if s}
    high = (["transformer.token_embeddings"] + [f"transformer.layers.{i}.attn.qkv_proj" for i in range(3)]
            + [f"transformer.layers.2.{m}" for m in ("attn.out_proj", "ffn.proj_1", "ffn.proj_2")])
    expected = {path: {"bits": 8, "group_size": 32} for path in high}
    if head == "lm_head":
        expected["lm_head"] = {"bits": 8, "group_size": 32}
    assert heads == expected
    model = load_model(out, dtype=mx.float32)
    assert model.transformer.token_embeddings.bits == 8
    if head == "lm_head":
        assert model.lm_head.bits == 8
    assert model.layers[0].attn.qkv_proj.bits == 8 and model.layers[2].ffn.proj_2.bits == 8
    assert model.layers[0].ffn.proj_2.bits == 4 and model.layers[1].ffn.proj_1.bits == 4
    assert report.layer_bits["8"] == len(expected)
    np.testing.assert_array_equal(logits(model), logits(in_memory_quantized(source, quantization, mx.float32)))


def test_untied_checkpoint_quantizes_lm_head(untied_checkpoint, tmp_path):
    convert(untied_checkpoint, tmp_path / "q", bits=8, group_size=32, dtype="float32", evaluate=False)
    model = load_model(tmp_path / "q")
    assert isinstance(model.lm_head, nn.QuantizedLinear)


# ---- averaging and sharding ----------------------------------------------------------------------

def test_average_is_the_elementwise_mean(tmp_path, tiny_weights):
    other = random_weights(TINY_CONFIG, seed=7)
    a = write_hf_checkpoint(tmp_path / "a", TINY_CONFIG, tiny_weights)
    b = write_hf_checkpoint(tmp_path / "b", TINY_CONFIG, other)
    report = convert(None, tmp_path / "avg", average=[a, b], dtype="float32")
    stored = read_weights(tmp_path / "avg")
    for name, weight in stored.items():
        mean = ((tiny_weights[name].astype(np.float64) + other[name].astype(np.float64)) / 2).astype(np.float32)
        np.testing.assert_array_equal(np.array(weight), mean, err_msg=name)
    assert report.inputs == [str(a), str(b)] and report.max_rel_error == 0.0


def test_average_refuses_different_architectures(tmp_path, tiny_weights, untied_checkpoint):
    a = write_hf_checkpoint(tmp_path / "a", TINY_CONFIG, tiny_weights)
    before = listing(tmp_path)
    with pytest.raises(ConfigError, match="different architecture"):
        convert(None, tmp_path / "avg", average=[a, untied_checkpoint])
    assert listing(tmp_path) == before


def test_large_output_is_sharded_with_an_index(hf_checkpoint, tmp_path, float_logits):
    out = tmp_path / "sharded"
    report = convert(hf_checkpoint, out, dtype="float32", max_shard_size="100KB", evaluate=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert report.shards == len(files) > 1 and not (out / "model.safetensors").exists()
    assert files == sorted(p.name for p in out.glob("*.safetensors"))
    assert all(p.stat().st_size <= 100_000 + 4096 for p in out.glob("*.safetensors"))  # + header
    np.testing.assert_array_equal(logits(load_model(out, dtype=mx.float32)), float_logits)
    # a quantized module's weight, scales and biases stay in one shard
    q = tmp_path / "q-sharded"
    convert(hf_checkpoint, q, bits=4, group_size=32, max_shard_size="20KB", evaluate=False)
    weight_map = json.loads((q / "model.safetensors.index.json").read_text())["weight_map"]
    for name, file in weight_map.items():
        if name.endswith(".scales"):
            module = name[: -len("scales")]
            assert weight_map[module + "weight"] == file == weight_map[module + "biases"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64kb") == 64_000 and parse_size(1234) == 1234
    with pytest.raises(ConfigError, match="max_shard_size: "):
        parse_size("lots")


# ---- safety: refusals leave the file system untouched ------------------------------------------------

@pytest.fixture
def workdir(tmp_path, hf_checkpoint):
    """A folder holding a copy of the tiny checkpoint and an existing output folder."""
    src = write_hf_checkpoint(tmp_path / "src", TINY_CONFIG, random_weights(TINY_CONFIG, seed=0))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("user data")
    return tmp_path, src, existing


@pytest.mark.parametrize("case", [
    "existing-target", "missing-input", "unsupported-bits", "unsupported-group", "unsupported-dtype",
    "unknown-recipe", "recipe-with-8-bits", "non-openelm-config", "corrupt-safetensors", "missing-tokenizer",
    "missing-tensor", "preset-with-hf-folder", "pt-without-preset", "output-inside-input",
])
def test_refusals_name_the_culprit_and_leave_nothing_behind(workdir, case, invoke_cli):
    root, src, existing = workdir
    out = root / "out" / "nested"
    args, expected = {
        "existing-target": (["--hf-path", src, "--mlx-path", existing], "already exists; pass --force"),
        "missing-input": (["--hf-path", root / "nope", "--mlx-path", out], "nope"),
        "unsupported-bits": (["--hf-path", src, "--mlx-path", out, "--bits", "7"], "--bits: 7"),
        "unsupported-group": (["--hf-path", src, "--mlx-path", out, "--bits", "4", "--group-size", "48"],
                              "--group-size: 48"),
        "unsupported-dtype": (["--hf-path", src, "--mlx-path", out, "--dtype", "float8"], "--dtype"),
        "unknown-recipe": (["--hf-path", src, "--mlx-path", out, "--recipe", "mixed-2-16"], "--recipe"),
        "recipe-with-8-bits": (["--hf-path", src, "--mlx-path", out, "--recipe", "mixed-4-8", "--bits", "8"],
                               "--bits 8"),
        "non-openelm-config": (["--hf-path", src, "--mlx-path", out], "'model_type' is 'llama'"),
        "corrupt-safetensors": (["--hf-path", src, "--mlx-path", out], "model.safetensors"),
        "missing-tokenizer": (["--hf-path", src, "--mlx-path", out, "--tokenizer", root / "tok.model"],
                              "tok.model"),
        "missing-tensor": (["--hf-path", src, "--mlx-path", out], "transformer.layers.1.ffn_norm.weight"),
        "preset-with-hf-folder": (["--hf-path", src, "--mlx-path", out, "--preset", "270M"], "--preset"),
        "pt-without-preset": (["--hf-path", src / "model.safetensors", "--mlx-path", out], "--preset"),
        "output-inside-input": (["--hf-path", src, "--mlx-path", src / "mlx"], "overlaps the input"),
    }[case]
    if case == "non-openelm-config":
        (src / "config.json").write_text(json.dumps({**TINY_CONFIG, "model_type": "llama"}))
    if case == "corrupt-safetensors":
        (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    if case == "missing-tensor":
        weights = random_weights(TINY_CONFIG, seed=0)
        del weights["transformer.layers.1.ffn_norm.weight"]
        write_hf_checkpoint(src, TINY_CONFIG, weights)
    before = listing(root)
    result = invoke_cli("convert", *args)
    assert result.exit_code != 0
    assert expected in result.output, result.output
    assert "Traceback" not in result.output
    assert listing(root) == before
    assert (existing / "keep.txt").read_text() == "user data"


def test_failure_mid_conversion_removes_everything(workdir, monkeypatch):
    root, src, existing = workdir
    calls = []
    real = pipeline.convert_tensor

    def flaky(name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(pipeline, "convert_tensor", flaky)
    before = listing(root)
    for target, force in [(root / "new" / "model", False), (existing, True)]:
        calls.clear()
        with pytest.raises(OSError, match="No space"):
            convert(src, target, force=force, max_shard_size="10KB")
        assert len(calls) == 5
        assert listing(root) == before  # no temp folder, no created parents, old output intact


def test_force_replaces_an_existing_folder_atomically(workdir):
    root, src, existing = workdir
    convert(src, existing, force=True, evaluate=False)
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["existing", "src"]  # no .tmp-/.old- leftovers
    assert load_model(existing).args.model_dim == TINY_CONFIG["model_dim"]


def test_output_folder_is_not_private(workdir):
    root, src, _ = workdir
    convert(src, root / "out", evaluate=False)
    umask = os.umask(0)
    os.umask(umask)
    assert (root / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_refusals_raise_the_openelm_error_of_their_kind(workdir):
    root, src, _ = workdir
    (root / "junk.pt").write_bytes(b"not a zip")
    cases = [
        (lambda: convert(src, root / "a", group_size=0), ConfigError),
        (lambda: convert(root / "junk.pt", root / "b", preset="270M"), CheckpointError),
        (lambda: convert(src, root / "c", tokenizer=root / "missing.model"), TokenizerError),
    ]
    for run, kind in cases:
        with pytest.raises(kind) as info:
            run()
        assert isinstance(info.value, OpenELMError), type(info.value)


# ---- CLI ----------------------------------------------------------------------------------------------

def test_cli_table_json_and_generate_with_no_flags(hf_checkpoint, tmp_path, invoke_cli):
    out = tmp_path / "q4"
    result = invoke_cli("convert", "--hf-path", hf_checkpoint, "--mlx-path", out, "--bits", "4", "--group-size", "32")
    assert result.exit_code == 0, result.output
    for label in ("parameters", "bits per weight", "size on disk", "max relative error", "KL(float || output)"):
        assert label in result.output
    result = invoke_cli("convert", "--hf-path", hf_checkpoint, "--mlx-path", tmp_path / "q8", "--bits", "8", "--json",
                        "--dtype", "float32")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["bits"] == 8 and report["kl_mean"] < 5e-3 and report["size_bytes"] > 0
    # the converted folder runs with no further flags (tokenizer and quantization are inside)
    gen = invoke_cli("generate", "--model", str(out), "--prompt", "Once upon", "--max-tokens", "3", "--quiet")
    assert gen.exit_code == 0, gen.output


def test_cli_average_takes_checkpoints_as_arguments(tmp_path, tiny_weights, invoke_cli):
    a = write_hf_checkpoint(tmp_path / "a", TINY_CONFIG, tiny_weights)
    b = write_hf_checkpoint(tmp_path / "b", TINY_CONFIG, random_weights(TINY_CONFIG, seed=3))
    result = invoke_cli("convert", "--average", a, b, "--mlx-path", tmp_path / "avg", "--no-eval", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "inputs (averaged)" in result.output
    result = invoke_cli("convert", a, "--mlx-path", tmp_path / "x")
    assert result.exit_code != 0 and "--average" in result.output


# ---- the layer-by-layer quality check ------------------------------------------------------

@pytest.mark.parametrize(
    "options", [{"dtype": "float32"}, {"bits": 4, "group_size": 32}, {"recipe": "mixed-4-8", "group_size": 32}]
)
def test_layerwise_check_equals_the_loaded_model(hf_checkpoint, tmp_path, options):
    """The KL check runs one layer at a time (no second full model in memory) yet computes
    exactly what `load_model` + a full forward computes, for float and quantized outputs."""
    from mlx_openelm.convert.quality import model_logits, reference_logits
    from mlx_openelm.convert.sources import open_source

    out = tmp_path / "out"
    convert(hf_checkpoint, out, evaluate=False, **options)
    tokens = TOKENS[0].tolist()
    np.testing.assert_allclose(model_logits(out, tokens), logits(load_model(out, dtype=mx.float32))[0],
                               atol=1e-5, rtol=1e-6)
    reference = reference_logits(open_source(hf_checkpoint), tokens)
    np.testing.assert_allclose(reference, logits(load_model(hf_checkpoint, dtype=mx.float32))[0],
                               atol=1e-5, rtol=1e-6)


def test_layerwise_check_holds_one_layer_at_a_time(hf_checkpoint):
    """Every tensor is requested exactly once, in model order: embedding, layer 0, 1, 2, norm."""
    from mlx_openelm.convert.quality import layerwise_logits
    from mlx_openelm.convert.sources import open_source

    source = open_source(hf_checkpoint)
    requested = []

    def tensor(name):
        requested.append(name)
        return source.get(name)

    layerwise_logits(source.args, tensor, TOKENS[0].tolist())
    assert len(requested) == len(set(requested)) == len(source.names())
    layers = [int(n.split(".")[2]) for n in requested if n.startswith("transformer.layers.")]
    assert layers == sorted(layers)
    assert requested[0] == "transformer.token_embeddings.weight" and requested[-1] == "transformer.norm.weight"


# ---- --dequantize ----------------------------------------------------------------------------

def test_dequantize_writes_the_quantized_model_back_in_float(hf_checkpoint, tmp_path):
    quantized = tmp_path / "q8"
    convert(hf_checkpoint, quantized, bits=8, group_size=32, evaluate=False)
    report = convert(quantized, tmp_path / "deq", dequantize=True, dtype="float32")
    config = json.loads((tmp_path / "deq" / "config.json").read_text())
    assert "quantization" not in config and report.source_kind == "mlx-quantized"
    weights = read_weights(tmp_path / "deq")
    assert all(w.dtype == mx.float32 for w in weights.values())
    assert weights["transformer.layers.0.attn.qkv_proj.weight"].shape == (96, 64)
    # float32 dequantized weights compute what the quantized kernels compute
    np.testing.assert_allclose(logits(load_model(tmp_path / "deq", dtype=mx.float32)),
                               logits(load_model(quantized, dtype=mx.float32)), atol=1e-4, rtol=1e-5)
    assert report.kl_mean == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("case, message", [
    ("quantized-without-flag", "holds a quantized model: pass `dequantize=True`"),
    ("float-with-flag", "dequantize: "),
    ("flag-with-bits", "dequantize: writes float weights; it cannot be combined with `bits`"),
])
def test_dequantize_refusals_leave_nothing_behind(hf_checkpoint, tmp_path, case, message):
    quantized = tmp_path / "q4"
    convert(hf_checkpoint, quantized, bits=4, group_size=32, evaluate=False)
    before = listing(tmp_path)
    args = {
        "quantized-without-flag": (quantized, {}),
        "float-with-flag": (hf_checkpoint, {"dequantize": True}),
        "flag-with-bits": (quantized, {"dequantize": True, "bits": 8}),
    }[case]
    with pytest.raises(ConfigError, match=message):
        convert(args[0], tmp_path / "out", **args[1])
    assert listing(tmp_path) == before


def test_dequantize_through_the_cli(hf_checkpoint, tmp_path, invoke_cli):
    quantized = tmp_path / "q4"
    convert(hf_checkpoint, quantized, bits=4, group_size=32, evaluate=False)
    result = invoke_cli("convert", "--hf-path", str(quantized), "--mlx-path", str(tmp_path / "f"),
                        "--dequantize", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bits"] is None
    assert "quantization" not in json.loads((tmp_path / "f" / "config.json").read_text())
