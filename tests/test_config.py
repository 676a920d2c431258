"""ModelArgs against Apple's published architectures, and config validation errors."""

from __future__ import annotations

import json
import math
import re
import warnings
from importlib import resources
from pathlib import Path

import pytest

from mlx_openelm.config import (
    KEYS,
    MAX_LAYER_WIDTH,
    PRESET_NAMES,
    ModelArgs,
    make_divisible,
    preset_args,
    preset_config,
    preset_parameters,
)
from mlx_openelm.errors import ConfigError, OpenELMWarning
from synthetic import TINY_CONFIG

# The project's shared golden values, and the copy shipped with the tests (so the checks below
# compare presets.json with an independent file even where ../shared is absent).
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openelm_configs.json"
GOLDEN = Path(__file__).resolve().parent / "golden" / "openelm_configs.json"


@pytest.fixture(scope="module")
def published():
    return json.loads(GOLDEN.read_text())


def test_golden_copy_equals_the_shared_reference():
    if not SHARED.is_file():
        pytest.skip(f"{SHARED} not present: the copy in tests/golden cannot be compared with it")
    assert json.loads(GOLDEN.read_text()) == json.loads(SHARED.read_text())


def test_packaged_presets_equal_the_golden_values(published):
    table = json.loads(resources.files("mlx_openelm").joinpath("presets.json").read_text())["presets"]
    assert [f"OpenELM-{name}" for name in PRESET_NAMES] == [k for k in published if not k.startswith("_")]
    for name, entry in table.items():
        golden = {**published["_common"], **published[f"OpenELM-{name}"]}
        for key, value in entry["config"].items():
            assert value == golden[key], (name, key)
        assert entry["ffn_dims"] == golden["ffn_dims"] and entry["parameters"] == golden["parameters"]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_match_published_architecture(published, name):
    golden = published[f"OpenELM-{name}"]
    args = preset_args(name)
    assert args.num_transformer_layers == golden["num_transformer_layers"]
    assert list(args.num_query_heads) == golden["num_query_heads"]
    assert list(args.num_kv_heads) == golden["num_kv_heads"]
    assert list(args.ffn_dims) == golden["ffn_dims"]
    assert args.num_parameters() == golden["parameters"] == preset_parameters(name)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_corenet_form_derives_the_published_lists(published, name):
    """CoreNet configs give [min, max] multipliers; the per-layer lists must come out as Apple's."""
    golden = published[f"OpenELM-{name}"]
    config = preset_config(name)
    for key in ("num_query_heads", "num_kv_heads"):
        del config[key]
    config["ffn_multipliers"] = [golden["ffn_multipliers"][0], golden["ffn_multipliers"][-1]]
    args = ModelArgs.from_dict(config)
    assert list(args.num_query_heads) == golden["num_query_heads"]
    assert list(args.num_kv_heads) == golden["num_kv_heads"]
    assert list(args.ffn_multipliers) == golden["ffn_multipliers"]
    assert list(args.ffn_dims) == golden["ffn_dims"]


def test_make_divisible_rounds_to_nearest_and_bumps_when_far_below():
    assert make_divisible(0.5 * 1280, 256) == 768  # 640 rounds up to 768
    assert make_divisible(1.2 * 1280, 256) == 1536
    assert make_divisible(100, 256) == 256  # never below the divisor
    assert make_divisible(0.5 * 3072, 256) == 1536
    # 1.14 * 256 = 291.84 rounds to 256, which is >10% below: bumped to 512
    assert make_divisible(291.84, 256) == 512


def test_tiny_config_reads_and_round_trips():
    args = ModelArgs.from_dict(TINY_CONFIG)
    assert args.num_query_heads == (4, 8, 12)
    assert args.num_kv_heads == (1, 2, 3)
    assert args.ffn_dims == (32, 64, 96)
    assert args.qkv_out_dims == (96, 192, 288)
    assert ModelArgs.from_dict(args.to_dict()) == args


