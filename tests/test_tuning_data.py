"""Fine-tuning data: the three JSONL formats, the loss mask on exactly the tokens to learn, and one
clear error (file and line) for each kind of bad input."""

from __future__ import annotations

import json
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm import load
from mlx_openelm.errors import DataError, OpenELMWarning
from mlx_openelm.tuning.data import Dataset, batches, load_splits, read_dataset, tokenize_line
from mlx_openelm.tuning.trainer import batch_loss, masked_loss


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded[1]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_text_lines_learn_every_token_after_bos(tokenizer):
    example = tokenize_line(tokenizer, {"text": "Once upon a time"}, "x:1")
    assert list(example.tokens) == tokenizer.encode("Once upon a time") + [tokenizer.eos_id]
    assert example.mask == (False,) + (True,) * (len(example.tokens) - 1)


def test_completion_masks_the_prompt_and_learns_the_reply_and_its_eos(tokenizer):
    example = tokenize_line(tokenizer, {"prompt": "What is the capital?", "completion": "Paris is."}, "x:1")
    messages = [{"role": "user", "content": "What is the capital?"}, {"role": "assistant", "content": "Paris is."}]
    assert list(example.tokens) == tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)
    learned = [t for t, m in zip(example.tokens, example.mask) if m]
    assert not any(example.mask[: len(prompt)])
    assert tokenizer.decode(learned) == "Paris is." and learned[-1] == tokenizer.eos_id
    assert example.tokens[: len(prompt)] == tuple(prompt)


def test_chat_learns_only_the_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "The dog?"},
                {"role": "assistant", "content": "It sleeps."}]
    example = tokenize_line(tokenizer, {"messages": messages}, "x:1")
    runs, current = [], []
    for token, learned in zip(example.tokens, example.mask):
        if learned:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [tokenizer.decode(r) for r in runs] == ["Hello.", "It sleeps."]
    assert all(r[-1] == tokenizer.eos_id for r in runs)


def test_the_loss_ignores_what_masked_positions_hold(loaded, tokenizer):
    """Masked targets (prompt tokens, padding) can be anything: the loss is the same, bit for bit,
    and equals the mean cross-entropy over the learned tokens alone, computed in numpy."""
    model = loaded[0]
    rows = [tokenize_line(tokenizer, {"prompt": "What is the capital of France?", "completion": "Paris."}, "x:1"),
            tokenize_line(tokenizer, {"prompt": "Hi", "completion": "Hello there, friend."}, "x:2")]
    tokens, mask = next(batches(Dataset("x", tuple(rows)), 2))
    inputs, targets, weights = mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask[:, 1:])
    loss, count = masked_loss(model, inputs, targets, weights)
    scrambled = np.where(mask[:, 1:] > 0, tokens[:, 1:], (tokens[:, 1:] * 7 + 3) % 384)
    assert (scrambled != tokens[:, 1:]).sum() > 10
    again, _ = masked_loss(model, inputs, mx.array(scrambled), weights)
    assert loss.item() == again.item()
    logits = np.array(model(inputs), dtype=np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0]
    expected = -(picked * mask[:, 1:]).sum() / mask[:, 1:].sum()
    assert count.item() == sum(r.targets for r in rows)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert batch_loss(model, mx.array(tokens), mx.array(mask))[0].item() == loss.item()


def test_batches_pad_each_to_its_longest_row_and_loop_reshuffles(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a " * n} for n in (1, 9, 2, 8, 3, 7)])
    dataset = read_dataset(path, tokenizer, 2048)
    once = list(batches(dataset, 2))
    assert [b[0].shape[0] for b in once] == [2, 2, 2]
    lengths = sorted(len(e.tokens) for e in dataset.examples)
    assert [b[0].shape[1] for b in once] == [lengths[1], lengths[3], lengths[5]]
    for tokens, mask in once:  # padding is never learned
        assert ((tokens == 0) <= (mask == 0)).all()
    looped = batches(dataset, 4, seed=0, loop=True, full_only=True)
    assert all(next(looped)[0].shape[0] == 4 for _ in range(3))


def test_a_line_longer_than_max_seq_length_is_truncated_with_one_warning(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "word " * 40}, {"text": "short"}, {"text": "word " * 50}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = read_dataset(path, tokenizer, 16)
    messages = [str(w.message) for w in caught if issubclass(w.category, OpenELMWarning)]
    assert len(messages) == 1 and "2 line(s) longer than `max_seq_length=16` tokens" in messages[0]
    assert max(len(e.tokens) for e in dataset.examples) == 16
    long_prompt = write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "word " * 40, "completion": "yes"}])
    with pytest.raises(DataError, match=r"valid.jsonl:1: nothing to learn in the first 16 tokens"):
        read_dataset(long_prompt, tokenizer, 16)


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', "{not json"], r"train.jsonl:2: not valid JSON"),
    (['{"text": "ok", "label": 1}'], r"train.jsonl:1: unknown key 'label'"),
    (['{"prompt": "hi"}'], r"train.jsonl:1: keys \['prompt'\] are no format"),
    (['[1, 2]'], r"train.jsonl:1: expected a JSON object, got list"),
    (['{"text": ""}'], r"train.jsonl:1: 'text' must be a non-empty string"),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], r"train.jsonl:1: message 0 has role 'robot'"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], r"train.jsonl:1: no assistant message"),
    (['{"messages": [{"role": "user", "text": "x"}]}'], r"train.jsonl:1: message 0 must be an object with exactly"),
    (["", "  "], r"train.jsonl: no examples \(the file is empty\)"),
])
def test_bad_lines_are_one_error_naming_file_and_line(tmp_path, tokenizer, lines, message):
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError, match=message) as info:
        read_dataset(path, tokenizer, 2048)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_the_data_folder_needs_its_files(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data folder not found"):
        load_splits(tmp_path / "none", tokenizer, 2048, need=("train",))
    write_jsonl(tmp_path / "train.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"test.jsonl: not found"):
        load_splits(tmp_path, tokenizer, 2048, need=("train", "test"))
    assert set(load_splits(tmp_path, tokenizer, 2048, need=("train",))) == {"train"}
    (tmp_path / "valid.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"valid.jsonl: not UTF-8"):
        load_splits(tmp_path, tokenizer, 2048, need=("train",))
