"""Llama-2's SentencePiece ``tokenizer.model`` and its streaming detokenizer."""

from __future__ import annotations

import codecs
import re
from functools import cached_property
from pathlib import Path
from typing import Optional

from ..errors import TokenizerError
from .common import PathLike, Tokenizer, register_backend

_SPACE = "\u2581"  # SentencePiece's word-boundary marker


@register_backend(lambda path: True)  # tried last: whatever is not a tokenizer.json
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; it names its own BOS and EOS pieces (`bos_id`/`eos_id` are not used).
    BOS comes first unless a tokenizer_config.json beside it says ``"add_bos_token": false``."""

    def __init__(self, path: PathLike, bos_id: Optional[int] = None, eos_id: Optional[int] = None):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({e})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{self.path}: tokenizer defines no BOS/EOS pieces")
        # Per-id piece text (with the space marker made a space) and byte values.
        self._piece_bytes: list[bytes] = []
        for i in range(self.sp.get_piece_size()):
            if self.sp.is_byte(i):
                self._piece_bytes.append(bytes([int(self.sp.id_to_piece(i)[1:-1], 16)]))
            elif self.sp.is_control(i):
                self._piece_bytes.append(b"")
            elif self.sp.is_unknown(i):
                self._piece_bytes.append(" \u2047 ".encode())
            else:
                self._piece_bytes.append(self.sp.id_to_piece(i).replace(_SPACE, " ").encode())
        self._read_conventions(own_add_bos=True)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode_ids(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    @cached_property
    def _specials(self) -> tuple[re.Pattern, dict[str, int]]:
        """The control and unknown pieces (<s>, </s>, <unk>: the special tokens transformers' Llama tokenizer
        has) and a pattern that finds them, longest first."""
        pieces = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                  if self.sp.is_control(i) or self.sp.is_unknown(i)}
        return re.compile("|".join(map(re.escape, sorted(pieces, key=len, reverse=True)))), pieces

    def encode_special(self, text: str) -> list[int]:
        # as transformers' Llama tokenizer in legacy mode: the text between special tokens is encoded piece by
        # piece, each with SentencePiece's leading space
        pattern, ids = self._specials
        out, start = [], 0
        for match in pattern.finditer(text):
            out += self.encode_text(text[start:match.start()]) + [ids[match.group()]]
            start = match.end()
        return out + self.encode_text(text[start:])

    def piece(self, token: int) -> str:
        return self.sp.id_to_piece(token)

    def piece_bytes(self, token: int) -> bytes:
        if 0 <= token < len(self._piece_bytes):
            return self._piece_bytes[token]
        return b""  # ids past the tokenizer (a padded model vocab) decode to nothing

    def detokenizer(self) -> "SentencePieceDetokenizer":
        return SentencePieceDetokenizer(self)


class SentencePieceDetokenizer:
    """Turns tokens into text as they arrive.

    Concatenating everything returned by `add_token` and `finalize` equals
    `tokenizer.decode(all_tokens)`: byte-fallback pieces are held until they form
    complete UTF-8 characters (an invalid byte becomes one U+FFFD, as SentencePiece
    does), and the leading space of the first word is dropped as SentencePiece does.
    """

    def __init__(self, tokenizer: SentencePieceTokenizer):
        self.tokenizer = tokenizer
        self._pending = b""  # bytes of an unfinished UTF-8 character
        self._at_start = True

    def add_token(self, token: int) -> str:
        """Feed one token id; return the text it completes (maybe empty)."""
        token = int(token)
        chunk = self.tokenizer.piece_bytes(token)
        if not chunk:  # control tokens (BOS/EOS) print nothing but end a byte run
            return self._decode_pending(final=True)
        is_byte = self.tokenizer.sp.is_byte(token)
        if self._at_start:
            self._at_start = False
            if chunk.startswith(b" ") and not is_byte and not self.tokenizer.sp.is_unknown(token):
                chunk = chunk[1:]
        if is_byte:
            self._pending += chunk
            return self._decode_pending(final=False)
        return self._decode_pending(final=True) + chunk.decode()

    def finalize(self) -> str:
        """Flush an unfinished byte sequence (as U+FFFD per byte, like SentencePiece)."""
        return self._decode_pending(final=True)

    def _decode_pending(self, final: bool) -> str:
        out, buf = [], self._pending
        while buf:
            length = _utf8_length(buf[0])
            head = buf[:length]
            try:
                out.append(head.decode() if len(head) == length else None)
            except UnicodeDecodeError:
                out.append("\ufffd")  # invalid: one replacement per byte
                buf = buf[1:]
                continue
            if out[-1] is None:  # incomplete character
                out.pop()
                if not final and _is_valid_prefix(head):
                    break
                out.append("\ufffd")
                buf = buf[1:]
                continue
            buf = buf[length:]
        self._pending = buf
        return "".join(out)


def _utf8_length(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 1  # a stray continuation or invalid lead byte: decodes to U+FFFD


def _is_valid_prefix(head: bytes) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return True
    except UnicodeDecodeError:
        return False
