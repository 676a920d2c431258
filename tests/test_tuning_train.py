"""`mlx-openelm lora` and the trainer: training lowers the held-out loss (LoRA, DoRA, full, QLoRA),
checkpointing changes nothing but memory, resuming, the schedule, Ctrl-C saving, refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_openelm import load_model
from mlx_openelm.convert import convert
from mlx_openelm.tuning.adapters import apply_adapters
from mlx_openelm.tuning.config import check_adapter_config
from mlx_openelm.tuning.data import read_dataset
from mlx_openelm.tuning.trainer import Trainer, TrainSettings, evaluate, learning_rate_schedule


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A fixed answer style: 'What is N plus one?' -> 'It is N+1.'; the test split as plain text."""
    folder = tmp_path_factory.mktemp("data")
    for name, numbers in (("train", range(0, 32)), ("valid", range(40, 48)), ("test", range(50, 54))):
        with open(folder / f"{name}.jsonl", "w") as f:
            for n in numbers:
                record = ({"text": f"{n} plus one is {n + 1}."} if name == "test"
                          else {"prompt": f"What is {n} plus one?", "completion": f"It is {n + 1}."})
                f.write(json.dumps(record) + "\n")
    return folder


def train_args(model, data, out, *extra):
    return ["lora", "--model", model, "--data", data, "--adapter-path", out, "--iters", 12, "--batch-size", 4,
            "--learning-rate", 2e-3, "--rank", 4, "--steps-per-report", 4, "--steps-per-eval", 6, "--json", *extra]


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_training_lowers_the_validation_loss_and_the_adapter_loads(hf_checkpoint, data, tmp_path, kind, invoke_cli):
    extra = ["--fine-tune-type", kind] + (["--num-layers", 1, "--learning-rate", 1e-3] if kind == "full" else [])
    result = invoke_cli(*train_args(hf_checkpoint, data, tmp_path / "a", "--train", "--test", *extra))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["val_loss"] < 0.5 * summary["first_val_loss"], summary
    assert summary["test_perplexity"] == pytest.approx(np.exp(summary["test_loss"]))
    reports = [e for e in summary["events"] if e["event"] == "train"]
    assert [e["iteration"] for e in reports] == [4, 8, 12]
    assert all(e["tokens_per_second"] > 0 and e["peak_memory_gb"] > 0 and e["learning_rate"] > 0 for e in reports)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == kind and config["iteration"] == 12
    model = load_model(hf_checkpoint, dtype="float32", adapter_path=tmp_path / "a")
    valid = read_dataset(data / "valid.jsonl", _tokenizer(hf_checkpoint), 2048)
    assert evaluate(model, valid, 4) == pytest.approx(summary["val_loss"], rel=1e-5)


def _tokenizer(folder):
    from mlx_openelm.tokenizer import Tokenizer

    return Tokenizer(folder / "tokenizer.model")


