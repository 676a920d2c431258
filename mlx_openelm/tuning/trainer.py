"""Training an adapter: the masked loss, the learning-rate schedule, the loop, evaluation.

The loss is the mean cross-entropy over the target tokens of a batch (the data's mask: prompt
and padding positions weigh zero, and the output head runs only at the targets). Decoder layers
before the first trainable one run outside the gradient (`stop_gradient`: no backward through
them); `grad_checkpoint` recomputes each trained layer's activations in the backward pass instead
of keeping them (per layer instance: no class is patched). The step is not compiled (see
`Trainer._step_function`). Ctrl-C (any KeyboardInterrupt) saves the adapters trained so far and
raises `TrainingInterrupted`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_openelm.errors import OptionError, TrainingInterrupted
from mlx_openelm.folder.names import ADAPTERS_FILE

from .config import AdapterConfig
from .data import Dataset, batches
from .saving import save_adapters

SCHEDULES = ("cosine", "constant")

Report = Callable[[dict], None]


@dataclass(frozen=True)
class TrainSettings:
    """How to train; validated on creation (errors name the field)."""

    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    lr_schedule: str = "cosine"  # cosine decay to 0 after a linear warmup, or constant
    warmup: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25  # -1: the whole validation set
    test_batches: int = -1  # -1: the whole test set
    save_every: int = 100
    grad_checkpoint: bool = False
    seed: int = 0

    def __post_init__(self):
        for option, value, least in (("iters", self.iters, 1), ("batch_size", self.batch_size, 1),
                                     ("warmup", self.warmup, 0), ("steps_per_report", self.steps_per_report, 1),
                                     ("steps_per_eval", self.steps_per_eval, 1), ("save_every", self.save_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise OptionError(f"{option}: {value!r} is not an integer of at least {least}")
        for option, value in (("val_batches", self.val_batches), ("test_batches", self.test_batches)):
            if value != -1 and value < 1:
                raise OptionError(f"{option}: {value!r} must be positive, or -1 for the whole set")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise OptionError(f"learning_rate: {self.learning_rate!r} is not a positive number")
        if self.lr_schedule not in SCHEDULES:
            raise OptionError(f"lr_schedule: {self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.warmup >= self.iters:
            raise OptionError(f"warmup: {self.warmup} steps leave none of the {self.iters} `iters` to train")


def learning_rate_schedule(settings: TrainSettings):
    """A step -> learning rate function: linear warmup from 0, then cosine decay to 0 (or constant)."""
    rest = settings.iters - settings.warmup
    if settings.lr_schedule == "cosine":
        main = optim.cosine_decay(settings.learning_rate, rest, 0.0)
    else:
        main = lambda step: mx.array(settings.learning_rate, mx.float32)  # noqa: E731
    if not settings.warmup:
        return main
    warmup = optim.linear_schedule(0.0, settings.learning_rate, settings.warmup)
    return optim.join_schedules([warmup, main], [settings.warmup])


# ---- the loss ---------------------------------------------------------------------------------

def _first_trained_layer(model: nn.Module) -> int:
    for i, layer in enumerate(model.layers):
        if tree_flatten(layer.trainable_parameters()):
            return i
    return len(model.layers)


def _checkpointed(layer: nn.Module, h: mx.array) -> mx.array:
    def run(params, h):
        layer.update(params)
        return layer(h, "causal" if h.shape[1] > 1 else None, None)

    return mx.checkpoint(run)(layer.trainable_parameters(), h)


def hidden_states(model: nn.Module, inputs: mx.array, grad_checkpoint: bool = False) -> mx.array:
    """The last layer's (B, L, model_dim) output for `inputs`, run for training (see the module docstring)."""
    first = _first_trained_layer(model)
    h = model.embed(inputs)
    for i in range(len(model.layers)):
        if i == first:
            h = mx.stop_gradient(h)
        if grad_checkpoint and i >= first:
            h = _checkpointed(model.layers[i], h)
        else:
            h = model.run_layer(i, h)
    return h


def masked_loss(model, inputs: mx.array, targets: mx.array, weights: mx.array, grad_checkpoint: bool = False):
    """(mean cross-entropy over the weighted targets, number of targets).

    The output head (the vocabulary-wide matmul, a large part of a small model's step) runs only at
    the positions that are targets: prompts and padding cost no head, forward or backward."""
    h = hidden_states(model, inputs, grad_checkpoint)
    flat_weights = weights.reshape(-1)
    positions = mx.array(np.flatnonzero(np.array(flat_weights)).astype(np.int32))
    logits = model.head(h.reshape(-1, h.shape[-1])[positions]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets.reshape(-1)[positions]) * flat_weights[positions]
    count = weights.sum()
    return ce.sum() / count, count


def batch_loss(model, tokens: mx.array, mask: mx.array, grad_checkpoint: bool = False):
    """The loss of a (tokens, mask) batch: each position predicts the next token where the mask says."""
    return masked_loss(model, tokens[:, :-1], tokens[:, 1:], mask[:, 1:], grad_checkpoint)


