"""ModelArgs against Apple's published architectures, and config validation errors."""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path

import pytest

from mlx_openelm.config import PRESET_NAMES, ModelArgs, make_divisible, preset_args, preset_config, preset_parameters
from mlx_openelm.errors import ConfigError, OpenELMWarning
from synthetic import TINY_CONFIG

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openelm_configs.json"


@pytest.fixture(scope="module")
def published():
    """The project's shared reference file; without it, the golden values shipped in the package."""
    if SHARED.is_file():
        return json.loads(SHARED.read_text())
    table = json.loads(resources.files("mlx_openelm").joinpath("presets.json").read_text())["presets"]
    return {f"OpenELM-{name}": {**entry["config"], **entry} for name, entry in table.items()}


def test_packaged_presets_equal_the_shared_reference():
    if not SHARED.is_file():
        pytest.skip(f"{SHARED} not present")
    shared = json.loads(SHARED.read_text())
    table = json.loads(resources.files("mlx_openelm").joinpath("presets.json").read_text())["presets"]
    for name, entry in table.items():
        golden = shared[f"OpenELM-{name}"]
        for key in ("num_transformer_layers", "model_dim", "head_dim", "num_query_heads", "num_kv_heads",
                    "ffn_multipliers"):
            assert entry["config"][key] == golden[key], (name, key)
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
    assert preset_args("1.1B") == preset_args("1_1B")