def test_qlora_on_a_converted_4_bit_folder_trains_float_adapters(hf_checkpoint, data, tmp_path, invoke_cli):
    quantized = tmp_path / "q4"
    convert(hf_checkpoint, quantized, bits=4, group_size=32, dtype="float32", evaluate=False)
    result = invoke_cli(*train_args(quantized, data, tmp_path / "a"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["val_loss"] < 0.5 * summary["first_val_loss"]
    weights = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    assert weights and all(name.endswith((".lora_a", ".lora_b")) and a.dtype == mx.float32
                           for name, a in weights.items())
    model = load_model(quantized, adapter_path=tmp_path / "a")
    assert isinstance(model.layers[0].attn.qkv_proj.linear, nn.QuantizedLinear)


def _trainer(folder, tmp_path, grad_checkpoint):
    model = load_model(folder, dtype="float32")
    mx.random.seed(0)
    config = check_adapter_config("lora", 2, len(model.layers), rank=4, scale=10.0)
    apply_adapters(model, config)
    settings = TrainSettings(iters=3, batch_size=2, learning_rate=1e-3, steps_per_report=1, grad_checkpoint=grad_checkpoint)
    events = []
    return Trainer(model, config, settings, tmp_path / str(grad_checkpoint), report=events.append), events


def test_grad_checkpoint_gives_the_same_training(hf_checkpoint, data, tmp_path, tokenizer_path):
    from mlx_openelm.tokenizer import Tokenizer

    train = read_dataset(data / "train.jsonl", Tokenizer(tokenizer_path), 2048)
    losses = {}
    for flag in (False, True):
        trainer, events = _trainer(hf_checkpoint, tmp_path, flag)
        trainer.train(train)
        losses[flag] = [e["train_loss"] for e in events if e["event"] == "train"]
    assert len(losses[True]) == 3 and losses[True][-1] < losses[True][0]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_the_schedule_warms_up_then_decays_to_zero():
    schedule = learning_rate_schedule(TrainSettings(iters=110, learning_rate=1e-3, warmup=10))
    values = [schedule(mx.array(step)).item() for step in (0, 5, 10, 60, 110)]
    assert values[0] == 0 and values[1] == pytest.approx(5e-4) and values[2] == pytest.approx(1e-3)
    assert values[3] == pytest.approx(5e-4, rel=1e-3) and values[4] == pytest.approx(0, abs=1e-9)
    assert learning_rate_schedule(TrainSettings(lr_schedule="constant", learning_rate=3e-4))(mx.array(7)).item() \
        == pytest.approx(3e-4)


def test_resuming_continues_and_a_different_rank_or_layers_is_refused(hf_checkpoint, data, tmp_path, invoke_cli):
    first = tmp_path / "a"
    trained = invoke_cli(*train_args(hf_checkpoint, data, first))
    assert trained.exit_code == 0
    resume = ["--resume-adapter-file", first / "adapters.safetensors"]
    again = invoke_cli(*train_args(hf_checkpoint, data, first, *resume))  # into the same folder: continues it
    assert again.exit_code == 0, again.output
    # it starts where the first run ended
    assert json.loads(again.stdout)["first_val_loss"] == pytest.approx(json.loads(trained.stdout)["val_loss"])
    for extra, word in ((["--rank", 8], "rank 4"), (["--num-layers", 1], "num_layers 3")):
        refused = invoke_cli(*train_args(hf_checkpoint, data, tmp_path / "b", *resume, *extra))
        assert refused.exit_code == 1 and word in refused.output and "Traceback" not in refused.output
        assert len(refused.output.strip().splitlines()) <= 2  # the loading line, then one Error line


@pytest.mark.parametrize("extra, message", [
    (["--warmup", 12], "--warmup: 12 steps leave none of the 12 --iters"),
    (["--alpha", 16, "--scale", 2], "--alpha and --scale both set the LoRA scale"),
    (["--keys", "qkv_proj,q_proj"], "--keys: 'q_proj' is not a projection"),
    (["--num-layers", 9], "--num-layers: 9 does not fit the model, which has 3 decoder layers"),
    (["--dropout", 1.5], "--dropout: 1.5 is not a probability"),
    (["--batch-size", 0], "--batch-size: 0 is not an integer of at least 1"),
])
def test_bad_options_are_one_line_errors(hf_checkpoint, data, tmp_path, extra, message, invoke_cli):
    result = invoke_cli(*train_args(hf_checkpoint, data, tmp_path / "a", *extra))
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "a" / "adapters.safetensors").exists()


def test_existing_adapters_are_not_replaced_without_force(hf_checkpoint, data, tmp_path, invoke_cli):
    out = tmp_path / "a"
    out.mkdir()
    (out / "adapters.safetensors").write_bytes(b"mine")
    result = invoke_cli(*train_args(hf_checkpoint, data, out))
    assert result.exit_code == 1 and "pass --force to replace it" in result.output
    assert (out / "adapters.safetensors").read_bytes() == b"mine"
    assert invoke_cli(*train_args(hf_checkpoint, data, out, "--force")).exit_code == 0


def test_ctrl_c_saves_the_adapters_so_far_and_says_where(hf_checkpoint, data, tmp_path):
    out = tmp_path / "a"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_openelm.cli", *map(str, train_args(
        hf_checkpoint, data, out, "--iters", 100000, "--steps-per-report", 1, "--steps-per-eval", 100000))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.monotonic() + 120
    while "train loss" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = seen + err
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert f"the adapters trained so far are saved in {out / 'adapters.safetensors'}" in err
    iteration = json.loads((out / "adapter_config.json").read_text())["iteration"]
    assert f"interrupted at iteration {iteration} of 100000" in err and iteration >= 1
    load_model(hf_checkpoint, adapter_path=out)  # a complete, loadable adapter
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]


