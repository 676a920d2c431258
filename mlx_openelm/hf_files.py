"""Hugging Face tokenizer files for a model folder, so the ecosystem opens it as we do.

A converted folder holds Llama-2's SentencePiece ``tokenizer.model`` or a Hugging Face
``tokenizer.json``. With the files written here beside it, ``transformers.AutoTokenizer``, ``mlx_lm.load`` and
``mlx_lm.chat`` open the folder and produce exactly our `Tokenizer.apply_chat_template`
ids:

- ``tokenizer_config.json``: the tokenizer class, BOS/EOS/unk, the OpenELM-Instruct
  ``chat_template`` (Jinja), and ``"legacy": true``. Current transformers'
  LlamaTokenizer(Fast) otherwise drops SentencePiece's leading-space rule for text that
  follows a special token, so ``</s>\\n<|assistant|>`` would lose the ``▁`` the Instruct
  models were tuned with.
- ``special_tokens_map.json``: the same special tokens, for older readers.
- ``generation_config.json``: BOS/EOS ids, as Apple's repos ship it (one already in the folder,
  the source's, is kept).

No ``tokenizer.json`` is written beside a tokenizer.model: transformers builds the fast
tokenizer from it (in legacy mode) when it loads the folder. Beside a tokenizer.json the
files name the tokenizer class ``PreTrainedTokenizerFast`` and the BOS/EOS pieces of the
model's ids; a tokenizer_config.json or special_tokens_map.json that came with the
tokenizer.json is kept as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from .folder.names import (GENERATION_CONFIG, HF_TOKENIZER_FILES, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG,
                           TOKENIZER_FILE, TOKENIZER_JSON)
from .tokenizer.common import OPENELM_CHAT_TEMPLATE as CHAT_TEMPLATE

PathLike = Union[str, Path]


def special_tokens(tokenizer) -> dict[str, tuple[int, str]]:
    """``{"bos_token": (id, piece), "eos_token": ..., "unk_token": ...}`` of a `Tokenizer`
    (unk only for a SentencePiece model, which always has one)."""
    tokens = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    if hasattr(tokenizer, "sp"):
        tokens = {"unk_token": tokenizer.sp.unk_id(), **tokens}
    return {name: (i, tokenizer.piece(i)) for name, i in tokens.items()}


def tokenizer_config(tokens: dict[str, tuple[int, str]], max_length: int) -> dict:
    """The ``tokenizer_config.json`` contents for a tokenizer.model (Llama-2's, in legacy mode,
    with the Instruct template)."""
    added = {
        str(i): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, piece in sorted(tokens.values())
    }
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        **{name: piece for name, (_i, piece) in tokens.items()},
        "pad_token": None,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "sp_model_kwargs": {},
        "chat_template": CHAT_TEMPLATE,
    }


def json_tokenizer_config(tokens: dict[str, tuple[int, str]], max_length: int) -> dict:
    """The ``tokenizer_config.json`` contents for a tokenizer.json (the file itself holds the rest)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{name: piece for name, (_i, piece) in tokens.items()},
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer_files(folder: PathLike, max_length: int = 2048, bos_id: Optional[int] = None,
                          eos_id: Optional[int] = None) -> list[Path]:
    """Write the Hugging Face tokenizer files beside `folder`'s tokenizer; return their paths.

    The tokenizer is `folder`'s tokenizer.model, else its tokenizer.json (whose BOS/EOS are
    `bos_id`/`eos_id`, the model's; for a tokenizer.json, files already there are kept). A
    folder with neither gets nothing. `max_length` is the model's context (config.json's
    ``max_context_length``).
    """
    from .tokenizer import Tokenizer

    folder = Path(folder)
    if (folder / TOKENIZER_FILE).is_file():
        tokenizer, config = Tokenizer(folder / TOKENIZER_FILE), tokenizer_config
        keep = {GENERATION_CONFIG} if (folder / GENERATION_CONFIG).is_file() else set()
    elif (folder / TOKENIZER_JSON).is_file():
        tokenizer = Tokenizer(folder / TOKENIZER_JSON, bos_id=bos_id, eos_id=eos_id)
        keep, config = {name for name in HF_TOKENIZER_FILES if (folder / name).is_file()}, json_tokenizer_config
    else:
        return []
    tokens = special_tokens(tokenizer)
    contents = {
        TOKENIZER_CONFIG: config(tokens, max_length),
        SPECIAL_TOKENS_MAP: {name: piece for name, (_i, piece) in tokens.items()},
        GENERATION_CONFIG: {"bos_token_id": tokens["bos_token"][0], "eos_token_id": tokens["eos_token"][0]},
    }
    written = []
    for name in HF_TOKENIZER_FILES:
        if name not in keep:
            path = folder / name
            path.write_text(json.dumps(contents[name], indent=2, ensure_ascii=False) + "\n")
            written.append(path)
    return written
