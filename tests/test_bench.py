"""`mlx-openelm bench`: the whole command on a tiny architecture, the RMSNorm ablation,
the mlx-lm comparison and validation. Speed is never asserted."""

from __future__ import annotations

import csv
import json
import math
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_openelm.config import ModelArgs, preset_args

ROW_FIELDS = ("engine", "model", "bits", "dtype", "prompt_tokens", "generation_tokens", "prompt_tps",
              "generation_tps", "peak_memory_gb", "total_tps", "trials")


def assert_ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_tiny_preset_through_the_command(bench_preset, tmp_path, invoke_cli):
    out, table = tmp_path / "out.json", tmp_path / "out.csv"
    result = invoke_cli("bench", "--preset", bench_preset, "--bits", "16,4", "--prompt-tokens", 12,
                        "--generation-tokens", 6, "--trials", 2, "--dtype", "float32", "--json", out, "--csv", table)
    assert_ok(result)
    assert "prompt tok/s" in result.stdout and "q4/g64" in result.stdout
    doc = json.loads(out.read_text())
    assert {"machine", "settings", "rows"} <= set(doc)
    for key in ("cpu", "memory_gb", "os", "mlx_version", "mlx_device"):
        assert doc["machine"][key], key
    from mlx_openelm.blas import describe, info

    blas = doc["machine"]["blas"]
    assert {key: blas[key] for key in info()} == info() and blas["sgemm_gflops"] > 0  # this process's BLAS
    assert f"BLAS: {describe(blas)}, float32 matmul" in result.stdout
    assert doc["settings"]["prompt_tokens"] == [12] and doc["settings"]["generation_tokens"] == [6]
    assert doc["settings"]["trials"] == 2 and doc["settings"]["group_size"] == 64
    rows = doc["rows"]
    assert [(r["engine"], r["bits"], r["quantized"]) for r in rows] == [("mlx-openelm", None, False),
                                                                         ("mlx-openelm", 4, True)]
    for row in rows:
        for field in ROW_FIELDS:
            assert field in row, field
        assert row["model"] == "tiny" and row["dtype"] == "float32"
        assert row["prompt_tokens"] == 12 and row["generation_tokens"] == 6
        for key in ("prompt_tps", "generation_tps", "total_tps", "peak_memory_gb", "bandwidth_gbs"):
            assert row[key] > 0 and math.isfinite(row[key]), key
        for key in ("prompt_tps", "generation_tps", "total_tps", "peak_memory_gb"):
            assert row[f"{key}_min"] <= row[key] <= row[f"{key}_max"], key
        assert len(row["trials"]) == 2
        for trial in row["trials"]:
            assert trial["generation_tokens"] == 6 and trial["prompt_tokens"] == 12
            assert trial["prompt_tps"] > 0 and trial["generation_tps"] > 0
    # 4-bit weights are smaller than float32 ones, and bytes per token say so
    assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"] / 4
    lines = list(csv.DictReader(table.open()))
    assert len(lines) == 4 and {line["trial"] for line in lines} == {"1", "2"}
    assert all(int(line["generation_tokens"]) == 6 for line in lines)


def test_bandwidth_override_gives_a_share(bench_preset, tmp_path, invoke_cli):
    out = tmp_path / "out.json"
    assert_ok(invoke_cli("bench", "--preset", bench_preset, "--prompt-tokens", 4, "--generation-tokens", 3,
                         "--trials", 1, "--no-warmup", "--bandwidth", 100, "--json", out))
    row = json.loads(out.read_text())["rows"][0]
    assert row["peak_bandwidth_gbs"] == 100
    assert row["bandwidth_share"] == pytest.approx(row["bandwidth_gbs"] / 100)


# ---- RMSNorm ablation ---------------------------------------------------------------------