def test_train_and_test_flags_as_mlx_lm_users_type_them(hf_checkpoint, data, tmp_path, invoke_cli):
    """`--train --test` trains then tests; `--test` alone evaluates the adapter already there (or, with
    --adapter-path '', the base model) on test.jsonl alone, training nothing and writing nothing."""
    out = tmp_path / "a"
    trained = invoke_cli(*train_args(hf_checkpoint, data, out, "--train", "--test"))
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert summary["iterations"] == 12 and summary["val_loss"] < 0.5 * summary["first_val_loss"]
    only_test = tmp_path / "only-test"  # no train.jsonl: testing alone does not need it
    only_test.mkdir()
    (only_test / "test.jsonl").write_bytes((data / "test.jsonl").read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    tested = invoke_cli("lora", "--model", hf_checkpoint, "--data", only_test, "--adapter-path", out, "--test", "--json")
    assert tested.exit_code == 0, tested.output
    result = json.loads(tested.stdout)
    assert result["adapter"] == str(out) and result["test_examples"] == 4 and "iterations" not in result
    assert result["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    assert result["test_perplexity"] == pytest.approx(np.exp(result["test_loss"]))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    test_set = read_dataset(data / "test.jsonl", _tokenizer(hf_checkpoint), 2048)
    base = invoke_cli("lora", "--model", hf_checkpoint, "--data", only_test, "--adapter-path", "", "--test", "--json")
    assert base.exit_code == 0, base.output
    base_loss = json.loads(base.stdout)["test_loss"]
    assert base_loss == pytest.approx(evaluate(load_model(hf_checkpoint, dtype="float32"), test_set, 4), rel=1e-5)
    assert abs(base_loss - result["test_loss"]) > 1e-3  # the adapter was applied
    table = invoke_cli("lora", "--model", hf_checkpoint, "--data", only_test, "--adapter-path", out, "--test",
                       "--test-batches", 1, "--batch-size", 2)
    assert table.exit_code == 0, table.output
    rows = {" ".join(line.split()[:-1]): line.split()[-1] for line in table.stdout.splitlines()}
    adapted = load_model(hf_checkpoint, dtype="float32", adapter_path=out)
    assert rows["test examples"] == "4" and float(rows["test loss"]) == pytest.approx(evaluate(adapted, test_set, 2, 1),
                                                                                       abs=1e-4)


def test_testing_alone_names_what_is_missing(hf_checkpoint, data, tmp_path, invoke_cli):
    missing = invoke_cli("lora", "--model", hf_checkpoint, "--data", tmp_path, "--adapter-path", "", "--test")
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert f"{tmp_path / 'test.jsonl'}: not found" in missing.output
    no_adapter = invoke_cli("lora", "--model", hf_checkpoint, "--data", data, "--adapter-path", tmp_path / "none",
                            "--test")
    assert no_adapter.exit_code == 1 and "adapter folder not found" in no_adapter.output
    assert not (tmp_path / "none").exists()
