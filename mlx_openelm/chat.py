"""Multi-turn chat with OpenELM-Instruct: the library `ChatSession` (the REPL is in `chat_cli`).

`ChatSession` keeps the messages, one KV cache for the whole conversation, and the
token ids already in that cache. Each turn it renders the full conversation with the
chat template, keeps the longest cached prefix of it, and feeds only the rest, so a
second turn costs its own tokens, not the whole history.

Policies:

- Interrupted reply (Ctrl-C, or a caller closing `send`'s generator early): the part
  already generated stays in the history as the assistant's reply, closed with EOS by
  the template next turn, as if it had been cut by ``max_tokens``. A turn interrupted
  before its first token leaves the conversation as it was.
- Context overflow: before a turn, when the templated conversation plus a reply reserve
  (``max_tokens``, at most a quarter of the context) exceeds ``max_context_length``,
  the oldest user/assistant turns are dropped (the system prompt stays) until the rest
  plus the reserve fits in half the context (``refit_fraction``), the cache is rebuilt
  from the longest prefix still valid (normally the system prompt), and `notify` gets a
  one-line notice. Dropping to half, not just below the limit, means a rebuild (which
  re-reads every kept token) happens once every several turns, not on every turn once
  the context is full. A single message that leaves no room for a reply raises
  `ContextLengthError` and leaves the conversation unchanged.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from .cache import cached_length, reusable_prefix_length, truncate_caches
from .errors import ContextLengthError, OptionError
from .generation import GenerationResponse, stream_generate
from .model import make_cache
from .speculative import SpeculativeOptions
from .tokenizer import Tokenizer


class ChatSession:
    """A conversation with an OpenELM-Instruct model, reusing one KV cache across turns.

    `model` is anything `generate_step` accepts (it needs `.args` for `make_cache`).
    `notify` receives one-line notices (turns dropped to fit the context). The reply
    reserve is at most `max_reserve_fraction` of the context; when turns must be
    dropped, the rest plus the reserve is cut down to `refit_fraction` of it.
    With `speculative` (`SpeculativeOptions`; `draft_model=d` is short for
    `speculative=SpeculativeOptions(draft_model=d)`) every reply is decoded speculatively;
    a draft model keeps its own cache, in step with the model's, so it is reused across turns too.
    """

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        system: Optional[str] = None,
        notify: Optional[Callable[[str], None]] = None,
        max_reserve_fraction: float = 0.25,
        refit_fraction: float = 0.5,
        draft_model=None,
        speculative: Optional[SpeculativeOptions] = None,
    ):
        if not 0 < max_reserve_fraction < refit_fraction <= 1:
            raise OptionError(
                "need 0 < max_reserve_fraction < refit_fraction <= 1, got "
                f"{max_reserve_fraction} and {refit_fraction}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.system = system or None
        self.notify = notify or (lambda message: None)
        self.max_reserve_fraction = max_reserve_fraction
        self.refit_fraction = refit_fraction
        self.cache = make_cache(model)
        if draft_model is not None and speculative is not None:
            raise OptionError("pass the draft model either as draft_model= or in speculative=, not both")
        self.speculative = (speculative or SpeculativeOptions(draft_model=draft_model)).for_target(model)
        self.draft_model = self.speculative.draft_model
        self.draft_cache = make_cache(self.draft_model) if self.draft_model is not None else None
        self.cached_ids: list[int] = []  # the tokens whose keys/values are in `cache`, in order
        self.messages: list[dict[str, str]] = []
        self.last_prefill_tokens = 0  # tokens fed before the last reply (not taken from the cache)
        self.finish_reason: Optional[str] = None  # "stop", "length" or "interrupted"
        self.reset()
        self._check_room()

    def _check_room(self) -> None:
        """A system prompt (or a context so small) that leaves no room for any message is refused
        up front: every turn would fail."""
        ids = self.conversation_ids(self.messages + [{"role": "user", "content": ""}])
        if len(ids) >= self.context_length:
            what = "the system prompt takes" if self.system else "the chat format alone takes"
            raise ContextLengthError(
                f"{what} {len(ids)} tokens, leaving no room for a message in the model's context of "
                f"{self.context_length} tokens" + (": shorten it" if self.system else "")
            )

    @property
    def context_length(self) -> int:
        return self.model.args.max_context_length

    def reset(self) -> None:
        """Start a new conversation (same system prompt); the cache is emptied."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._trim_cache(0)
        self.finish_reason = None

    def conversation_ids(self, messages=None, add_generation_prompt: bool = True) -> list[int]:
        """The templated token ids of `messages` (default: the conversation so far)."""
        messages = self.messages if messages is None else messages
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def _trim_cache(self, length: int) -> None:
        """Keep the first `length` cached positions (also repairs layers left uneven by an interrupt)."""
        caches = self.cache + (self.draft_cache or [])
        length = max(0, min(length, len(self.cached_ids), cached_length(caches)))
        truncate_caches(caches, length)
        self.cached_ids = self.cached_ids[:length]

    def _fit(self, messages: list[dict[str, str]], reserve: int) -> tuple[list[dict[str, str]], list[int], int]:
        """Fit the conversation plus `reserve` in the context; returns (messages, ids, dropped turns).

        When it does not fit, the oldest turns go until it fits in `refit_fraction` of the context.
        """
        context = self.context_length
        first = 1 if messages and messages[0]["role"] == "system" else 0
        ids = self.conversation_ids(messages)
        dropped = 0
        target = context if len(ids) + reserve <= context else int(context * self.refit_fraction)
        while len(ids) + reserve > target and len(messages) - first > 1:
            del messages[first]  # the oldest user message, then its replies
            while len(messages) - first > 1 and messages[first]["role"] != "user":
                del messages[first]
            dropped += 1
            ids = self.conversation_ids(messages)
        if len(ids) >= context:
            what = "this message with the system prompt" if first else "this message"
            raise ContextLengthError(
                f"{what} takes {len(ids)} tokens, leaving no room for a reply in the model's context of "
                f"{context} tokens: send a shorter message"
            )
        return messages, ids, dropped

    def send(self, text: str, max_tokens: int = 256, **kwargs) -> Iterator[GenerationResponse]:
        """Add a user message and stream the assistant's reply (see `stream_generate`).

        Keyword arguments go to `generate_step` (sampler, logits_processors, ...). Only
        the tokens not already in the cache go through the model. Logits processors and
        prompt lookup see the whole conversation, as they would with Hugging Face's generate.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        if {"cache", "draft_cache", "cached_ids"} & set(kwargs):
            raise TypeError("ChatSession manages its own cache")
        if self.speculative.enabled:
            kwargs.update(speculative=self.speculative, draft_cache=self.draft_cache)
        reserve = min(max_tokens, int(self.context_length * self.max_reserve_fraction))
        messages, ids, dropped = self._fit(self.messages + [{"role": "user", "content": text}], reserve)
        if dropped:
            turns = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
            kept = ", kept the system prompt" if self.system else ""
            self.notify(f"[context nearly full: dropped {turns}{kept} and rebuilt the cache]")
        # Reuse the longest cached prefix; at least one token must be fed.
        self._trim_cache(reusable_prefix_length(self.cached_ids, ids))
        start = len(self.cached_ids)
        new = ids[start:]
        self.last_prefill_tokens = len(new)
        self.messages = messages
        self.finish_reason = None
        reply: list[int] = []
        shown: list[str] = []
        finish = None
        try:
            for response in stream_generate(
                self.model, self.tokenizer, new, max_tokens=max_tokens, cache=self.cache,
                cached_ids=self.cached_ids, **kwargs,
            ):
                reply.append(response.token)
                shown.append(response.text)
                finish = response.finish_reason
                yield response
        finally:
            # A stop string ends the reply before itself: the conversation keeps what was shown.
            stopped_by_text = finish == "stop" and not (reply and reply[-1] in self.tokenizer.eos_ids)
            self._end_turn(new, reply, finish, "".join(shown) if stopped_by_text else None)

    def _end_turn(self, new: list[int], reply: list[int], finish: Optional[str], text: Optional[str]) -> None:
        """Record the turn; `text` (when not None) is the reply's content instead of its decoded tokens."""
        # generate_step may have run the model one token ahead, or been interrupted
        # between layers: keep exactly the positions that match known tokens.
        fed = self.cached_ids + new + reply
        self.cached_ids = fed
        self._trim_cache(cached_length(self.cache))
        self.finish_reason = finish or "interrupted"
        if text is None:
            text = self.tokenizer.decode([t for t in reply if t not in self.tokenizer.eos_ids])
        if reply:
            self.messages.append({"role": "assistant", "content": text})
        else:  # nothing was said: forget the question too
            self.messages.pop()

