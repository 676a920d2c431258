"""convert speaks mlx-lm's options (-q, --q-bits, --q-group-size, default --mlx-path) and shows progress."""

from __future__ import annotations

import io
import json


from mlx_openelm.convert import convert
from mlx_openelm.convert.cli import ProgressBar
from mlx_openelm.convert.pipeline import ConvertProgress
from mlx_openelm.loading import read_weights


def quantization(folder):
    return json.loads((folder / "config.json").read_text()).get("quantization")


def test_q_quantizes_at_4_bits_into_mlx_model_by_default(hf_checkpoint, tmp_path, monkeypatch, invoke_cli):
    monkeypatch.chdir(tmp_path)
    result = invoke_cli("convert", "--hf-path", hf_checkpoint, "-q", "--no-eval", "--json", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    entry = quantization(tmp_path / "mlx_model")
    assert (entry["bits"], entry["group_size"]) == (4, 64)
    again = invoke_cli("convert", "--hf-path", str(hf_checkpoint), "--quantize")
    assert again.exit_code == 1 and "mlx_model already exists" in again.output


def test_q_bits_and_q_group_size_are_aliases(hf_checkpoint, tmp_path, invoke_cli):
    out = tmp_path / "q8"
    result = invoke_cli("convert", "--hf-path", hf_checkpoint, "--mlx-path", out, "-q", "--q-bits", "8",
                        "--q-group-size", "32", "--no-eval", "--json", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    entry = quantization(out)
    assert (entry["bits"], entry["group_size"]) == (8, 32)
    plain = invoke_cli("convert", "--hf-path", hf_checkpoint, "--mlx-path", tmp_path / "float", "--no-eval",
                       "--dtype", "float32", catch_exceptions=False)
    assert plain.exit_code == 0 and quantization(tmp_path / "float") is None


def test_progress_counts_every_tensor_and_weight(hf_checkpoint, tmp_path):
    steps: list[ConvertProgress] = []
    convert(hf_checkpoint, tmp_path / "out", dtype="float32", evaluate=False, progress=steps.append)
    weights = {k: v for k, v in read_weights(hf_checkpoint).items() if "classifier" not in k}  # not converted
    total = sum(w.size for w in weights.values())
    assert steps[0].weights_done == 0 and steps[-1] == ConvertProgress(len(weights), len(weights), total, total, "")
    assert [s.tensors_done for s in steps] == list(range(len(weights) + 1))
    done = [s.weights_done for s in steps]
    assert done == sorted(done) and all(s.weights_total == total for s in steps)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_percent_and_tensors_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bar = ProgressBar(then="checking ...")
    for step in [ConvertProgress(0, 4, 0, 1000, "a"), ConvertProgress(2, 4, 500, 1000, "c"),
                 ConvertProgress(4, 4, 1000, 1000, "")]:
        bar(step)
    drawn = terminal.getvalue()
    assert "converting 0.0M weights" in drawn and "50%" in drawn and "2/4 tensors" in drawn
    assert "100%" in drawn and drawn.rstrip().endswith("checking ...")
