"""What every tokenizer backend shares: OpenELM's conventions (BOS always first, EOS stops),
the Instruct chat template, and the checks on the text it is given."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union

from ..errors import PromptError, TokenizerError

CHAT_ROLES = ("system", "user", "assistant")

# Lone surrogates: how Python carries bytes that are not valid UTF-8 in a str (argv and
# stdin decode with errors="surrogateescape"); no tokenizer can take them.
_SURROGATE = re.compile("[\ud800-\udfff]")

PathLike = Union[str, Path]


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


class Detokenizer(Protocol):
    """Streaming text of a token sequence: what `add_token` and `finalize` return, joined,
    equals `tokenizer.decode` of all the tokens."""

    def add_token(self, token: int) -> str: ...

    def finalize(self) -> str: ...


# (accepts(path), backend class), in the order `Tokenizer(path)` tries them; filled by the backends.
_BACKENDS: list[tuple[Callable[[Path], bool], type]] = []


def register_backend(accepts: Callable[[Path], bool]):
    """Class decorator: `Tokenizer(path)` opens files for which `accepts(path)` is true with this class."""
    def register(cls):
        _BACKENDS.append((accepts, cls))
        return cls
    return register


class Tokenizer:
    """A tokenizer with OpenELM's conventions: BOS prepended, EOS stops, the Instruct template.

    ``Tokenizer(path)`` opens a SentencePiece ``tokenizer.model`` or a Hugging Face
    ``tokenizer.json`` (chosen by the file: a ``.json`` name or JSON content), returning the
    backend's subclass. `bos_id`/`eos_id` serve formats whose file does not say which token
    is which (tokenizer.json; the loader passes the model config's ``bos_token_id`` and
    ``eos_token_id``); a SentencePiece model defines its own.
    """

    path: Path
    bos_id: int
    eos_id: int

    def __new__(cls, path: PathLike, bos_id: Optional[int] = None, eos_id: Optional[int] = None):
        if cls is Tokenizer:
            cls = next(backend for accepts, backend in _BACKENDS if accepts(Path(path)))
        return super().__new__(cls)

    # ---- what a backend provides --------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (added tokens included)."""
        raise NotImplementedError

    def encode_text(self, text: str) -> list[int]:
        """Token ids of checked `text` alone: no BOS, and special-token text stays text."""
        raise NotImplementedError

    def decode_ids(self, ids: list[int]) -> str:
        """Text of ids that are all within the tokenizer; special tokens print nothing."""
        raise NotImplementedError

    def piece(self, token: int) -> str:
        """The token's name in the vocabulary (as logprobs show a control token)."""
        raise NotImplementedError

    def piece_bytes(self, token: int) -> bytes:
        """The bytes the token adds to the text (empty for control tokens and ids past the tokenizer)."""
        raise NotImplementedError

    def detokenizer(self) -> Detokenizer:
        raise NotImplementedError

    # ---- the shared conventions ---------------------------------------------------

    def check_special_ids(self) -> None:
        """Refuse BOS/EOS ids the vocabulary does not hold (named after the file)."""
        for name, token in (("BOS", self.bos_id), ("EOS", self.eos_id)):
            if not 0 <= token < self.vocab_size:
                raise TokenizerError(f"{self.path}: the {name} id {token} is not in the tokenizer's "
                                     f"{self.vocab_size} tokens")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, BOS first unless `add_bos` is False.

        Raises `PromptError` (a ValueError) when `text` holds bytes that are not valid
        UTF-8 (see `clean_text`).
        """
        ids = self.encode_text(check_text(text))
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; ids past the tokenizer (a padded model vocab, e.g. CoreNet's 32128) are skipped."""
        size = self.vocab_size
        return self.decode_ids([int(i) for i in ids if 0 <= int(i) < size])

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

        Matches Hugging Face's fast tokenizer rendering the same template (for Llama-2's,
        in legacy mode, which the Instruct models were tuned with): the text between
        special tokens is encoded segment by segment, so
        ``"<|user|>\\nhi</s>\\n<|assistant|>\\n"`` is
        ``[BOS] + encode("<|user|>\\nhi") + [EOS] + encode("\\n<|assistant|>\\n")``.
        """
        if not tokenize:  # mlx-lm's habit; as text, "</s>" would come back as text, not EOS
            raise TypeError("apply_chat_template returns token ids only (tokenize=False is not supported): "
                            "pass the ids as the prompt to generate or stream_generate")
        ids = [self.bos_id]
        for segment in self.chat_segments(messages, add_generation_prompt):
            ids += [self.eos_id] if segment is None else self.encode_text(segment)
        return ids
