"""Fault injection through the real `mlx-openelm` process: bad flags, paths and bytes,
signals. Each case asserts the exit status, the one-line message and no traceback."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner

from mlx_openelm import generate, make_logits_processors
from mlx_openelm.cli_common import user_errors


def cli(*args, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_openelm.cli", *map(str, args)], input=input,
                          capture_output=True, timeout=timeout, check=False)


def text(stream: bytes) -> str:
    return stream.decode("utf-8", errors="replace")


def assert_clean(proc, code: int, *words: str) -> str:
    err = text(proc.stderr)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Traceback" not in text(proc.stdout)
    for word in words:
        assert word in err, (word, err)
    return err


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


# ---- output locations are checked before any work -----------------------------------------

@pytest.mark.parametrize("option, where, reason", [
    ("--json", "/dev/null/out", "/dev/null is not a folder"),
    ("--json", "/proc/out", "cannot write /proc/out"),
    ("--csv", "{tmp}/missing/out", "missing does not exist"),
    ("--plot", "{tmp}", "is a folder"),
])
def test_bench_output_paths_fail_before_the_benchmark(bench_preset, tmp_path, option, where, reason):
    path = where.format(tmp=tmp_path)
    proc = cli("bench", "--preset", bench_preset, "--trials", 1, option, path)
    err = assert_clean(proc, 2, option, path, reason)
    assert "building" not in err  # no model was built, no trial ran
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"Error: Invalid value for '{option}': cannot write {path}")


def test_a_failed_bench_leaves_existing_outputs_and_no_scratch_files(bench_preset, tmp_path):
    out = tmp_path / "out.json"
    out.write_bytes(b"the user's old results")
    proc = cli("bench", "--preset", bench_preset, "--prompt-tokens", 4000, "--json", out)
    assert_clean(proc, 1, "context")
    assert out.read_bytes() == b"the user's old results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_bench_writes_to_a_device(bench_preset):
    proc = cli("bench", "--preset", bench_preset, "--trials", 1, "--no-warmup", "--prompt-tokens", 4,
               "--generation-tokens", 2, "--json", "/dev/null")
    assert_clean(proc, 0, "wrote /dev/null")


def test_an_os_error_on_a_named_file_is_one_line_and_other_os_errors_keep_their_traceback(tmp_path):
    @click.command()
    @click.argument("kind")
    @user_errors
    def command(kind):
        if kind == "file":
            (tmp_path / "no" / "such" / "file").write_text("x")
        raise OSError(5, "Input/output error")

    result = CliRunner().invoke(command, ["file"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path}/no/such/file: No such file or directory"
    result = CliRunner().invoke(command, ["other"])
    assert isinstance(result.exception, OSError)  # not about a user's file: a bug, shown as one


def test_only_the_projects_own_errors_become_one_line_messages():
    from mlx_openelm.errors import OptionError

    @click.command()
    @click.argument("kind")
    @user_errors
    def command(kind):
        if kind == "option":
            raise OptionError("--num-draft-tokens must be >= 1, got 0")
        raise ValueError("an internal mistake")

    result = CliRunner().invoke(command, ["option"])
    assert (result.exit_code, result.output.strip()) == (1, "Error: --num-draft-tokens must be >= 1, got 0")
    result = CliRunner().invoke(command, ["bug"])
    assert isinstance(result.exception, ValueError) and str(result.exception) == "an internal mistake"


def test_library_errors_name_parameters_and_the_cli_shows_its_flags():
    """A library error names the call's parameters (the one at fault leading, others in backticks); the
    command shows each of its own options as the flag (the first long one), and leaves other text alone."""
    from mlx_openelm.errors import ConfigError

    messages = {
        "lead": "save_path: out exists; pass `force=True` to replace it",
        "values": "warmup: 12 steps leave none of the 12 `iters`; fewer than `batch_size=4`",
        "others": "dtype: `seed` and `recipe=x` are no options here; not_an_option: stays",
        "path": "max_seq_length.txt: a file, `hf download x` as it is",
    }

    @click.command()
    @click.argument("kind")
    @click.option("--save-path", "--mlx-path", "save_path")
    @click.option("--force", is_flag=True)
    @click.option("--warmup", type=int)
    @click.option("--iters", type=int)
    @click.option("--batch-size", "-b", type=int)
    @click.option("--max-seq-length", type=int)
    @user_errors
    def command(kind, **options):
        raise ConfigError(messages[kind])

    shown = {kind: CliRunner().invoke(command, [kind]).output.strip() for kind in messages}
    assert shown == {
        "lead": "Error: --save-path: out exists; pass --force to replace it",
        "values": "Error: --warmup: 12 steps leave none of the 12 --iters; fewer than --batch-size 4",
        "others": "Error: dtype: `seed` and `recipe=x` are no options here; not_an_option: stays",
        "path": "Error: max_seq_length.txt: a file, `hf download x` as it is",
    }


# ---- bytes that are not UTF-8 -------------------------------------------------------------------

def expected_text(loaded, prompt: str, max_tokens: int) -> str:
    model, tokenizer = loaded
    return generate(model, tokenizer, prompt, max_tokens=max_tokens, logits_processors=make_logits_processors(1.2))


def test_invalid_bytes_in_the_prompt_argument_are_replaced_and_said_once(hf_checkpoint, loaded):
    prompt = b"caf\xe9 and \xff\xfe bytes"
    proc = subprocess.run([sys.executable.encode(), b"-m", b"mlx_openelm.cli", b"generate", b"--model",
                           str(hf_checkpoint).encode(), b"-p", prompt, b"-m", b"4", b"-q"],
                          capture_output=True, timeout=120, check=False)
    err = assert_clean(proc, 0)
    notes = [line for line in warning_lines(err) if "UTF-8" in line]
    assert notes == ["warning: --prompt is not valid UTF-8; invalid bytes replaced with U+FFFD"]
    assert text(proc.stdout) == expected_text(loaded, "caf\ufffd and \ufffd\ufffd bytes", 4) + "\n"


def test_invalid_bytes_on_stdin_are_replaced_and_said_once(hf_checkpoint, loaded):
    proc = cli("generate", "--model", hf_checkpoint, "-p", "-", "-m", "4", "-q", input=b"Once \xc3 upon\xff a time")
    err = assert_clean(proc, 0)
    assert [line for line in warning_lines(err) if "UTF-8" in line] == [
        "warning: the prompt (stdin) is not valid UTF-8; invalid bytes replaced with U+FFFD"]
    assert text(proc.stdout) == expected_text(loaded, "Once \ufffd upon\ufffd a time", 4) + "\n"


def test_chat_survives_invalid_bytes_and_says_so_once(hf_checkpoint):
    proc = cli("chat", "--model", hf_checkpoint, "-m", "3", input=b"hello\n\xff\xfe bad\nagain \xc3\nbye\n")
    err = assert_clean(proc, 0)
    assert [line for line in warning_lines(err) if "UTF-8" in line] == [
        "warning: a chat line is not valid UTF-8; invalid bytes replaced with U+FFFD"]
    assert sum("tok/s" in line for line in err.splitlines()) == 4  # every line got its reply


# ---- library warnings: one line each, once ---------------------------------------------------

def test_library_warnings_are_one_line_notes_shown_once(hf_checkpoint, small_tokenizer_path, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(hf_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "bogus_key": 1}))
    proc = cli("chat", "--model", folder, "--tokenizer", small_tokenizer_path, "-m", "2", "-q",
               input=b"hi\nhi again\n")
    err = assert_clean(proc, 0)
    lines = warning_lines(err)
    assert sum("unknown config keys ['bogus_key']" in line for line in lines) == 1
    assert sum("fewer than the model's vocab_size" in line for line in lines) == 1  # the wrong tokenizer
    assert "OpenELMWarning" not in err and "warnings.warn" not in err and ".py:" not in err


def test_half_precision_with_a_quantized_model_on_cpu_warns_once(hf_checkpoint, tmp_path):
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        pytest.skip("the warning is about MLX's CPU backend")
    out = tmp_path / "q4"
    assert_clean(cli("convert", "--hf-path", hf_checkpoint, "--mlx-path", out, "--bits", 4, "--group-size", 32,
                     "--no-eval"), 0)
    proc = cli("generate", "--model", out, "--dtype", "float16", "-p", "hi", "-m", 2)
    lines = [line for line in warning_lines(assert_clean(proc, 0)) if "quantized model is very slow" in line]
    assert lines == ["warning: float16 with a quantized model is very slow on MLX's CPU backend "
                     "(about 50x slower than float32, the default here)"]


# ---- bad flags and paths ---------------------------------------------------------------------

@pytest.mark.parametrize("args, code, words", [
    (["generate", "--model", "{ckpt}", "-p", "hi", "--max-tokens", "many"], 2, ["--max-tokens", "many"]),
    (["generate", "--model", "{tmp}/nothing", "-p", "hi"], 1, ["Error: ", "nothing: model folder not found"]),
    (["chat", "--model", "{ckpt}", "--top-p", "2"], 2, ["--top-p"]),
    (["chat", "--model", "{ckpt}", "--tokenizer", "{tmp}/none.model"], 1, ["none.model: tokenizer file not found"]),
    (["bench", "--preset", "270M", "--bits", "7"], 2, ["--bits", "7 bits"]),
    (["nonsense"], 2, ["No such command 'nonsense'"]),
])
def test_bad_flags_and_paths(hf_checkpoint, tmp_path, args, code, words):
    args = [a.format(ckpt=hf_checkpoint, tmp=tmp_path) for a in args]
    err = assert_clean(cli(*args, input=b""), code, *words)
    if code == 1:
        assert err.strip().splitlines()[-1].startswith("Error: ")


# ---- signals ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory, tokenizer_path):
    """Many layers of tiny width: cheap to build, but each token costs dozens of MLX ops, so a
    long generation cannot finish before the signal arrives, even on a loaded machine."""
    from synthetic import TINY_CONFIG, random_weights, write_hf_checkpoint

    n = 24
    config = {**TINY_CONFIG, "num_transformer_layers": n, "num_query_heads": [4] * n, "num_kv_heads": [1] * n,
              "ffn_multipliers": [0.5] * n}
    folder = tmp_path_factory.mktemp("slow") / "OpenELM-slow"
    return write_hf_checkpoint(folder, config, random_weights(config, seed=7), tokenizer=tokenizer_path)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlx_openelm.cli", *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_output(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Block until the process has written its first bytes to stdout (it is generating)."""
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        if proc.stdout.read(1):
            return
        assert proc.poll() is None, text(proc.stderr.read())
        time.sleep(0.02)
    raise AssertionError("no output")