def _broken(**changes):
    config = dict(TINY_CONFIG)
    for key, value in changes.items():
        if value is KeyError:
            config.pop(key)
        else:
            config[key] = value
    return config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "llama"}, "'model_type' is 'llama'"),
        ({"model_dim": KeyError}, "missing required key 'model_dim'"),
        ({"vocab_size": KeyError}, "missing required key 'vocab_size'"),
        ({"ffn_multipliers": KeyError}, "missing required key 'ffn_multipliers'"),
        ({"num_query_heads": [4, 8]}, "'num_query_heads' has 2 entries but 'num_transformer_layers' is 3"),
        ({"num_kv_heads": [1, 2, 3, 4]}, "'num_kv_heads' has 4 entries"),
        ({"ffn_multipliers": [0.5, 1.0, 1.5, 2.0]}, "'ffn_multipliers' has 4 entries"),
        ({"num_kv_heads": [1, 3, 3]}, "layer 1: 'num_query_heads' (8) is not divisible by 'num_kv_heads' (3)"),
        ({"head_dim": 0}, "'head_dim' must be positive"),
        ({"model_dim": "64"}, "'model_dim' must be int"),
        ({"num_query_heads": [4, "8", 12]}, "'num_query_heads' must be a list of integers"),
        ({"activation_fn_name": "gelu"}, "'activation_fn_name' is 'gelu'"),
        ({"normalization_layer_name": "layer_norm"}, "'normalization_layer_name' is 'layer_norm'"),
    ],
)
def test_bad_config_names_the_key(changes, message):
    with pytest.raises(ConfigError) as info:
        ModelArgs.from_dict(_broken(**changes), source="some/config.json")
    assert message in str(info.value)
    assert str(info.value).startswith("some/config.json: ")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_transformer_layers": 100000}, "'num_transformer_layers' is 100000, over the limit of 1024"),
        ({"vocab_size": 10**12}, "'vocab_size' is 1000000000000, over the limit of 2097152"),
        ({"vocab_size": 10**400}, "'vocab_size' is 1000000000000"),  # shortened, not 400 digits
        ({"model_dim": 10**6}, "'model_dim' is 1000000, over the limit of 65536"),
        ({"head_dim": 10**5}, "'head_dim' is 100000, over the limit of 4096"),
        ({"max_context_length": 10**12}, "'max_context_length' is 1000000000000, over the limit"),
        ({"rope_freq_constant": 0}, "'rope_freq_constant' must be positive, got 0.0"),
        ({"rope_freq_constant": -10000}, "'rope_freq_constant' must be positive, got -10000.0"),
        ({"rope_freq_constant": math.nan}, "'rope_freq_constant' must be a finite number, got nan"),
        ({"rope_freq_constant": math.inf}, "'rope_freq_constant' must be a finite number, got inf"),
        ({"rope_freq_constant": 10**400}, "'rope_freq_constant' must be a finite number, got inf"),
        ({"model_dim": math.inf}, "'model_dim' must be int, got inf"),
        ({"ffn_multipliers": [0.5, math.nan, 1.5]}, "'ffn_multipliers'[1] must be a finite number, got nan"),
        ({"ffn_multipliers": [0.5, -1.0, 1.5]}, "'ffn_multipliers'[1] must be positive, got -1.0"),
        ({"ffn_multipliers": [0.5, 1.0, 1e9]}, "'ffn_multipliers'[2] is 1000000000.0, over the limit of 64"),
        ({"num_query_heads": [4, 8, 0]}, "'num_query_heads'[2] must be positive, got 0"),
        ({"num_kv_heads": [1, 2, 10**6]}, "'num_kv_heads'[2] is 1000000, over the limit of 1024"),
        ({"bos_token_id": -1}, "'bos_token_id' must be >= 0, got -1"),
        ({"eos_token_id": 384}, "'eos_token_id' (384) is not below 'vocab_size' (384)"),
        ({"ffn_with_glu": 1}, "'ffn_with_glu' must be bool, got 1"),
        ({"num_transformer_layers": True}, "'num_transformer_layers' must be int, got True"),
        # widths derived from keys that are each in range
        ({"model_dim": 8192, "ffn_multipliers": [0.5, 1.0, 40.0]},
         "layer 2: 'ffn_multipliers', 'model_dim' and 'ffn_dim_divisor' give a FFN width of 327680, over the limit"),
        ({"head_dim": 4096, "num_query_heads": [4, 8, 96]},
         "layer 2: 'num_query_heads', 'num_kv_heads' and 'head_dim' give a q/k/v width of 417792, over the limit"),
    ],
)
def test_absurd_values_fail_fast_naming_the_key(changes, message):
    with pytest.raises(ConfigError) as info:
        ModelArgs.from_dict(_broken(**changes), source="some/config.json")
    assert str(info.value).startswith(f"some/config.json: {message}")
    assert len(str(info.value)) < 250 and "\n" not in str(info.value)


