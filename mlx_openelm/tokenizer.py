"""Llama-2 SentencePiece tokenizer and a streaming detokenizer."""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from .errors import PromptError, TokenizerError

_SPACE = "\u2581"  # SentencePiece's word-boundary marker

CHAT_ROLES = ("system", "user", "assistant")

# Lone surrogates: how Python carries bytes that are not valid UTF-8 in a str (argv and
# stdin decode with errors="surrogateescape"); SentencePiece cannot take them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> tuple[str, bool]:
    """`text` with each byte that is not valid UTF-8 (a lone surrogate) replaced by U+FFFD,
    and whether any was. Front ends call this on what a user typed or piped in; the
    tokenizer itself refuses such text (`PromptError`) rather than guess."""
    cleaned, count = _SURROGATE.subn("\ufffd", text)
    return cleaned, count > 0


def check_text(text: str, what: str = "prompt") -> str:
    """`text` itself, if it is a str that holds only valid Unicode; else a clear error naming `what`."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    bad = _SURROGATE.search(text)
    if bad:
        code = ord(bad.group())
        # surrogateescape maps an undecodable byte b to U+DC00 + b (b >= 0x80)
        found = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise PromptError(
            f"{what} contains bytes that are not valid UTF-8 ({found} at character {bad.start()}); "
            "decode it with errors='replace' or clean it with mlx_openelm.tokenizer.clean_text"
        )
    return text


class Tokenizer:
    """SentencePiece tokenizer with OpenELM's conventions: BOS prepended, EOS stops."""

    def __init__(self, path: Union[str, Path]):
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
        self._piece_bytes: list[Optional[bytes]] = []
        for i in range(self.sp.get_piece_size()):
            if self.sp.is_byte(i):
                self._piece_bytes.append(bytes([int(self.sp.id_to_piece(i)[1:-1], 16)]))
            elif self.sp.is_control(i):
                self._piece_bytes.append(b"")
            elif self.sp.is_unknown(i):
                self._piece_bytes.append(" \u2047 ".encode())
            else:
                self._piece_bytes.append(self.sp.id_to_piece(i).replace(_SPACE, " ").encode())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, BOS first unless `add_bos` is False.

        Raises `PromptError` (a ValueError) when `text` holds bytes that are not valid
        UTF-8 (see `clean_text`).
        """
        ids = self.sp.encode(check_text(text))
        return [self.bos_id] + ids if add_bos else ids

    def chat_segments(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[Optional[str]]:
        """OpenELM-Instruct's chat format as text segments, `None` standing for EOS.

        The format is ``<|system|>\\n{sys}</s>\\n<|user|>\\n{msg}</s>\\n<|assistant|>\\n{reply}</s>\\n``
        (after BOS), plus ``<|assistant|>\\n`` when `add_generation_prompt`. Each
        ``</s>`` of the template is the EOS token; text in a message's content is
        always text (a literal "</s>" typed by a user does not become EOS).
        """
        segments: list[Optional[str]] = []
        text = ""
        for i, message in enumerate(messages):
            try:
                role, content = message["role"], message["content"]
            except (KeyError, TypeError):
                raise ValueError(
                    f"message {i} must be a mapping with 'role' and 'content', got {message!r}"
                ) from None
            if role not in CHAT_ROLES:
                raise ValueError(f"message {i}: role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            check_text(content, f"message {i} ({role})")
            segments += [text + f"<|{role}|>\n{content}", None]
            text = "\n"
        if add_generation_prompt:
            text += "<|assistant|>\n"
        if text:
            segments.append(text)
        return segments

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True, tokenize: bool = True
    ) -> list[int]:
        """Token ids of a conversation in OpenELM-Instruct's format (BOS first, see `chat_segments`).

        Matches Hugging Face's fast Llama-2 tokenizer (legacy mode), which the
        Instruct models were tuned with: the text between special tokens is encoded
        segment by segment, each with SentencePiece's leading-space rule, so
        ``"<|user|>\\nhi</s>\\n<|assistant|>\\n"`` is
        ``[BOS] + encode("<|user|>\\nhi") + [EOS] + encode("\\n<|assistant|>\\n")``.
        """
        if not tokenize:  # mlx-lm's habit; as text, "</s>" would come back as text, not EOS
            raise TypeError("apply_chat_template returns token ids only (tokenize=False is not supported): "
                            "pass the ids as the prompt to generate or stream_generate")
        ids = [self.bos_id]
        for segment in self.chat_segments(messages, add_generation_prompt):
            ids += [self.eos_id] if segment is None else self.sp.encode(segment)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; ids past the tokenizer (a padded model vocab, e.g. CoreNet's 32128) are skipped."""
        size = self.vocab_size
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < size])

    def piece_bytes(self, token: int) -> bytes:
        if 0 <= token < len(self._piece_bytes):
            return self._piece_bytes[token]
        return b""  # ids past the tokenizer (a padded model vocab) decode to nothing

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns tokens into text as they arrive.

    Concatenating everything returned by `add_token` and `finalize` equals
    `tokenizer.decode(all_tokens)`: byte-fallback pieces are held until they form
    complete UTF-8 characters (an invalid byte becomes one U+FFFD, as SentencePiece
    does), and the leading space of the first word is dropped as SentencePiece does.
    """

    def __init__(self, tokenizer: Tokenizer):
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
