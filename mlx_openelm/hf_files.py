"""Hugging Face tokenizer files for a model folder, so the ecosystem opens it as we do.

A converted folder holds Llama-2's SentencePiece ``tokenizer.model``. With the files
written here beside it, ``transformers.AutoTokenizer``, ``mlx_lm.load`` and
``mlx_lm.chat`` open the folder and produce exactly our `Tokenizer.apply_chat_template`
ids:

- ``tokenizer_config.json``: the tokenizer class, BOS/EOS/unk, the OpenELM-Instruct
  ``chat_template`` (Jinja), and ``"legacy": true``. Current transformers'
  LlamaTokenizer(Fast) otherwise drops SentencePiece's leading-space rule for text that
  follows a special token, so ``</s>\\n<|assistant|>`` would lose the ``▁`` the Instruct
  models were tuned with.
- ``special_tokens_map.json``: the same special tokens, for older readers.
- ``generation_config.json``: BOS/EOS ids, as Apple's repos ship it.

No ``tokenizer.json`` is written: transformers builds the fast tokenizer from
``tokenizer.model`` (in legacy mode) when it loads the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

# OpenELM-Instruct's format, as `Tokenizer.chat_segments` defines it: after BOS, each message is
# "<|role|>\n{content}</s>\n" with </s> the EOS token, then "<|assistant|>\n" for a generation
# prompt. tests/test_hf_files.py checks the two agree token for token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('OpenELM-Instruct roles are system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

PathLike = Union[str, Path]


def special_tokens(tokenizer_path: PathLike) -> dict[str, tuple[int, str]]:
    """``{"unk_token": (id, piece), "bos_token": ..., "eos_token": ...}`` read from a SentencePiece model."""
    import sentencepiece as spm

    from .errors import TokenizerError

    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{tokenizer_path}: not a SentencePiece model ({e})") from None
    ids = {"unk_token": sp.unk_id(), "bos_token": sp.bos_id(), "eos_token": sp.eos_id()}
    missing = [name for name, i in ids.items() if i < 0]
    if missing:
        raise TokenizerError(f"{tokenizer_path}: tokenizer defines no {', '.join(missing)}")
    return {name: (i, sp.id_to_piece(i)) for name, i in ids.items()}


def tokenizer_config(tokens: dict[str, tuple[int, str]], max_length: int) -> dict:
    """The ``tokenizer_config.json`` contents (Llama-2's, in legacy mode, with the Instruct template)."""
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


def write_tokenizer_files(folder: PathLike, max_length: int = 2048) -> list[Path]:
    """Write the Hugging Face tokenizer files beside `folder`'s tokenizer.model; return their paths.

    A folder without tokenizer.model gets nothing (there is no tokenizer to describe).
    `max_length` is the model's context (config.json's ``max_context_length``).
    """
    folder = Path(folder)
    sp_path = folder / TOKENIZER_FILE
    if not sp_path.is_file():
        return []
    tokens = special_tokens(sp_path)
    contents = {
        "tokenizer_config.json": tokenizer_config(tokens, max_length),
        "special_tokens_map.json": {name: piece for name, (_i, piece) in tokens.items()},
        "generation_config.json": {"bos_token_id": tokens["bos_token"][0], "eos_token_id": tokens["eos_token"][0]},
    }
    written = []
    for name in HF_TOKENIZER_FILES:
        path = folder / name
        path.write_text(json.dumps(contents[name], indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written

