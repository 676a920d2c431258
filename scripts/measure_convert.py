"""Measure the converter against mlx-lm's on an OpenELM-270M-shaped random checkpoint.

Each step runs in its own process so peak memory (ru_maxrss) is per conversion:

    python scripts/measure_convert.py make    /tmp/m270/src
    python scripts/measure_convert.py ours    /tmp/m270/src /tmp/m270/ours-q4  4 64
    python scripts/measure_convert.py mlxlm   /tmp/m270/src /tmp/m270/mlxlm-q4 4 64
    python scripts/measure_convert.py compare /tmp/m270/src /tmp/m270/ours-q4 /tmp/m270/mlxlm-q4
    python scripts/measure_convert.py ours    /tmp/m270/src /tmp/m270/ours-mixed mixed-4-8 64
    python scripts/measure_convert.py ours    /tmp/m270/src /tmp/m270/q3-minmax 3 64 minmax eval
    python scripts/measure_convert.py make    /tmp/m270/outliers outliers
    python scripts/measure_convert.py ours    /tmp/m270/outliers /tmp/m270/o-q4c 4 64 optimal eval TEXT TOKENIZER

`ours` takes the quantization method (optimal, the default, or minmax) and, with `eval`,
runs the converter's own KL check and prints its numbers plus the mean and worst
per-tensor relative error. A text file and a tokenizer after `eval` calibrate on that text
(--calibration-text); `make DIR outliers` gives 16 of the 1280 channels 20x larger
activations at every qkv_proj/proj_1 input (random weights have no outlier channels).

Both converters quantize from float16 (our default for 270M; mlx-lm given --dtype float16)
with the same bits and group size. `compare` runs both outputs on the same fixed tokens
(our model code for ours, mlx-lm's for theirs, both computing in float32) and reports the
mean KL(float || quantized), the worst per-tensor relative error and bits per weight.
Needs mlx-lm (`pip install -e ".[compare]"`); not part of the test suite.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


OUTLIER_CHANNELS = 16  # of 1280: a few input channels with 20x larger activations, as trained LLMs have


def make(folder: str, variant: str = "") -> None:
    from mlx_openelm.config import preset_config
    from support import synthetic

    config = preset_config("270M")
    weights = synthetic.random_weights(config, seed=0)
    if variant == "outliers":  # large attn_norm/ffn_norm weights on the same few channels of every layer
        channels = np.random.default_rng(1).choice(config["model_dim"], OUTLIER_CHANNELS, replace=False)
        for name in weights:
            if name.endswith(("attn_norm.weight", "ffn_norm.weight")):
                weights[name][channels] *= 20
    # With the tied head, the embedding's scale sets the logits' spread: N(0, 1) entries give logits
    # of std ~36 and one-hot next-token distributions, where any KL is ~0. Rescale it to std
    # 4/sqrt(model_dim) so the logits spread like a trained LM's (std ~4) and the KL is informative.
    embedding = weights["transformer.token_embeddings.weight"]
    embedding *= (4 / np.sqrt(config["model_dim"])) / embedding.std()
    synthetic.write_hf_checkpoint(Path(folder), {**config, "torch_dtype": "float32"}, weights)
    print(json.dumps({"made": folder, "tensors": len(weights)}))


def ours(src: str, out: str, bits: str, group: str, method: str = "optimal", evaluate: str = "",
         calibration_text: str = "", tokenizer: str = "") -> None:
    """`calibration_text` and `tokenizer` (the random checkpoints ship none): --calibration-text."""
    from mlx_openelm.convert import convert

    start = time.perf_counter()
    quant = {"recipe": bits} if bits.startswith("mixed-") else {"bits": int(bits)}
    report = convert(src, out, group_size=int(group), dtype="float16", evaluate=evaluate == "eval", force=True,
                     method=method, calibration_text=calibration_text or None, tokenizer=tokenizer or None, **quant)
    result = {"converter": "ours", "method": method, "bits": bits, "seconds": time.perf_counter() - start,
              "peak_mb": peak_mb(), "bits_per_weight": report.bits_per_weight, "size_bytes": report.size_bytes,
              "calibration": report.calibration}
    if evaluate == "eval" and calibration_text:  # folded weights differ from the input's by design
        result.update(kl_mean=report.kl_mean, top1_agreement=report.top1_agreement)
    elif evaluate == "eval":
        mean_rel, worst, worst_name = tensor_errors(src, out)
        result.update(kl_mean=report.kl_mean, top1_agreement=report.top1_agreement, mean_rel_error=mean_rel,
                      max_rel_error=worst, max_rel_error_tensor=worst_name)
    print(json.dumps(result))


def tensor_errors(src: str, out: str) -> tuple[float, float, str]:
    """Mean and worst ||w' - w|| / ||w|| over the quantized tensors of `out` (w from `src`)."""
    import mlx.core as mx

    from mlx_openelm.loading import read_weights

    source, weights = read_weights(Path(src)), read_weights(Path(out))
    errors = {}
    for name, w in source.items():
        prefix = name[: -len("weight")]
        if prefix + "scales" not in weights:
            continue
        q, scales = weights[name], weights[prefix + "scales"]
        bits, group = 32 * q.shape[-1] // w.shape[-1], w.shape[-1] // scales.shape[-1]
        approx = mx.dequantize(q, scales.astype(mx.float32), weights[prefix + "biases"].astype(mx.float32),
                               group_size=group, bits=bits)
        errors[name] = (mx.linalg.norm((approx - w).flatten()) / mx.linalg.norm(w.flatten())).item()
    worst = max(errors, key=errors.get)
    return float(np.mean(list(errors.values()))), errors[worst], worst


