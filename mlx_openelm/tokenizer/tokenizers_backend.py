"""A Hugging Face ``tokenizer.json`` (read with the `tokenizers` library) and its streaming
detokenizers: exact byte by byte for byte-level BPE (GPT-2 style, as SmolLM2's), by
re-decoding for any other decoder (a converted Llama-2 tokenizer's, for example)."""

from __future__ import annotations

import codecs
import json
import re
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from ..errors import OpenELMWarning, TokenizerError
from ..folder.names import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG
from .common import PathLike, Tokenizer, register_backend

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token (Llama-2's <0x0A>)

# Files beside a tokenizer.json that name its special tokens (tried in this order).
SPECIAL_TOKEN_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)


def is_tokenizer_json(path: Path) -> bool:
    """A `.json` name, or content that starts like JSON (a SentencePiece model is binary protobuf)."""
    if path.suffix.lower() == ".json":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip()[:1] == b"{"
    except OSError:
        return False


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves,
    the others (controls, space, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _read_tokenizer_json(path: Path) -> tuple[Any, dict]:
    """The `tokenizers.Tokenizer` and the parsed JSON of `path`, with one-line errors naming it."""
    from tokenizers import Tokenizer as Backend

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"{path}: not a tokenizer.json (not UTF-8 text)") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the tokenizer ({e.strerror})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise TokenizerError(f"{path}: not a tokenizer.json (not valid JSON: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise TokenizerError(f"{path}: not a tokenizer.json (JSON without the 'model' object a Hugging Face "
                             "tokenizer file holds)")
    try:
        backend = Backend.from_str(text)
    except Exception as e:  # the library raises a bare Exception with the serde error
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"{path}: not a tokenizer.json the tokenizers library can read ({reason})") from None
    return backend, data


