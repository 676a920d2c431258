"""Training data: JSONL files in mlx-lm's formats, tokenized with a loss mask, and batches of them.

A data folder holds `train.jsonl` (required for training), `valid.jsonl` (optional) and
`test.jsonl` (for `--test`); each line is one JSON object in one of three formats:

- `{"text": "..."}`: the loss falls on every token (after BOS; EOS appended);
- `{"prompt": "...", "completion": "..."}`: a user turn and the assistant's reply in the
  chat template, the loss on the reply (and the EOS that ends it) only;
- `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`: the
  conversation in the chat template (`tokenizer.apply_chat_template`), the loss on the
  assistant turns only.

Any other key or role, a line that is not a JSON object, an empty file: one DataError naming
the file and the line. A line longer than `max_seq_length` tokens is truncated, as mlx-lm
does, with one warning per file; one left with no token to learn from is refused.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from mlx_openelm.cache import common_prefix_length
from mlx_openelm.errors import DataError, OpenELMWarning

SPLITS = ("train", "valid", "test")
FORMATS = ({"text"}, {"prompt", "completion"}, {"messages"})
ROLES = ("system", "user", "assistant")
FORMAT_HELP = 'each line is {"text"}, {"prompt", "completion"} or {"messages"}'


@dataclass(frozen=True)
class Example:
    """One tokenized line: `tokens`, and `mask[t]` true where token t is a target of the loss."""

    tokens: tuple[int, ...]
    mask: tuple[bool, ...]

    @property
    def targets(self) -> int:
        return sum(self.mask[1:])


@dataclass(frozen=True)
class Dataset:
    path: Path
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def targets(self) -> int:
        return sum(e.targets for e in self.examples)


def chat_example(tokenizer, messages: Sequence[Mapping[str, str]]) -> Example:
    """The conversation's tokens, the mask on each assistant turn: its reply and the EOS ending it.

    A turn's tokens are those after the template of the earlier turns plus the assistant
    header (`add_generation_prompt`), up to the template of the conversation through it."""
    tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    mask = [False] * len(tokens)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        start, end = common_prefix_length(before, tokens), common_prefix_length(through, tokens)
        span = tokens[start:end]
        ends = [j for j, t in enumerate(span) if t in tokenizer.eos_ids]
        if ends:  # not the separator after the EOS: it belongs to the next turn
            end = start + ends[-1] + 1
        mask[start:end] = [True] * (end - start)
    return Example(tuple(tokens), tuple(mask))


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise DataError(f"{where}: message {j} must be an object with exactly 'role' and 'content', "
                            f"got {json.dumps(message)[:80]}")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {j} has role {message['role']!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: message {j}: 'content' must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn (the loss falls on assistant turns)")
    return messages


def tokenize_line(tokenizer, record: Any, where: str) -> Example:
    """One parsed JSONL line -> Example; DataError (naming `where`, "file:line") if it fits no format."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; {FORMAT_HELP}")
    keys = set(record)
    if keys not in FORMATS:
        unknown = sorted(keys - set().union(*FORMATS))
        said = f"unknown key '{unknown[0]}'" if unknown else f"keys {sorted(keys)} are no format"
        raise DataError(f"{where}: {said}; {FORMAT_HELP}")
    for key in keys - {"messages"}:
        if not isinstance(record[key], str) or (key != "prompt" and not record[key]):
            raise DataError(f"{where}: '{key}' must be a non-empty string")
    try:
        if "text" in keys:
            tokens = tokenizer.encode(record["text"]) + [tokenizer.eos_id]
            return Example(tuple(tokens), (False,) + (True,) * (len(tokens) - 1))
        if "messages" in keys:
            return chat_example(tokenizer, _check_messages(record["messages"], where))
        return chat_example(tokenizer, [{"role": "user", "content": record["prompt"]},
                                        {"role": "assistant", "content": record["completion"]}])
    except ValueError as e:  # text that is not UTF-8 (PromptError), a template the tokenizer refuses
        raise DataError(f"{where}: {e}") from None


def read_dataset(path: Path, tokenizer, max_seq_length: int) -> Dataset:
    """A JSONL file, tokenized and truncated to `max_seq_length` tokens (warning once when it is)."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    examples, truncated = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{where}: not valid JSON ({e}); {FORMAT_HELP}") from None
        example = tokenize_line(tokenizer, record, where)
        if len(example.tokens) > max_seq_length:
            truncated.append((number, len(example.tokens)))
            example = Example(example.tokens[:max_seq_length], example.mask[:max_seq_length])
            if not example.targets:
                raise DataError(f"{where}: nothing to learn in the first {max_seq_length} tokens (`max_seq_length`); "
                                "its loss tokens come later")
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty); {FORMAT_HELP}")
    if truncated:
        longest = max(n for _, n in truncated)
        warnings.warn(f"{path}: {len(truncated)} line(s) longer than `max_seq_length={max_seq_length}` tokens were "
                      f"truncated (line {truncated[0][0]} first; longest {longest} tokens)", OpenELMWarning, stacklevel=2)
    return Dataset(path, tuple(examples))


def load_splits(folder: Path, tokenizer, max_seq_length: int, need: Sequence[str],
                splits: Sequence[str] = SPLITS) -> dict[str, Dataset]:
    """The data folder's `splits` that exist (read and tokenized); those in `need` must (DataError
    naming the missing file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found (expected {', '.join(s + '.jsonl' for s in SPLITS)})")
    found = {}
    for split in splits:
        path = folder / f"{split}.jsonl"
        if path.is_file():
            found[split] = read_dataset(path, tokenizer, max_seq_length)
        elif split in need:
            raise DataError(f"{path}: not found (the data folder needs {split}.jsonl)")
    return found


def batches(dataset: Dataset, batch_size: int, seed: Optional[int] = None, loop: bool = False,
            full_only: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens (B, L) int32, mask (B, L) float32) batches of similar lengths, each padded to its longest
    row. With `loop` (training) the batch order is reshuffled every pass and only full batches are
    made (`full_only`); otherwise each example comes once, in order of length."""
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.examples[i].tokens))
    stop = len(order) - len(order) % batch_size if full_only else len(order)
    groups = [order[i : i + batch_size] for i in range(0, stop, batch_size)]
    if not groups:
        raise DataError(f"{dataset.path}: {len(dataset)} examples, fewer than `batch_size={batch_size}`")
    rng = np.random.default_rng(seed)
    while True:
        for g in (rng.permutation(len(groups)) if loop else range(len(groups))):
            rows = [dataset.examples[i] for i in groups[g]]
            width = max(len(r.tokens) for r in rows)
            tokens = np.zeros((len(rows), width), np.int32)
            mask = np.zeros((len(rows), width), np.float32)
            for j, row in enumerate(rows):
                tokens[j, : len(row.tokens)] = row.tokens
                mask[j, : len(row.mask)] = row.mask
            yield tokens, mask
        if not loop:
            return
