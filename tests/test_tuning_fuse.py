"""`mlx-openelm fuse`: the fused float model computes what the model with its adapter does (fp32
round-off), a quantized base is re-quantized at its own widths (or written in float), every other
tensor is copied as stored, mlx-lm loads the result, and the output is installed atomically."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm import load_model
from mlx_openelm.convert import convert
from mlx_openelm.loading import read_weights
from mlx_openelm.tuning.adapters import adapter_weights, apply_adapters
from mlx_openelm.tuning.config import check_adapter_config
from mlx_openelm.tuning.saving import save_adapters

TOKENS = [1, 40, 7, 250, 33, 12, 90, 5, 300, 77]


def logits(model):
    out = model(mx.array(TOKENS)[None])
    mx.eval(out)
    return np.array(out[0])


def make_adapter(base, out, kind, seed=0, num_layers=2):
    model = load_model(base, dtype="float32")
    config = check_adapter_config(kind, num_layers, len(model.layers), rank=4, scale=2.0, keys=["qkv_proj", "proj_1"])
    apply_adapters(model, config)
    rng = np.random.default_rng(seed)
    model.load_weights([(n, a * 1.2 if n.endswith(".m") else mx.array(rng.normal(0, 0.1, a.shape), mx.float32))
                        for n, a in adapter_weights(model).items()], strict=False)
    save_adapters(model, out, config)
    return out


@pytest.fixture(scope="module")
def quantized(hf_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "q4"
    convert(hf_checkpoint, out, bits=4, group_size=32, dtype="float32", evaluate=False)
    return out


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_the_fused_float_model_equals_the_model_with_its_adapter(hf_checkpoint, tmp_path, kind, invoke_cli):
    adapter = make_adapter(hf_checkpoint, tmp_path / "a", kind)
    result = invoke_cli("fuse", "--model", hf_checkpoint, "--adapter-path", adapter, "--save-path", tmp_path / "f",
                        "--json")
    assert result.exit_code == 0, result.output
    expected = logits(load_model(hf_checkpoint, dtype="float32", adapter_path=adapter))
    assert np.abs(expected - logits(load_model(hf_checkpoint, dtype="float32"))).max() > 1e-2
    np.testing.assert_allclose(logits(load_model(tmp_path / "f", dtype="float32")), expected, atol=1e-4, rtol=1e-5)
    before, after = read_weights(hf_checkpoint), read_weights(tmp_path / "f")
    changed = {n for n in after if not mx.array_equal(after[n], before[n]).item()}
    if kind != "full":
        assert changed == {f"transformer.layers.{i}.{k}.weight" for i in (1, 2) for k in ("attn.qkv_proj", "ffn.proj_1")}
    assert (tmp_path / "f" / "tokenizer.model").read_bytes() == (hf_checkpoint / "tokenizer.model").read_bytes()
    assert json.loads(result.stdout)["fused_layers"] == (0 if kind == "full" else 4)


def test_a_quantized_base_is_requantized_at_its_widths_or_written_in_float(quantized, tmp_path, invoke_cli):
    adapter = make_adapter(quantized, tmp_path / "a", "lora")
    with_adapter = load_model(quantized, dtype="float32", adapter_path=adapter)
    assert invoke_cli("fuse", "--model", quantized, "--adapter-path", adapter,
                      "--save-path", tmp_path / "q").exit_code == 0
    before, after = read_weights(quantized), read_weights(tmp_path / "q")
    assert set(after) == set(before)
    name = "transformer.layers.2.attn.qkv_proj"
    assert after[f"{name}.weight"].dtype == mx.uint32 and after[f"{name}.weight"].shape == before[f"{name}.weight"].shape
    assert not mx.array_equal(after[f"{name}.weight"], before[f"{name}.weight"]).item()
    assert mx.array_equal(after["transformer.layers.0.attn.qkv_proj.weight"],
                          before["transformer.layers.0.attn.qkv_proj.weight"]).item()  # not adapted: as stored
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == json.loads((quantized / "config.json").read_text())["quantization"]
    requantized = logits(load_model(tmp_path / "q", dtype="float32"))
    expected = logits(with_adapter)
    base_change = np.abs(expected - logits(load_model(quantized, dtype="float32"))).max()
    assert np.abs(requantized - expected).max() < 0.5 * base_change  # 4-bit rounding of the merged weights only

    result = invoke_cli("fuse", "--model", quantized, "--adapter-path", adapter, "--save-path", tmp_path / "d",
                        "--dequantize")
    assert result.exit_code == 0, result.output
    assert "quantization" not in json.loads((tmp_path / "d" / "config.json").read_text())
    assert all(a.dtype == mx.float32 for a in read_weights(tmp_path / "d").values())
    np.testing.assert_allclose(logits(load_model(tmp_path / "d", dtype="float32")), expected, atol=1e-4, rtol=1e-5)


def test_mlx_lm_loads_the_fused_folder(hf_checkpoint, quantized, tmp_path, invoke_cli):
    lm_utils = pytest.importorskip("mlx_lm.utils")
    for base in (hf_checkpoint, quantized):
        adapter = make_adapter(base, tmp_path / f"a-{base.name}", "dora")
        out = tmp_path / f"f-{base.name}"
        assert invoke_cli("fuse", "--model", base, "--adapter-path", adapter, "--save-path", out).exit_code == 0
        theirs, _ = lm_utils.load_model(out)
        np.testing.assert_allclose(logits(theirs), logits(load_model(out, dtype="float32")), atol=1e-4, rtol=1e-5)


def test_fuse_refuses_an_existing_output_and_a_bad_adapter_in_one_line(hf_checkpoint, tmp_path, invoke_cli):
    adapter = make_adapter(hf_checkpoint, tmp_path / "a", "lora")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "mine").write_text("x")
    result = invoke_cli("fuse", "--model", hf_checkpoint, "--adapter-path", adapter, "--save-path", tmp_path / "f")
    assert result.exit_code == 1 and "pass --force to replace it" in result.output
    assert (tmp_path / "f" / "mine").read_text() == "x"
    (adapter / "adapter_config.json").write_text('{"num_layers": 7, "lora_parameters": {"rank": 4, "scale": 2}}')
    result = invoke_cli("fuse", "--model", hf_checkpoint, "--adapter-path", adapter, "--save-path", tmp_path / "g")
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "num_layers: 7 does not fit" in result.output
    assert not (tmp_path / "g").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "f"]


def test_full_fine_tuning_of_a_quantized_model_is_refused(quantized, tmp_path):
    model = load_model(quantized)
    with pytest.raises(Exception, match="the model is quantized; train lora or dora on it"):
        apply_adapters(model, check_adapter_config("full", 1, len(model.layers)))