def _named_special_ids(path: Path, backend) -> tuple[Optional[Path], dict[str, int]]:
    """The first tokenizer_config.json or special_tokens_map.json beside `path` that names
    both BOS and EOS, and their ids; `(None, {})` when none does."""
    for name in SPECIAL_TOKEN_FILES:
        try:
            config = json.loads((path.parent / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(config, dict):
            continue
        found = {}
        for key in ("bos_token", "eos_token"):
            token = config.get(key)
            content = token.get("content") if isinstance(token, dict) else token
            token_id = backend.token_to_id(content) if isinstance(content, str) else None
            if token_id is not None:
                found[key] = token_id
        if len(found) == 2:
            return path.parent / name, found
    return None, {}


@register_backend(is_tokenizer_json)
class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``.

    Text is encoded without the file's post-processor (BOS is prepended once, by `encode`, where
    the post-processor or tokenizer_config.json's ``add_bos_token`` says so, never twice) and
    with special-token text kept as text, as SentencePiece does. A tokenizer.json
    does not say which token is BOS or EOS: they are `bos_id`/`eos_id` when given (the
    loader passes the model config's ``bos_token_id``/``eos_token_id``), else the
    ``bos_token``/``eos_token`` of a tokenizer_config.json or special_tokens_map.json beside it.
    """

    def __init__(self, path: PathLike, bos_id: Optional[int] = None, eos_id: Optional[int] = None):
        self.path = Path(path)
        self.backend, data = _read_tokenizer_json(self.path)
        self.backend.encode_special_tokens = True  # a "<|im_end|>" typed in a prompt is text
        self._size = self.backend.get_vocab_size(with_added_tokens=True)
        self._special = {t["id"] for t in data.get("added_tokens") or () if isinstance(t, dict) and t.get("special")}
        self._set_special_ids(bos_id, eos_id)
        decoder = data.get("decoder")
        self.byte_level = isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"
        self._read_conventions(own_add_bos=self._post_processor_adds_bos())

    def _post_processor_adds_bos(self) -> bool:
        """Whether the file's post-processor puts BOS before the text (a Llama-2 tokenizer.json's does,
        SmolLM2's has none)."""
        bare = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        return full[: len(full) - len(bare)][:1] == [self.bos_id] and full[len(full) - len(bare):] == bare

    @cached_property
    def _special_backend(self):
        """A copy of the backend that finds special-token text (for a chat template's output)."""
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(self.backend.to_str())
        backend.encode_special_tokens = False
        return backend

    def encode_special(self, text: str) -> list[int]:
        return self._special_backend.encode(text, add_special_tokens=False).ids

    @cached_property
    def _piece_bytes(self) -> list[bytes]:
        """Each id's bytes as the ByteLevel decoder makes them: each character's byte, or, for a
        token with a character outside the alphabet (an added token), its own UTF-8. Built on
        first use (streaming, logprobs): 49152 tokens take a few tenths of a second."""
        alphabet = byte_level_alphabet()
        to_bytes = str.maketrans({c: chr(b) for c, b in alphabet.items()})
        outside = re.compile("[^" + re.escape("".join(alphabet)) + "]")
        table = [b""] * self._size
        for text, token in self.backend.get_vocab(with_added_tokens=True).items():
            if token not in self._special and token < self._size:  # (a hole in the ids shortens the count)
                table[token] = text.encode() if outside.search(text) else text.translate(to_bytes).encode("latin-1")
        return table

    def _set_special_ids(self, bos_id: Optional[int], eos_id: Optional[int]) -> None:
        """BOS/EOS: the ids given, else those the files beside the tokenizer name; a file naming
        other ids than the given ones gets a warning (the given ones, the model's, are used)."""
        source, named = _named_special_ids(self.path, self.backend)
        if (bos_id is None or eos_id is None) and not named:
            raise TokenizerError(
                f"{self.path}: a tokenizer.json does not say which tokens are BOS and EOS, and no "
                f"{' or '.join(SPECIAL_TOKEN_FILES)} beside it names them: pass bos_id and eos_id "
                "(loading a model folder takes them from its config.json)")
        chosen = {"bos_token": named["bos_token"] if bos_id is None else int(bos_id),
                  "eos_token": named["eos_token"] if eos_id is None else int(eos_id)}
        self.bos_id, self.eos_id = chosen["bos_token"], chosen["eos_token"]
        self.check_special_ids()
        for key, token in chosen.items():
            if key in named and named[key] != token:
                warnings.warn(f"{source}: its {key} is {self.piece(named[key])!r} (id {named[key]}) but the "
                              f"model's is id {token} ({self.piece(token)!r}); using the model's",
                              OpenELMWarning, stacklevel=4)

    @cached_property
    def unsettled(self) -> frozenset[int]:
        """Tokens that may still change the text before them (for `RedecodingDetokenizer`):
        byte-fallback pieces (a run of them decodes as a whole) and the special tokens that
        decoding skips inside such a run."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return frozenset(self._special | {i for t, i in vocab.items() if _BYTE_PIECE.fullmatch(t)})

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode_text(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode_ids(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def piece(self, token: int) -> str:
        return self.backend.id_to_token(token) or ""

    def piece_bytes(self, token: int) -> bytes:
        if not 0 <= token < self._size or token in self._special:
            return b""
        if self.byte_level:
            return self._piece_bytes[token]
        return self.decode_ids([token]).encode()

    def detokenizer(self):
        return ByteLevelDetokenizer(self) if self.byte_level else RedecodingDetokenizer(self)


class ByteLevelDetokenizer:
    """Byte-level BPE text as tokens arrive: their bytes through an incremental UTF-8 decoder,
    which holds back a character's first bytes until its last arrives and replaces invalid
    bytes as the library's lossy decoding does, so the pieces join to `decode`'s text."""

    def __init__(self, tokenizer: HFTokenizer):
        self._bytes = tokenizer.piece_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add_token(self, token: int) -> str:
        return self._utf8.decode(self._bytes(int(token)))

    def finalize(self) -> str:
        return self._utf8.decode(b"", final=True)


class RedecodingDetokenizer:
    """Any other decoder: re-decode a short window and emit what is new. The window starts at
    the last token already printed, which takes the decoder's start-of-text rules (Llama-2's
    strip of the first space) for the new tokens, so each step decodes a few tokens, not the
    whole sequence. A trailing run of byte-fallback tokens (decoded as a whole: its last byte
    can change its first) or a trailing U+FFFD is held back until settled."""

    def __init__(self, tokenizer: HFTokenizer):
        self._decode = tokenizer.decode
        self._unsettled = tokenizer.unsettled
        self._size = tokenizer.vocab_size
        self._window: list[int] = []  # a printed context token (after the first step), then the rest
        self._sent = 0  # characters of the window's text already returned

    def _settles(self, token: int) -> bool:
        return token not in self._unsettled and 0 <= token < self._size

    def add_token(self, token: int) -> str:
        window = self._window
        window.append(int(token))
        end = len(window)
        while end and not self._settles(window[end - 1]):
            end -= 1
        text = self._decode(window[:end])
        settled = text.rstrip("\ufffd")
        new, self._sent = settled[self._sent:], max(self._sent, len(settled))
        if end == len(window) and settled == text:  # all printed: the last token becomes the context
            self._window = [window[-1]]
            self._sent = len(self._decode(self._window))
        return new

    def finalize(self) -> str:
        text = self._decode(self._window)
        new, self._sent = text[self._sent:], len(text)
        return new
