"""Fine-tuning measured: our `mlx-openelm lora` against mlx-lm's trainer on the same model, data and settings.

    python scripts/measure_lora.py make DATA                 # the task: a fixed answer style for sums
    python scripts/measure_lora.py compare MODEL DATA [--iters 30] [--batch-size 4] [--learning-rate 2e-4]
        [--num-layers 2] [--rank 8] [--trials 2] [--grad-checkpoint]

`compare` runs each engine in its own process (both on the same BLAS: mlx_openelm/blas.py's choice) (so each peak memory is its own), alternating ours and
mlx-lm's `trials` times, and prints the validation loss after training (both adapters scored by our
evaluator on the same positions: mlx-lm's own loss also counts one padding target after each
example's EOS), the last train loss, iterations/s (the same batches for both: the fair speed
figure), tokens/s as each counts them, and the peak memory, with ours/mlx-lm ratios. Both see the same token ids
(mlx-lm's TextDataset is handed our tokenizer's `encode`: BOS, the text, EOS) and learn the same
positions; mlx-lm's own batching (pad to a multiple of 32 plus one), initialisation order, batch
order and compiled step are its own. The `{"text"}` format keeps the comparison to identical tokens
(the two chat templates differ for this tokenizer).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make(folder: Path, seed: int = 0) -> None:
    """'Question: What is A plus B?' / 'Answer: A + B = C. Done.': a fixed style the base model
    does not follow; the validation and test sums are held out (no pair of the training set)."""
    rng = random.Random(seed)
    pairs = sorted({(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(200)})
    rng.shuffle(pairs)
    splits = {"train": pairs[:96], "valid": pairs[96:128], "test": pairs[128:160]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(folder / f"{name}.jsonl", "w") as f:
            for a, b in rows:
                f.write(json.dumps({"text": f"Question: What is {a} plus {b}?\nAnswer: {a} + {b} = {a + b}. Done."})
                        + "\n")


def run_ours(model: str, data: str, settings: dict, out: Path) -> dict:
    command = [sys.executable, "-m", "mlx_openelm.cli", "lora", "--model", model, "--data", data,
               "--adapter-path", str(out), "--force", "--json", "--lr-schedule", "constant",
               "--iters", str(settings["iters"]), "--batch-size", str(settings["batch_size"]),
               "--learning-rate", str(settings["learning_rate"]), "--num-layers", str(settings["num_layers"]),
               "--rank", str(settings["rank"]), "--steps-per-report", str(settings["iters"]),
               "--steps-per-eval", str(settings["iters"]), "--val-batches", "-1", "--save-every", "100000"]
    if settings["grad_checkpoint"]:
        command.append("--grad-checkpoint")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr)
    summary = json.loads(result.stdout)
    train = [e for e in summary["events"] if e["event"] == "train"]
    return {"val_before": summary["first_val_loss"], "val_after": summary["val_loss"],
            "train_loss": summary["train_loss"], "tokens_per_second": train[-1]["tokens_per_second"],
            "iterations_per_second": train[-1]["iterations_per_second"], "peak_memory_gb": summary["peak_memory_gb"]}


MLX_LM_RUNNER = r'''
import json, sys, types
import mlx_openelm  # first, so mlx-lm runs on the BLAS ours gets (mlx_openelm/blas.py; MLX_OPENELM_BLAS=0: MLX's own)
import mlx.core as mx, mlx.optimizers as optim
from mlx_lm.utils import load_model
from mlx_lm.tuner.datasets import CacheDataset, TextDataset
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, evaluate, train
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_openelm.tokenizer import Tokenizer

model_path, data, settings, adapter_file = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
config = json.load(open(model_path + "/config.json"))
tok = Tokenizer(model_path + "/tokenizer.json", bos_id=config["bos_token_id"], eos_id=config["eos_token_id"])
wrapped = types.SimpleNamespace(encode=tok.encode, eos_token_id=tok.eos_id)
sets = {n: CacheDataset(TextDataset([json.loads(l) for l in open(f"{data}/{n}.jsonl")], wrapped))
        for n in ("train", "valid")}
model, _ = load_model(__import__("pathlib").Path(model_path))
mx.random.seed(0)
model.freeze()
linear_to_lora_layers(model, settings["num_layers"], {"rank": settings["rank"], "scale": 20.0, "dropout": 0.0})
b = settings["batch_size"]
val_before = evaluate(model, sets["valid"], batch_size=b, num_batches=-1)
mx.reset_peak_memory()
class Record(TrainingCallback):
    reports = []
    def on_train_loss_report(self, info):
        self.reports.append(info)
record = Record()
args = TrainingArgs(batch_size=b, iters=settings["iters"], val_batches=-1, steps_per_report=settings["iters"],
                    steps_per_eval=10**9, steps_per_save=10**9, adapter_file=adapter_file,
                    grad_checkpoint=settings["grad_checkpoint"])
model.train()
train(model, optim.Adam(learning_rate=settings["learning_rate"]), sets["train"], None, args,
      training_callback=record)
peak = mx.get_peak_memory() / 1e9
val_after_own = evaluate(model, sets["valid"], batch_size=b, num_batches=-1)
# the same adapter scored by our evaluator: mlx-lm's loss also counts one padding target after each EOS
folder = __import__("pathlib").Path(adapter_file).parent
json.dump({"fine_tune_type": "lora", "num_layers": settings["num_layers"],
           "lora_parameters": {"rank": settings["rank"], "scale": 20.0, "dropout": 0.0}},
          open(folder / "adapter_config.json", "w"))
from mlx_openelm import load_model
from mlx_openelm.tuning.data import read_dataset
from mlx_openelm.tuning import trainer as ours
valid = read_dataset(f"{data}/valid.jsonl", tok, 2048)
val_after = ours.evaluate(load_model(model_path, adapter_path=folder), valid, b)
print(json.dumps({"val_before_own": val_before, "val_after_own": val_after_own, "val_after": val_after,
                  "train_loss": record.reports[-1]["train_loss"],
                  "tokens_per_second": record.reports[-1]["tokens_per_second"],
                  "iterations_per_second": record.reports[-1]["iterations_per_second"], "peak_memory_gb": peak}))
'''


def run_mlx_lm(model: str, data: str, settings: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-c", MLX_LM_RUNNER, model, data, json.dumps(settings),
                             str(out / "adapters.safetensors")], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


FIELDS = ("val_after", "train_loss", "tokens_per_second", "iterations_per_second", "peak_memory_gb")


def compare(model: str, data: str, settings: dict, trials: int) -> None:
    runs = {"mlx-openelm": [], "mlx-lm": []}
    with tempfile.TemporaryDirectory() as scratch:
        for trial in range(trials):
            for engine, run in (("mlx-openelm", run_ours), ("mlx-lm", run_mlx_lm)):
                start = time.perf_counter()
                runs[engine].append(run(model, data, settings, Path(scratch) / f"{engine}-{trial}"))
                print(f"trial {trial + 1} {engine}: {runs[engine][-1]} ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr)
    medians = {e: {f: statistics.median(r[f] for r in rs) for f in FIELDS} for e, rs in runs.items()}
    before = runs["mlx-openelm"][0]["val_before"]
    from mlx_openelm.blas import describe

    print(f"BLAS (both): {describe()}")
    print(f"settings: {json.dumps(settings)}, trials: {trials} (medians); validation loss before training {before:.3f}")
    print("| engine | val loss after (our evaluator) | last train loss (own count) | iterations/s | "
          "tokens/s (own count) | peak GB |")
    print("|---|---|---|---|---|---|")
    for engine, m in medians.items():
        print(f"| {engine} | {m['val_after']:.3f} | {m['train_loss']:.3f} | {m['iterations_per_second']:.3f} | "
              f"{m['tokens_per_second']:.1f} | {m['peak_memory_gb']:.3f} |")
    ours, theirs = medians["mlx-openelm"], medians["mlx-lm"]
    print(f"ours/mlx-lm: iterations/s x{ours['iterations_per_second'] / theirs['iterations_per_second']:.2f}, "
          f"peak memory x{ours['peak_memory_gb'] / theirs['peak_memory_gb']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("make").add_argument("data", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("model")
    c.add_argument("data")
    for name, kind, default in (("iters", int, 30), ("batch-size", int, 4), ("learning-rate", float, 2e-4),
                                ("num-layers", int, 2), ("rank", int, 8), ("trials", int, 2)):
        c.add_argument(f"--{name}", type=kind, default=default)
    c.add_argument("--grad-checkpoint", action="store_true")
    args = parser.parse_args()
    if args.command == "make":
        make(args.data)
        return
    settings = {"iters": args.iters, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "num_layers": args.num_layers, "rank": args.rank, "grad_checkpoint": args.grad_checkpoint}
    compare(args.model, args.data, settings, args.trials)


if __name__ == "__main__":
    main()