def test_naive_and_fused_rmsnorm_agree():
    from mlx_openelm.bench.core import NaiveRMSNorm

    norm = nn.RMSNorm(96, eps=1e-6)
    norm.weight = mx.random.normal((96,), key=mx.random.key(1))
    x = 3.0 * mx.random.normal((2, 7, 96), key=mx.random.key(2))
    fused, naive = norm(x), NaiveRMSNorm(norm.weight, 1e-6)(x)
    assert naive.dtype == fused.dtype == mx.float32
    assert mx.allclose(naive, fused, rtol=1e-5, atol=1e-5).item()
    # and not trivially: the output is normalised, not the input
    assert not mx.allclose(naive, x).item()


def test_naive_rmsnorm_swaps_every_norm_and_restores(bench_preset):
    from mlx_openelm.bench.core import NaiveRMSNorm, naive_rmsnorm, random_model

    args = ModelArgs.from_file(bench_preset)
    model = random_model(args, mx.float32, seed=3)
    tokens = mx.array([[5, 9, 17, 33, 65]])
    fused = model(tokens)
    with naive_rmsnorm(model) as swapped:
        # attn_norm, ffn_norm, q_norm, k_norm per layer, plus the final norm
        assert swapped == 4 * args.num_transformer_layers + 1
        assert isinstance(model.layers[0].attn.q_norm, NaiveRMSNorm)
        naive = model(tokens)
    assert isinstance(model.layers[0].attn.q_norm, nn.RMSNorm)
    assert isinstance(model.transformer.norm, nn.RMSNorm)
    assert mx.allclose(naive, fused, rtol=1e-4, atol=1e-4).item()


def test_ablation_through_the_command(bench_preset, tmp_path, invoke_cli):
    out = tmp_path / "out.json"
    result = invoke_cli("bench", "--preset", bench_preset, "--ablation", "rmsnorm", "--prompt-tokens", 8,
                        "--generation-tokens", 4, "--trials", 1, "--json", out)
    assert_ok(result)
    assert "naive-rmsnorm" in result.stdout and "RMSNorm ablation" in result.stdout
    doc = json.loads(out.read_text())
    assert [r["variant"] for r in doc["rows"]] == ["", "naive-rmsnorm"]
    ratio = doc["ratios"][0]
    assert ratio["generation_tps"] == pytest.approx(doc["rows"][0]["generation_tps"] / doc["rows"][1]["generation_tps"])


# ---- mlx-lm side by side ----------------------------------------------------------------

def test_compare_mlx_lm_gives_both_rows(bench_preset, tmp_path, invoke_cli):
    pytest.importorskip("mlx_lm")
    out = tmp_path / "out.json"
    result = invoke_cli("bench", "--preset", bench_preset, "--bits", "16,8", "--compare", "mlx-lm", "--prompt-tokens", 8,
                        "--generation-tokens", 5, "--trials", 1, "--json", out)
    assert_ok(result)
    doc = json.loads(out.read_text())
    assert [(r["engine"], r["bits"]) for r in doc["rows"]] == [
        ("mlx-openelm", None), ("mlx-lm", None), ("mlx-openelm", 8), ("mlx-lm", 8)]
    for row in doc["rows"]:
        assert row["generation_tokens"] == 5 and row["generation_tps"] > 0
    assert len(doc["ratios"]) == 2 and doc["ratios"][0]["denominator"] == "mlx-lm"
    assert doc["machine"]["mlx_lm_version"]
    assert "mlx-openelm / mlx-lm" in result.stdout


def test_mlx_lm_gets_the_same_weights_and_tokens(bench_preset):
    pytest.importorskip("mlx_lm")
    from mlx_openelm.bench.core import MlxLmEngine, OursEngine, make_prompt, mlx_lm_model, quantize, random_model

    args = ModelArgs.from_file(bench_preset)
    model = random_model(args, mx.float32, seed=0)
    quantize(model, 4, 64)
    lm = mlx_lm_model(model)
    ours_params, lm_params = dict(tree_flatten(model.parameters())), dict(tree_flatten(lm.parameters()))
    assert set(ours_params) == set(lm_params)
    assert "transformer.layers.0.attn.qkv_proj.scales" in lm_params  # quantized the same way
    for name, value in ours_params.items():
        assert mx.array_equal(value, lm_params[name]).item(), name
    prompt = make_prompt(args.vocab_size, 10, seed=1)
    assert list(OursEngine(model).tokens(prompt, 6)) == list(MlxLmEngine(lm).tokens(prompt, 6))