def finish(proc: subprocess.Popen, input: bytes = b"") -> tuple[int, str]:
    os.set_blocking(proc.stdout.fileno(), True)
    _, err = proc.communicate(input, timeout=60)
    return proc.returncode, text(err)


@pytest.mark.parametrize("signum, code, words", [
    (signal.SIGINT, 1, "Aborted!"),
    (signal.SIGTERM, 128 + signal.SIGTERM, ""),
])
def test_a_signal_during_generate_stops_it_cleanly(slow_checkpoint, signum, code, words):
    proc = start("generate", "--model", slow_checkpoint, "-p", "Once upon a time", "-m", 2000, "--repetition-penalty", 1)
    wait_for_output(proc)
    proc.send_signal(signum)
    returncode, err = finish(proc)
    assert returncode == code, err
    assert "Traceback" not in err and words in err
    assert "generation: 2000 tokens" not in err  # it stopped early


def test_sigterm_ends_a_waiting_chat_cleanly(hf_checkpoint):
    proc = start("chat", "--model", hf_checkpoint, "-m", 2, "-q")
    proc.stdin.write(b"hi\n")
    proc.stdin.flush()
    wait_for_output(proc)  # the first reply came; the chat now waits for the next line
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    returncode, err = finish(proc)
    assert returncode == 128 + signal.SIGTERM and "Traceback" not in err


