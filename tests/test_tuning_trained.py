"""Fine-tuning that works on trained weights (SmolLM2-135M-Instruct as OpenELM; tests/trained.py).

A run of seconds on this CPU: LoRA on the last layer only (no backward through the other 29),
short lines, a few steps. The task is a fixed answer style ("A + B = C. Done.") that the base
model does not follow; the held-out sums share no line with the training ones. The full-size
measurement (and mlx-lm's loss on the same data) is scripts/measure_lora.py, quoted in docs/fine-tuning.md.
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlx_openelm import load
from mlx_openelm.tuning.adapters import adapter_weights, apply_adapters
from mlx_openelm.tuning.config import check_adapter_config
from mlx_openelm.tuning.data import read_dataset
from mlx_openelm.tuning.trainer import Trainer, TrainSettings, evaluate

TRAIN = [(12, 30), (41, 7), (25, 25), (8, 61)]
VALID = [(33, 14), (5, 70)]


def write(path, pairs):
    path.write_text("".join(json.dumps({"text": f"{a} + {b} = {a + b}. Done."}) + "\n" for a, b in pairs))
    return path


def test_a_short_lora_run_lowers_the_held_out_loss_of_the_trained_model(trained_model_path, tmp_path):
    model, tokenizer = load(trained_model_path, dtype="float32")
    train = read_dataset(write(tmp_path / "train.jsonl", TRAIN), tokenizer, 64)
    valid = read_dataset(write(tmp_path / "valid.jsonl", VALID), tokenizer, 64)
    mx.random.seed(0)
    config = check_adapter_config("lora", 1, len(model.layers), rank=8, scale=20.0)
    apply_adapters(model, config)
    events = []
    settings = TrainSettings(iters=4, batch_size=2, learning_rate=1e-3, lr_schedule="constant", steps_per_report=1,
                             steps_per_eval=4, val_batches=-1, save_every=100)
    result = Trainer(model, config, settings, tmp_path / "adapters", report=events.append).train(train, valid)
    before, after = [e["val_loss"] for e in events if e["event"] == "val"]
    assert after < 0.6 * before, (before, after)
    assert all(name.startswith(f"transformer.layers.{len(model.layers) - 1}.") for name in adapter_weights(model))
    reloaded, _ = load(trained_model_path, dtype="float32", adapter_path=tmp_path / "adapters")
    assert evaluate(reloaded, valid, 2) == pytest.approx(after, rel=1e-5)
    assert result["val_loss"] == after