def test_compare_without_mlx_lm_says_how_to_get_it(bench_preset, monkeypatch, invoke_cli):
    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # import mlx_lm -> ImportError
    result = invoke_cli("bench", "--preset", bench_preset, "--compare", "mlx-lm", "--trials", 1)
    assert result.exit_code == 2
    assert "pip install 'mlx-openelm[compare]'" in result.output
    assert "Traceback" not in result.output


# ---- other sources and protocols ------------------------------------------------------

def test_paper_protocol_settings(bench_preset, tmp_path, invoke_cli):
    out = tmp_path / "out.json"
    result = invoke_cli("bench", "--preset", bench_preset, "--protocol", "paper", "--generation-tokens", 4,
                        "--trials", 1, "--json", out)
    assert_ok(result)
    doc = json.loads(out.read_text())
    assert doc["settings"]["prompt"] == "fixed"
    assert [r["bits"] for r in doc["rows"]] == [None, 4]
    assert all(r["prompt_tokens"] == 35 for r in doc["rows"])
    assert "not found" not in result.stdout and "--reference-json" in result.stdout  # no invented figures


def test_paper_protocol_defaults_to_1024_tokens(bench_preset, monkeypatch, invoke_cli):
    """Without length flags the paper protocol asks the runner for 35 + 1024 tokens at 16 and 4 bits."""
    from mlx_openelm.bench import runner

    seen = []

    def fake_run(settings, progress=None):
        seen.append(settings)
        return {"rows": [], "ratios": [], "notes": [], "machine": {}}

    monkeypatch.setattr(runner, "run_benchmark", fake_run)
    assert_ok(invoke_cli("bench", "--preset", bench_preset, "--protocol", "paper"))
    assert (seen[0].prompt_tokens, seen[0].generation_tokens, seen[0].bits) == ([35], [1024], [None, 4])
    assert_ok(invoke_cli("bench", "--preset", bench_preset))
    assert (seen[1].prompt_tokens, seen[1].generation_tokens, seen[1].bits) == ([512], [128], None)


def test_model_folder(hf_checkpoint, tmp_path, invoke_cli):
    out = tmp_path / "out.json"
    # the tiny checkpoint's FFN widths (32, 64, 96) need group size 32 to quantize
    result = invoke_cli("bench", "--model", hf_checkpoint, "--bits", "16,4", "--group-size", 32, "--prompt-tokens", 6,
                        "--generation-tokens", 3, "--trials", 1, "--json", out)
    assert_ok(result)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["bits"], r["group_size"]) for r in rows] == [("OpenELM-tiny", None, None),
                                                                       ("OpenELM-tiny", 4, 32)]
    bad = invoke_cli("bench", "--model", hf_checkpoint, "--bits", "4", "--trials", 1)
    assert bad.exit_code == 1 and "--group-size" in bad.output and "multiples of 64" in bad.output


def test_random_model_matches_the_preset_architecture():
    from mlx_openelm.bench.core import kv_bytes_per_position, parameter_bytes

    args = preset_args("270M")
    # parameter count of the random 270M model is the published one (no weights built here)
    from mlx_openelm.model import Model

    model = Model(args)
    assert sum(p.size for _, p in tree_flatten(model.parameters())) == args.num_parameters()
    assert parameter_bytes(model) == 4 * args.num_parameters()
    assert kv_bytes_per_position(args, mx.float16) == sum(2 * kv * 64 * 2 for kv in args.num_kv_heads)