def mlxlm(src: str, out: str, bits: str, group: str) -> None:
    """mlx_lm.convert without the tokenizer step (these checkpoints ship none): the same
    load (lazy), cast to float16, quantize_model and save_model that mlx_lm.convert runs."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    start = time.perf_counter()
    model, config = load_model(Path(src), lazy=True)
    model.update(tree_map(lambda v: v.astype(mx.float16) if mx.issubdtype(v.dtype, mx.floating) else v,
                          model.parameters()))
    model, config = quantize_model(model, config, int(group), int(bits))
    Path(out).mkdir(parents=True, exist_ok=True)
    save_model(Path(out), model, donate_model=True)
    save_config(config, config_path=Path(out) / "config.json")
    print(json.dumps({"converter": "mlx-lm", "seconds": time.perf_counter() - start, "peak_mb": peak_mb()}))


def compare(src: str, ours_path: str, theirs_path: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model as lm_load_model

    from mlx_openelm.convert.quality import eval_tokens, kl_divergence
    from mlx_openelm.loading import load_model, read_weights

    float_model = load_model(src, dtype=mx.float32)
    tokens = eval_tokens(float_model.args)
    x = mx.array([tokens])
    ref = np.array(float_model(x)[0])
    source = {k: v for k, v in read_weights(Path(src)).items()}
    del float_model

    def rel_errors(weights: dict) -> tuple[float, str]:
        worst, worst_name = 0.0, ""
        for name, w in source.items():
            prefix = name[: -len("weight")]
            if prefix + "scales" in weights:
                q = weights[name]
                bits = 32 * q.shape[-1] // w.shape[-1]
                group = w.shape[-1] // weights[prefix + "scales"].shape[-1]
                approx = mx.dequantize(q, weights[prefix + "scales"], weights[prefix + "biases"],
                                       group_size=group, bits=bits)
            else:
                approx = weights[name]
            approx = approx.astype(mx.float32)
            rel = (mx.linalg.norm((approx - w).flatten()) / mx.linalg.norm(w.flatten())).item()
            if rel > worst:
                worst, worst_name = rel, name
        return worst, worst_name

    def bits_per_weight(weights: dict, parameters: int) -> float:
        return sum(v.nbytes for v in weights.values()) * 8 / parameters

    parameters = sum(v.size for v in source.values())
    results = {}
    ours_model = load_model(ours_path, dtype=mx.float32)
    out = np.array(ours_model(x)[0])
    results["ours"] = (out, read_weights(Path(ours_path)))
    del ours_model
    theirs_model, _ = lm_load_model(Path(theirs_path))
    theirs_model.set_dtype(mx.float32)
    out = np.array(theirs_model(x)[0].astype(mx.float32))
    theirs_weights = dict(tree_flatten(theirs_model.parameters()))
    results["mlx-lm"] = (out, {k: v.astype(mx.float16) if mx.issubdtype(v.dtype, mx.floating) else v
                               for k, v in theirs_weights.items()})
    for name, (logits, weights) in results.items():
        kl = kl_divergence(ref, logits)
        worst, worst_name = rel_errors(weights)
        print(json.dumps({
            "converter": name, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float((ref.argmax(-1) == logits.argmax(-1)).mean()),
            "max_rel_error": worst, "max_rel_error_tensor": worst_name,
            "bits_per_weight": bits_per_weight(weights, parameters),
        }))
    a, b = results["ours"][1], results["mlx-lm"][1]
    same = all(k in b and mx.array_equal(a[k], b[k]).item() for k in a) and set(a) == set(b)
    print(json.dumps({"identical_tensors": same}))


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"make": make, "ours": ours, "mlxlm": mlxlm, "compare": compare}[command](*rest)
