"""What every tokenizer backend shares: the conventions its folder sets (whether BOS comes first,
the chat template, the special tokens' names; `_read_conventions`), OpenELM-Instruct's chat
format for folders without a template, and the checks on the text it is given."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union

from ..errors import PromptError, TokenizerError
from .chat_template import ChatTemplate, read_folder_template, read_tokenizer_config

CHAT_ROLES = ("system", "user", "assistant")
# The special tokens transformers names (and passes to chat templates as variables).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Lone surrogates: how Python carries bytes that are not valid UTF-8 in a str (argv and
# stdin decode with errors="surrogateescape"); no tokenizer can take them.
_SURROGATE = re.compile("[\ud800-\udfff]")

PathLike = Union[str, Path]


# OpenELM-Instruct's format as Jinja (what the converter writes into tokenizer_config.json), as
# `Tokenizer.chat_segments` defines it: after BOS, each message is
# "<|role|>\n{content}</s>\n" with </s> the EOS token, then "<|assistant|>\n" for a generation
# prompt. tests/test_hf_files.py checks the two agree token for token.
OPENELM_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('OpenELM-Instruct roles are system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


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


def token_text(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, or an object with its "content"."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


class Tokenizer:
    """A tokenizer with its folder's conventions: whether BOS comes first, which ids end a reply, the chat
    template (OpenELM-Instruct's format where the folder has none).

    ``Tokenizer(path)`` opens a SentencePiece ``tokenizer.model`` or a Hugging Face
    ``tokenizer.json`` (chosen by the file: a ``.json`` name or JSON content), returning the
    backend's subclass. `bos_id`/`eos_id` serve formats whose file does not say which token
    is which (tokenizer.json; the loader passes the model config's ``bos_token_id`` and
    ``eos_token_id``); a SentencePiece model defines its own.

    From the files beside it: `add_bos` (tokenizer_config.json's ``add_bos_token``, else the
    tokenizer's own rule: always for SentencePiece, as Llama-2's tokenizer does; a tokenizer.json's
    post-processor), `chat_template` (a `ChatTemplate`, or None; assign another to override it) and
    the special tokens templates see. `eos_ids`: every id that ends a reply (`eos_id` and, from the
    loader, the model folder's generation_config.json ``eos_token_id`` list).
    """

    path: Path
    bos_id: int
    eos_id: int
    add_bos: bool = True
    chat_template: Optional[ChatTemplate] = None
    _more_eos_ids: frozenset = frozenset()

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

    def encode_special(self, text: str) -> list[int]:
        """Token ids of checked text a chat template wrote: special-token text becomes the special token
        (as transformers tokenizes a template's output, with ``add_special_tokens=False``)."""
        raise NotImplementedError

    # ---- the shared conventions ---------------------------------------------------

    def _read_conventions(self, own_add_bos: bool) -> None:
        """Read the folder's conventions (see the class docstring); `own_add_bos`: the tokenizer's own rule."""
        config = read_tokenizer_config(self.path.parent)
        add_bos = config.get("add_bos_token")
        self.add_bos = add_bos if isinstance(add_bos, bool) else own_add_bos
        template = read_folder_template(self.path.parent, config)
        # Our converter writes OpenELM-Instruct's format as Jinja for other tools; here the built-in
        # path renders it, which keeps message text as text (a typed "</s>" is not EOS), as before.
        self.chat_template = None if template and template.templates == {"default": OPENELM_CHAT_TEMPLATE} else template
        named = {name: token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        named.update(bos_token=self.piece(self.bos_id), eos_token=self.piece(self.eos_id))
        self.special_tokens = {name: text for name, text in named.items() if text is not None}

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends a reply: `eos_id` and the ones added (the loader adds generation_config.json's)."""
        return frozenset({self.eos_id}) | self._more_eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: Iterable[int]) -> None:
        self._more_eos_ids = frozenset(int(i) for i in ids)

    def check_special_ids(self) -> None:
        """Refuse BOS/EOS ids the vocabulary does not hold (named after the file)."""
        for name, token in (("BOS", self.bos_id), ("EOS", self.eos_id)):
            if not 0 <= token < self.vocab_size:
                raise TokenizerError(f"{self.path}: the {name} id {token} is not in the tokenizer's "
                                     f"{self.vocab_size} tokens")

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        """Token ids of `text`, BOS first when `add_bos` (None: the tokenizer's rule, `self.add_bos`).

        Raises `PromptError` (a ValueError) when `text` holds bytes that are not valid
        UTF-8 (see `clean_text`).
        """
        ids = self.encode_text(check_text(text))
        return [self.bos_id] + ids if (self.add_bos if add_bos is None else add_bos) else ids

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

    def render_chat(self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Mapping]] = None,
                    add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as the folder's chat template writes it (`ChatTemplate.render`, with the special
        tokens as variables; `kwargs`, such as ``documents``, override them). Needs a template."""
        if self.chat_template is None:
            raise PromptError(f"{self.path.parent}: this tokenizer has no chat template, only OpenELM-Instruct's "
                              "format (which apply_chat_template writes as token ids)")
        return self.chat_template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Mapping]] = None,
        add_generation_prompt: bool = True, tokenize: bool = True, **kwargs
    ) -> list[int]:
        """Token ids of a conversation in the folder's chat template, as transformers' `apply_chat_template`
        makes them (`render_chat`, then `encode_special`: no BOS but the one the template writes).

        Without a template: OpenELM-Instruct's format (BOS first, see `chat_segments`), which has no
        tools (given some, a `PromptError`). Messages may carry ``tool_calls`` (arguments as a JSON
        string or an object) and ``tool`` roles where the template renders them.
        """
        if not tokenize:  # mlx-lm's habit; as text, special tokens would come back as text
            raise TypeError("apply_chat_template returns token ids only (tokenize=False is not supported): "
                            "pass the ids as the prompt to generate or stream_generate, or use render_chat")
        if self.chat_template is not None:
            text = self.render_chat(messages, tools, add_generation_prompt, **kwargs)
            return self.encode_special(check_text(text, "the chat template's text"))
        if tools:
            raise PromptError("OpenELM-Instruct's chat format has no tools; give the tokenizer a chat template "
                              "that renders them")
        return self._openelm_chat(messages, add_generation_prompt)

    def _openelm_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> list[int]:
        """Token ids of a conversation in OpenELM-Instruct's format (BOS first, see `chat_segments`).

        Matches Hugging Face's fast tokenizer rendering the same template (for Llama-2's,
        in legacy mode, which the Instruct models were tuned with): the text between
        special tokens is encoded segment by segment, so
        ``"<|user|>\\nhi</s>\\n<|assistant|>\\n"`` is
        ``[BOS] + encode("<|user|>\\nhi") + [EOS] + encode("\\n<|assistant|>\\n")``.
        """
        ids = [self.bos_id]
        for segment in self.chat_segments(messages, add_generation_prompt):
            ids += [self.eos_id] if segment is None else self.encode_text(segment)
        return ids