def test_generate_step_ignores_eos(bench_preset):
    from mlx_openelm.bench.core import random_model
    from mlx_openelm.generation import generate_step

    model = random_model(ModelArgs.from_file(bench_preset), mx.float32)
    always_eos = lambda logprobs: mx.full((logprobs.shape[0],), model.args.eos_token_id, dtype=mx.uint32)  # noqa: E731
    tokens = [step.token for step in generate_step([1, 5, 7], model, max_tokens=7, sampler=always_eos)]
    assert tokens == [model.args.eos_token_id] * 7


# ---- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "args, option, words",
    [
        (["--preset", "999M"], "--preset", "unknown preset"),
        (["--preset", "270M", "--bits", "7"], "--bits", "7 bits is not supported; choose from 16 (float), 8, 6, 5, 4, 3, 2"),
        (["--preset", "270M", "--bits", "16,x"], "--bits", "not a bit width"),
        (["--preset", "270M", "--prompt-tokens", "-5"], "--prompt-tokens", "at least 1"),
        (["--preset", "270M", "--generation-tokens", "-1"], "--generation-tokens", "at least 2"),
        (["--preset", "270M", "--trials", "0"], "--trials", "0"),
        (["--preset", "270M", "--group-size", "48"], "--group-size", "48"),
        (["--preset", "270M", "--compare", "llama.cpp"], "--compare", "llama.cpp"),
        (["--preset", "missing/config.json"], "--preset", "not found"),
    ],
)
def test_bad_values_are_clear_errors(args, option, words, invoke_cli):
    result = invoke_cli("bench", *args)
    assert result.exit_code == 2, result.output
    assert option in result.output and words in result.output
    assert "Traceback" not in result.output


def test_model_or_preset_exactly_one(bench_preset, hf_checkpoint, invoke_cli):
    for args in ([], ["--preset", bench_preset, "--model", str(hf_checkpoint)]):
        result = invoke_cli("bench", *args)
        assert result.exit_code == 2 and "--model" in result.output and "--preset" in result.output


def test_context_overflow_is_a_clear_error(bench_preset, invoke_cli):
    result = invoke_cli("bench", "--preset", bench_preset, "--prompt-tokens", 2000, "--generation-tokens", 100,
                        "--trials", 1)
    assert result.exit_code == 1 and "context" in result.output and "Traceback" not in result.output


def test_help_lists_bench(invoke_cli):
    result = invoke_cli("--help")
    assert "bench" in result.output
    result = invoke_cli("bench", "--help")
    assert result.exit_code == 0 and "--compare" in result.output and "--ablation" in result.output


# ---- hardware table and output files --------------------------------------------------

def test_chip_bandwidth_table():
    from mlx_openelm.bench.hardware import apple_chip, chip_bandwidth_gbs

    assert chip_bandwidth_gbs("Apple M2 Max") == 400.0
    assert chip_bandwidth_gbs("Apple M1") == 68.25
    assert chip_bandwidth_gbs("Apple M4 Pro") == 273.0
    assert chip_bandwidth_gbs("Apple M3 Max", performance_cores=12) == 400.0
    assert chip_bandwidth_gbs("Apple M3 Max", performance_cores=10) == 300.0
    assert chip_bandwidth_gbs("Apple M4 Max", performance_cores=12) == 546.0
    assert chip_bandwidth_gbs("AMD EPYC") is None and apple_chip("Intel(R) Xeon(R) M5") is None


def test_plot(bench_preset, tmp_path, invoke_cli):
    pytest.importorskip("matplotlib")
    png = tmp_path / "tps.png"
    assert_ok(invoke_cli("bench", "--preset", bench_preset, "--prompt-tokens", 4, "--generation-tokens", 3,
                         "--trials", 1, "--no-warmup", "--plot", png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(bench_preset, tmp_path, monkeypatch, invoke_cli):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke_cli("bench", "--preset", bench_preset, "--trials", 1, "--plot", tmp_path / "x.png")
    assert result.exit_code == 2 and "matplotlib" in result.output and "--plot" in result.output