def test_sigint_during_a_chat_reply_keeps_the_chat(slow_checkpoint):
    proc = start("chat", "--model", slow_checkpoint, "-m", 120, "--repetition-penalty", 1)
    proc.stdin.write(b"tell me everything\n")
    proc.stdin.flush()
    wait_for_output(proc)
    proc.send_signal(signal.SIGINT)
    returncode, err = finish(proc, b"and now briefly\n")
    assert returncode == 0 and "Traceback" not in err
    assert "[interrupted: the reply so far stays in the conversation]" in err
    assert sum("tok/s" in line for line in err.splitlines()) == 1  # the second reply completed


# ---- option values refused before any work (found by the issue 8 audit) -----------------------

def outcome(result) -> tuple[int, str]:
    """(exit status, last line of output) of an `invoke_cli` result (mlx-openelm run in this process)."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback: the case failed
    return result.exit_code, result.output.strip().splitlines()[-1]


@pytest.mark.parametrize("args, code, message", [
    (["--seed", "-1"], 1, "Error: --seed must be an integer from 0 to 2**64 - 1, got -1"),
    (["--bandwidth", "nan"], 1, "Error: --bandwidth must be a positive number of GB/s, got nan"),
    (["--json", "{tmp}/same", "--csv", "{tmp}/same"], 2, "Error: Invalid value for '--csv': {tmp}/same is also the "
                                                         "--json output"),
    (["--json", "{config}"], 2, "Error: Invalid value for '--json': {config} would overwrite the input {config}"),
])
def test_bench_refuses_bad_values_and_clashing_outputs_before_any_work(bench_preset, tmp_path, args, code, message,
                                                                        invoke_cli):
    before = bench_preset.read_bytes()
    fill = {"tmp": tmp_path, "config": bench_preset}
    got = outcome(invoke_cli("bench", "--preset", bench_preset, "--trials", 1, *[a.format(**fill) for a in args]))
    assert got == (code, message.format(**fill))
    assert bench_preset.read_bytes() == before and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value, message", [
    ("--temp", "nan", "temp must be a finite number >= 0, got nan"),
    ("--top-p", "nan", "top_p must be in (0, 1] (1 disables it), got nan"),
    ("--repetition-penalty", "nan", "repetition_penalty must be a positive number, got nan"),
    ("--prefill-chunk", "-1", "prefill_chunk must be an integer >= 0 (0: whole prompts at once), got -1"),
    ("--seed", "-1", "seed must be an integer from 0 to 2**64 - 1, got -1"),
])
def test_serve_refuses_sampling_defaults_no_request_could_use_before_loading(tmp_path, option, value, message,
                                                                               invoke_cli):
    missing = tmp_path / "no-model"  # never looked at: the value is refused first
    assert outcome(invoke_cli("serve", "--model", missing, "--port", 0, option, value)) == (1, f"Error: {message}")


def test_generate_and_chat_refuse_a_seed_mlx_cannot_hold_in_one_line(hf_checkpoint, invoke_cli):
    message = "Error: seed must be an integer from 0 to 2**64 - 1, got -1"
    generate = invoke_cli("generate", "--model", hf_checkpoint, "-p", "hi", "--seed", -1, "--temp", 1)
    assert outcome(generate) == (1, message)
    chat = invoke_cli("chat", "--model", hf_checkpoint, "--seed", -1)
    assert outcome(chat) == (1, message)  # before waiting for a line


# ---- outputs on a full disk ------------------------------------------------------------------

def test_a_bench_output_failing_on_a_full_disk_keeps_the_old_file_and_says_so(bench_preset, tmp_path):
    out = tmp_path / "out.json"
    out.write_bytes(b"the user's old results")

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of a kill

    proc = subprocess.run([sys.executable, "-m", "mlx_openelm.cli", "bench", "--preset", str(bench_preset),
                           "--trials", "1", "--no-warmup", "--prompt-tokens", "4", "--generation-tokens", "2",
                           "--json", str(out)], capture_output=True, timeout=120, preexec_fn=small_disk)
    err = assert_clean(proc, 1)
    assert err.strip().splitlines()[-1] == f"Error: {out}: File too large"
    assert out.read_bytes() == b"the user's old results" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_standard_output_on_a_full_disk_is_one_line_not_a_traceback(hf_checkpoint):
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "mlx_openelm.cli", "generate", "--model", str(hf_checkpoint),
                               "-p", "hi", "-m", "3"], stdout=full, stderr=subprocess.PIPE, timeout=120)
    err = text(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "Error: cannot write the output: No space left on device"
    assert "Exception ignored" not in err  # stdout's buffer does not fail a second time at exit


def test_bench_replaces_the_file_behind_a_linked_output_and_keeps_its_mode(bench_preset, tmp_path, invoke_cli):
    results = tmp_path / "shared" / "results.csv"
    results.parent.mkdir()
    results.write_text("old")
    results.chmod(0o640)
    (tmp_path / "link.csv").symlink_to(results)
    got = outcome(invoke_cli("bench", "--preset", bench_preset, "--trials", 1, "--no-warmup", "--prompt-tokens", 4,
                             "--generation-tokens", 2, "--csv", tmp_path / "link.csv"))
    assert got == (0, f"wrote {tmp_path / 'link.csv'}")
    assert (tmp_path / "link.csv").is_symlink() and results.read_text().startswith("engine,")
    assert results.stat().st_mode & 0o777 == 0o640 and sorted(p.name for p in results.parent.iterdir()) == ["results.csv"]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_eval_refuses_a_device_as_its_text_instead_of_reading_it_forever(hf_checkpoint, invoke_cli):
    assert outcome(invoke_cli("eval", "--model", hf_checkpoint, "--text", "/dev/zero")) == (
        1, "Error: /dev/zero: a device, not a text file")


NO_ROOT_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                    "--bounding-set=-dac_override,-dac_read_search"]  # root that obeys file modes


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_bench_does_not_replace_a_read_only_output_file(bench_preset, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")
    out.chmod(0o444)
    proc = subprocess.run([*NO_ROOT_OVERRIDE, sys.executable, "-m", "mlx_openelm.cli", "bench", "--preset",
                           str(bench_preset), "--trials", "1", "--json", str(out)], capture_output=True, timeout=120)
    err = assert_clean(proc, 2)
    assert err.strip().splitlines()[-1] == f"Error: Invalid value for '--json': cannot write {out}: permission denied"
    assert out.read_text() == "old"
