"""The `mlx-openelm` command line: generate, errors, and a fast --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlx_openelm import generate, load, make_logits_processors


def test_help_is_instant_and_does_not_import_mlx():
    """`--help` of the group and of every subcommand works without loading MLX."""
    code = (
        "import sys\n"
        "from mlx_openelm.cli import COMMANDS, main\n"
        "for args in [['--help']] + [[name, '--help'] for name in sorted(COMMANDS)]:\n"
        "    try:\n        main(args)\n"
        "    except SystemExit as e:\n        assert e.code == 0, args\n"
        "    loaded = [m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')]\n"
        "    assert not loaded, (args, loaded[:3])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for text in ("generate", "chat", "convert", "bench", "--system", "--dequantize", "--compare"):
        assert text in result.stdout


def test_generate_prints_the_same_text_as_the_api(any_checkpoint, invoke_cli):
    """With the folder's tokenizer.model, and with a tokenizer.json in its place."""
    result = invoke_cli("generate", "--model", any_checkpoint, "--prompt", "Once upon a time", "--max-tokens", "12",
                        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    model, tokenizer = load(any_checkpoint)
    expected = generate(model, tokenizer, "Once upon a time", max_tokens=12,
                        logits_processors=make_logits_processors(1.2))  # the CLI's default penalty
    assert result.stdout == expected + "\n"
    assert "prompt: " in result.stderr and "generation: 12 tokens" in result.stderr
    assert "tok/s" in result.stderr and "peak memory" in result.stderr


def test_generate_reads_the_prompt_from_stdin_and_prints_json(hf_checkpoint, invoke_cli):
    result = invoke_cli("generate", "--model", hf_checkpoint, "--prompt", "-", "--max-tokens", "5", "--json",
                        "--temp", "0.8", "--top-p", "0.9", "--seed", "1", input="Once upon a time",
                        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["prompt_tokens"] > 1 and data["generation_tokens"] == 5
    assert data["finish_reason"] == "length" and isinstance(data["text"], str)
    again = invoke_cli("generate", "--model", hf_checkpoint, "--prompt", "-", "--max-tokens", "5", "--json",
                       "--temp", "0.8", "--top-p", "0.9", "--seed", "1", input="Once upon a time",
                       catch_exceptions=False)
    assert json.loads(again.stdout)["text"] == data["text"]


def test_quiet_prints_only_text(hf_checkpoint, invoke_cli):
    result = invoke_cli("generate", "--model", hf_checkpoint, "--prompt", "hi", "-m", "3", "--quiet",
                        catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout.count("\n") == 1
    # no loading line, no statistics: only library warnings (the tiny test tokenizer is short of the vocab)
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}/missing"], "missing: model folder not found"),
        (["--model", "{sharded}"], "pass the Llama-2 SentencePiece tokenizer with --tokenizer"),
        (["--model", "{ckpt}", "--tokenizer", "{tmp}/tok.model"], "tok.model: tokenizer file not found"),
    ],
)
def test_generate_errors_are_one_clear_line(tmp_path, hf_checkpoint, sharded_checkpoint, args, message, invoke_cli):
    args = [a.format(tmp=tmp_path, sharded=sharded_checkpoint, ckpt=hf_checkpoint) for a in args]
    result = invoke_cli("generate", *args, "--prompt", "hi")
    assert result.exit_code == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("Error: ") and message in last_line
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, option",
    [(["--temp", "-1"], "--temp"), (["--dtype", "float8"], "--dtype"), (["--top-p", "0"], "--top-p"),
     (["--max-tokens", "-5"], "--max-tokens"),
     (["--max-tokens", "0"], "--max-tokens")],  # no reply, no statistics: nothing to run
)
def test_generate_bad_options_name_the_option(hf_checkpoint, args, option, invoke_cli):
    result = invoke_cli("generate", "--model", hf_checkpoint, "--prompt", "hi", *args)
    assert result.exit_code == 2 and option in result.stderr
