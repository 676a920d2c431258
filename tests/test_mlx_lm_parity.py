"""Same random weights in mlx-lm's OpenELM and ours: equal logits and equal greedy tokens.

Runs only when mlx-lm is installed (`pip install -e ".[compare]"`).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm import generate_step, load_model
from synthetic import mlx_lm_model

pytest.importorskip("mlx_lm.models.openelm")
lm_cache = pytest.importorskip("mlx_lm.models.cache")

TOKENS = [1, 40, 7, 250, 33, 12, 90, 5, 300, 77]


@pytest.mark.parametrize("fixture", ["hf_checkpoint", "untied_checkpoint"])
def test_logits_equal_mlx_lm(request, fixture):
    folder = request.getfixturevalue(fixture)
    ours, theirs = load_model(folder, dtype="float32"), mlx_lm_model(folder)
    tokens = mx.array(TOKENS)[None]
    np.testing.assert_allclose(np.array(ours(tokens)), np.array(theirs(tokens)), atol=1e-4, rtol=1e-5)


def test_cached_greedy_decoding_equals_mlx_lm(hf_checkpoint):
    ours, theirs = load_model(hf_checkpoint, dtype="float32"), mlx_lm_model(hf_checkpoint)
    our_tokens = [step.token for step in generate_step(TOKENS, ours, max_tokens=20)]
    cache = lm_cache.make_prompt_cache(theirs)
    logits = theirs(mx.array(TOKENS)[None], cache=cache)
    their_tokens = []
    for _ in range(20):
        token = int(mx.argmax(logits[0, -1]).item())
        their_tokens.append(token)
        logits = theirs(mx.array([[token]]), cache=cache)
    assert our_tokens == their_tokens


@pytest.mark.parametrize("mixed", [False, True])
def test_loads_mlx_lm_quantized_folders(hf_checkpoint, tmp_path, mixed):
    """Folders written by mlx-lm's converter (the mlx-community/... format) load and compute
    what mlx-lm computes, including its per-layer entries at the top of `quantization`."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    theirs = mlx_lm_model(hf_checkpoint)
    config = json.loads((hf_checkpoint / "config.json").read_text())

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if mixed and path == "transformer.token_embeddings":
            return {"group_size": 32, "bits": 8}
        if mixed and path == "transformer.layers.1.ffn.proj_2":
            return False
        return True

    theirs, config = quantize_model(theirs, config, 32, 4, quant_predicate=predicate)
    save_model(tmp_path, theirs)
    save_config(config, config_path=tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization" in saved and ("transformer.token_embeddings" in saved["quantization"]) == mixed

    ours = load_model(tmp_path, dtype="float32")
    tokens = mx.array(TOKENS)[None]
    expected = np.array(theirs(tokens))
    np.testing.assert_allclose(np.array(ours(tokens)), expected, atol=1e-4, rtol=1e-5)

    from mlx_openelm.convert import convert

    convert(tmp_path, tmp_path.parent / f"{tmp_path.name}-float", dequantize=True, dtype="float32", evaluate=False)
    dequantized = load_model(tmp_path.parent / f"{tmp_path.name}-float", dtype="float32")
    np.testing.assert_allclose(np.array(dequantized(tokens)), expected, atol=1e-4, rtol=1e-5)
