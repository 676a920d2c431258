"""Synthetic OpenELM checkpoints and configs, tiny tokenizers and sample texts, built offline.

The checkpoints use Apple's tensor names and config.json keys with random
weights, so every loader path can be tested without downloading anything.
`CountingModel` wraps a model to see what each call is fed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import numpy as np

# Per-layer heads and FFN widths differ, as in the real models (layer-wise scaling).
TINY_CONFIG = {
    "activation_fn_name": "swish",
    "architectures": ["OpenELMForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_openelm.OpenELMConfig",
        "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
    },
    "bos_token_id": 1,
    "eos_token_id": 2,
    "ffn_dim_divisor": 32,
    "ffn_multipliers": [0.5, 1.0, 1.5],
    "ffn_with_glu": True,
    "head_dim": 16,
    "initializer_range": 0.02,
    "max_context_length": 2048,
    "model_dim": 64,
    "model_type": "openelm",
    "normalization_layer_name": "rms_norm",
    "normalize_qk_projections": True,
    "num_gqa_groups": 4,
    "num_kv_heads": [1, 2, 3],
    "num_query_heads": [4, 8, 12],
    "num_transformer_layers": 3,
    "qkv_multipliers": [0.5, 1.0],
    "rope_freq_constant": 10000,
    "rope_max_length": 4096,
    "share_input_output_layers": True,
    "torch_dtype": "float32",
    "transformers_version": "4.39.3",
    "use_cache": True,
    "vocab_size": 384,
}

UNTIED_CONFIG = {**TINY_CONFIG, "share_input_output_layers": False, "normalize_qk_projections": False}

# A small architecture with layer-wise scaling whose widths are multiples of 64,
# so it quantizes with the default group size. Used through `--preset PATH` (conftest's
# `bench_preset` fixture).
BENCH_CONFIG = {
    "model_type": "openelm",
    "model_dim": 128,
    "head_dim": 32,
    "num_transformer_layers": 3,
    "vocab_size": 512,
    "num_query_heads": [4, 4, 8],
    "num_kv_heads": [1, 2, 2],
    "ffn_multipliers": [0.5, 1.0, 2.0],
    "ffn_dim_divisor": 64,
}

TOKENIZER_TEXT = [
    "Once upon a time there was a little robot who loved apples.",
    "Héllo wörld! Ça va? 日本語のテキスト。 Emoji 🎉🚀 are fun.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "  leading spaces and\ttabs\nnewlines   here",
    "Apple silicon runs MLX; OpenELM uses layer-wise scaling.",
    "<|user|>\nWhat is the capital of France?\n<|assistant|>\nParis is the capital.",
]


# Texts every tokenizer must round-trip and stream exactly: accents, CJK, emoji, whitespace.
TEXT_SAMPLES = [
    "Once upon a time there was a little robot who loved apples.",
    "Héllo wörld! Ça va? 日本語のテキスト。 Emoji 🎉🚀 are fun.",
    "  leading spaces and\ttabs\nnewlines   here",
    "🎉",
    " x",
]


def ffn_dim(multiplier: float, model_dim: int, divisor: int) -> int:
    value = multiplier * model_dim
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def random_weights(config: dict, seed: int = 0, classifier: bool = False) -> dict[str, np.ndarray]:
    """Random float32 tensors with the names and shapes of an HF OpenELM checkpoint."""
    rng = np.random.default_rng(seed)
    d, hd = config["model_dim"], config["head_dim"]

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm(dim: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32)

    # scale 0.25 keeps next-token distributions broad enough for sampling tests
    embeddings = 0.25 * rng.standard_normal((config["vocab_size"], d))
    w = {"transformer.token_embeddings.weight": embeddings.astype(np.float32)}
    for i in range(config["num_transformer_layers"]):
        q, kv = config["num_query_heads"][i], config["num_kv_heads"][i]
        f = ffn_dim(config["ffn_multipliers"][i], d, config["ffn_dim_divisor"])
        p = f"transformer.layers.{i}."
        w[p + "attn_norm.weight"] = norm(d)
        w[p + "attn.qkv_proj.weight"] = linear((q + 2 * kv) * hd, d)
        if config["normalize_qk_projections"]:
            w[p + "attn.q_norm.weight"] = norm(hd)
            w[p + "attn.k_norm.weight"] = norm(hd)
        w[p + "attn.out_proj.weight"] = linear(d, q * hd)
        w[p + "ffn_norm.weight"] = norm(d)
        w[p + "ffn.proj_1.weight"] = linear(2 * f if config["ffn_with_glu"] else f, d)
        w[p + "ffn.proj_2.weight"] = linear(d, f)
    w["transformer.norm.weight"] = norm(d)
    if not config["share_input_output_layers"]:
        w["lm_head.weight"] = linear(config["vocab_size"], d)
    if classifier:  # HF saves this unused head; loaders must ignore it
        w["transformer.classifier.weight"] = linear(config["vocab_size"], d)
    return w


def write_hf_checkpoint(
    folder: Path,
    config: dict,
    weights: dict[str, np.ndarray],
    dtype: str = "float32",
    shards: int = 1,
    tokenizer: Optional[Path] = None,
) -> Path:
    """Write `config.json` and safetensors (one file, or `shards` files plus an index), and a copy
    of `tokenizer` (a tokenizer.model or tokenizer.json, under its own name)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2))
    names = sorted(weights)
    groups = [names[i::shards] for i in range(shards)]
    files = (
        ["model.safetensors"]
        if shards == 1
        else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    )
    for file, group in zip(files, groups):
        tensors = {name: weights[name] for name in group}
        if dtype == "float32":
            from safetensors.numpy import save_file

            save_file(tensors, str(folder / file), metadata={"format": "pt"})
        else:
            import mlx.core as mx

            mx.save_safetensors(
                str(folder / file),
                {k: mx.array(v).astype(getattr(mx, dtype)) for k, v in tensors.items()},
                metadata={"format": "pt"},
            )
    if shards > 1:
        index = {
            "metadata": {"total_size": int(sum(v.nbytes for v in weights.values()))},
            "weight_map": {name: file for file, group in zip(files, groups) for name in group},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        (folder / Path(tokenizer).name).write_bytes(Path(tokenizer).read_bytes())  # tokenizer.model or .json
    return folder


def mlx_lm_model(folder: Path):
    """mlx-lm's OpenELM built from a checkpoint folder by mlx-lm's own reading of its config.json and
    model.safetensors (not through our loader or config, so a parity test compares two independent
    readings; `mlx_openelm.bench.core.mlx_lm_model` copies an already loaded model of ours instead).
    Needs mlx-lm: a test module using it importorskips mlx_lm first."""
    import mlx.core as mx
    from mlx_lm.models import openelm

    config = json.loads((Path(folder) / "config.json").read_text())
    model = openelm.Model(openelm.ModelArgs.from_dict(config))
    weights = mx.load(str(Path(folder) / "model.safetensors"))
    weights.pop("transformer.classifier.weight", None)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path],
               commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay out `files` ({name: source path}) as huggingface_hub's cache holds a downloaded repo."""
    import shutil

    owner, name = repo_id.split("/")
    repo = Path(cache) / f"models--{owner}--{name}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for filename, source in files.items():
        shutil.copy(source, snapshot / filename)
    return snapshot