def evaluate(model, dataset: Dataset, batch_size: int, num_batches: int = -1) -> float:
    """The mean loss per target token over `num_batches` batches of `dataset` (-1: all of it)."""
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for n, (tokens, mask) in enumerate(batches(dataset, batch_size)):
        if n == num_batches:
            break
        loss, targets = batch_loss(model, mx.array(tokens), mx.array(mask))
        total, count = total + loss * targets, count + targets
        mx.eval(total, count)
    model.train()
    return (total / count).item()


# ---- the loop ---------------------------------------------------------------------------------

@dataclass
class _Window:
    """The training steps since the last report."""

    loss: Any = 0.0
    tokens: Any = 0.0
    steps: int = 0
    seconds: float = 0.0


class Trainer:
    """Trains the adapter that `apply_adapters` put into `model`, saving it into `folder`."""

    def __init__(self, model, config: AdapterConfig, settings: TrainSettings, folder: Path,
                 record: Optional[Mapping[str, Any]] = None, report: Report = lambda event: None):
        self.model, self.config, self.settings = model, config, settings
        self.folder, self.record, self.report = Path(folder), dict(record or {}), report
        self.optimizer = optim.Adam(learning_rate=learning_rate_schedule(settings))
        self.iteration = 0
        self.trained_tokens = 0

    def save(self, checkpoint: bool = False) -> Path:
        """adapters.safetensors (and with `checkpoint`, NNNNNNN_adapters.safetensors too)."""
        record = {**self.record, "iteration": self.iteration}
        path = save_adapters(self.model, self.folder, self.config, record)
        if checkpoint:
            save_adapters(self.model, self.folder, self.config, record, f"{self.iteration:07d}_{ADAPTERS_FILE}")
        self.report({"event": "save", "iteration": self.iteration, "path": str(path)})
        return path

    def validate(self, valid: Optional[Dataset]) -> Optional[float]:
        if valid is None:
            return None
        start = time.perf_counter()
        loss = evaluate(self.model, valid, self.settings.batch_size, self.settings.val_batches)
        self.report({"event": "val", "iteration": self.iteration, "val_loss": loss,
                     "val_seconds": time.perf_counter() - start})
        return loss

    def _step_function(self):
        model, optimizer = self.model, self.optimizer
        loss_and_grad = nn.value_and_grad(model, partial(batch_loss, grad_checkpoint=self.settings.grad_checkpoint))
        state = [model.state, optimizer.state, mx.random.state]

        # Not mx.compile'd as mlx-lm does: each new batch shape retraces the whole graph (seconds each on
        # a CPU; batches here are padded to their own longest row), and the matmuls dominate the step anyway.
        def step(tokens, mask):
            (loss, count), grads = loss_and_grad(model, tokens, mask)
            optimizer.update(model, grads)
            return loss, count

        return step, state

    def train(self, train: Dataset, valid: Optional[Dataset] = None) -> dict:
        """Run `settings.iters` steps; returns {"val_loss", "train_loss", "iterations", "path"}.
        A KeyboardInterrupt saves the adapters and raises TrainingInterrupted saying where."""
        try:
            return self._train(train, valid)
        except KeyboardInterrupt:
            path = self.save()
            raise TrainingInterrupted(f"interrupted at iteration {self.iteration} of {self.settings.iters}; "
                                      f"the adapters trained so far are saved in {path}", self.iteration, path) from None

    def _train(self, train: Dataset, valid: Optional[Dataset]) -> dict:
        settings, model = self.settings, self.model
        mx.reset_peak_memory()
        model.train()
        step, state = self._step_function()
        val_loss = self.validate(valid)
        window, train_loss = _Window(), None
        data = batches(train, settings.batch_size, seed=settings.seed, loop=True, full_only=True)
        for tokens, mask in data:
            start = time.perf_counter()
            loss, count = step(mx.array(tokens), mx.array(mask))
            mx.eval(state, loss, count)
            self.iteration += 1
            window.loss, window.tokens = window.loss + loss.item(), window.tokens + count.item()
            window.steps, window.seconds = window.steps + 1, window.seconds + time.perf_counter() - start
            if self.iteration % settings.steps_per_report == 0 or self.iteration == settings.iters:
                train_loss = self._report_training(window)
                window = _Window()
            if self.iteration % settings.steps_per_eval == 0 or self.iteration == settings.iters:
                val_loss = self.validate(valid)
            if self.iteration % settings.save_every == 0 and self.iteration < settings.iters:
                self.save(checkpoint=True)
            if self.iteration == settings.iters:
                break
        path = self.save()
        return {"iterations": self.iteration, "train_loss": train_loss, "val_loss": val_loss, "path": str(path)}

    def _report_training(self, window: _Window) -> float:
        self.trained_tokens += int(window.tokens)
        loss = window.loss / window.steps
        self.report({
            "event": "train", "iteration": self.iteration, "train_loss": loss,
            "learning_rate": float(self.optimizer.learning_rate.item()),
            "tokens_per_second": window.tokens / window.seconds,
            "iterations_per_second": window.steps / window.seconds,
            "trained_tokens": self.trained_tokens, "peak_memory_gb": mx.get_peak_memory() / 1e9,
        })
        return loss
