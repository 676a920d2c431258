"""Tokenizers with OpenELM's conventions (BOS first, EOS stops, the Instruct chat template),
from a SentencePiece ``tokenizer.model`` or a Hugging Face ``tokenizer.json``.

``Tokenizer(path)`` opens either file (see `common.Tokenizer`); `common` holds what both
share, `sentencepiece_backend` and `tokenizers_backend` what each format needs.
"""

from .common import CHAT_ROLES, Detokenizer, Tokenizer, check_text, clean_text
from .tokenizers_backend import HFTokenizer  # registered first: tried before SentencePiece
from .sentencepiece_backend import SentencePieceTokenizer  # noqa: I001 (registration order)

__all__ = ["CHAT_ROLES", "Detokenizer", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "check_text",
           "clean_text"]