def test_corenet_form_with_bad_multipliers_names_the_key():
    config = _broken(num_query_heads=KeyError, num_kv_heads=KeyError)
    # derived from qkv_multipliers: widths 32, 48, 64 rounded to multiples of head_dim x groups (64)
    assert ModelArgs.from_dict(config).num_query_heads == (4, 4, 4)
    for bad, message in [(math.nan, "'qkv_multipliers'[1] must be a finite number"),
                         (0.0, "'qkv_multipliers'[1] must be positive")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            ModelArgs.from_dict({**config, "qkv_multipliers": [0.5, bad]})


def test_the_largest_published_model_is_well_inside_the_limits():
    args = preset_args("3B", vocab_size=32128)
    for key, spec in KEYS.items():
        values = getattr(args, key)
        for value in values if isinstance(values, tuple) else [values]:
            assert value * 10 <= spec.high or spec.kind is bool, key
    assert max(args.ffn_dims + args.qkv_out_dims) * 10 <= MAX_LAYER_WIDTH


def test_json_literals_nan_and_infinity_are_refused(tmp_path):
    text = json.dumps({**TINY_CONFIG, "rope_freq_constant": 12345.5}).replace("12345.5", "NaN")
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"config.json: 'rope_freq_constant' must be a finite number, got nan"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text(text.replace("NaN", "-Infinity"))
    with pytest.raises(ConfigError, match=r"'rope_freq_constant' must be a finite number, got -inf"):
        ModelArgs.from_file(tmp_path)


def test_rms_norm_eps_is_optional_and_checked():
    assert ModelArgs.from_dict(TINY_CONFIG).rms_norm_eps == 1e-6  # Apple's fixed value
    assert ModelArgs.from_dict({**TINY_CONFIG, "rms_norm_eps": 1e-5}).rms_norm_eps == 1e-5
    with pytest.raises(ConfigError, match=r"'rms_norm_eps' must be positive, got 0.0"):
        ModelArgs.from_dict({**TINY_CONFIG, "rms_norm_eps": 0})
    with pytest.raises(ConfigError, match=r"'rms_norm_eps' is 2.0, over the limit of 1"):
        ModelArgs.from_dict({**TINY_CONFIG, "rms_norm_eps": 2.0})


def test_unknown_keys_are_reported_not_silently_dropped():
    with pytest.warns(OpenELMWarning, match=r"ignoring unknown config keys \['mystery_knob'\]"):
        ModelArgs.from_dict({**TINY_CONFIG, "mystery_knob": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Apple's own keys raise no warning
        ModelArgs.from_dict(TINY_CONFIG)


def test_from_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        ModelArgs.from_file(tmp_path)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown preset '7B'; choose one of 270M, 450M, 1_1B, 3B"):
        preset_args("7B")
    assert PRESET_NAMES == ("270M", "450M", "1_1B", "3B")  # read from presets.json
    for alias in ("1.1B", "1B", "OpenELM-1.1B", "OpenELM-1_1B"):
        assert preset_args(alias) == preset_args("1_1B")
        assert preset_parameters(alias) == preset_parameters("1_1B")
    assert preset_args("OpenELM-3B") == preset_args("3B")
    with pytest.raises(ConfigError, match="unknown preset 'OpenELM-7B'"):
        preset_parameters("OpenELM-7B")


def test_same_vocabulary_accepts_equal_sizes_and_corenets_padding_only():
    from mlx_openelm.config import same_vocabulary

    assert same_vocabulary(32000, 32000) and same_vocabulary(384, 384)
    assert same_vocabulary(32000, 32128) and same_vocabulary(32128, 32000)
    assert not same_vocabulary(32000, 32001) and not same_vocabulary(320, 384)
