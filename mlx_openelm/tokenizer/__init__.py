"""Tokenizers with their folder's conventions (whether BOS comes first, which ids stop, the chat
template, OpenELM-Instruct's format where there is none), from a SentencePiece ``tokenizer.model``
or a Hugging Face ``tokenizer.json``.

``Tokenizer(path)`` opens either file (see `common.Tokenizer`); `common` holds what both
share, `chat_template` the Jinja chat templates, `sentencepiece_backend` and
`tokenizers_backend` what each format needs.
"""

from .chat_template import ChatTemplate
from .common import CHAT_ROLES, Detokenizer, Tokenizer, check_text, clean_text
from .tokenizers_backend import HFTokenizer  # registered first: tried before SentencePiece
from .sentencepiece_backend import SentencePieceTokenizer  # noqa: I001 (registration order)

__all__ = ["CHAT_ROLES", "ChatTemplate", "Detokenizer", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "check_text",
           "clean_text"]