def train_tokenizer(path: Path, vocab_size: int = 384) -> Path:
    """A small Llama-style SentencePiece BPE model (unk 0, BOS 1, EOS 2, byte fallback)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXT * 20),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    Path(path).write_bytes(buffer.getvalue())
    return Path(path)


# SmolLM2's first special tokens, at its ids: BOS 1 is <|im_start|>, EOS 2 is <|im_end|>.
BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_byte_level_tokenizer(path: Path, vocab_size: int = 384) -> Path:
    """A small byte-level BPE tokenizer.json like SmolLM2's: GPT-2's byte alphabet, the special
    tokens above, no normalizer and no post-processor (nothing adds BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BYTE_LEVEL_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TOKENIZER_TEXT * 20, trainer)
    assert tokenizer.get_vocab_size() == vocab_size, "TOKENIZER_TEXT too short for this many merges"
    tokenizer.save(str(path))
    return Path(path)


class CountingModel:
    """Wraps a model, recording how many tokens each call feeds; can raise KeyboardInterrupt on call k."""

    def __init__(self, model, interrupt_at=None):
        self.model = model
        self.args = model.args
        self.layers = model.layers
        self.widths: list[int] = []
        self.interrupt_at = interrupt_at

    def __call__(self, tokens, cache=None):
        if self.interrupt_at is not None and len(self.widths) + 1 == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        self.widths.append(tokens.shape[1])
        return self.model(tokens, cache=cache)
