"""The `chat` command and its REPL (`chat_cli`), and `generate --chat`."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from mlx_openelm import load, make_logits_processors
from mlx_openelm.chat import ChatSession
from mlx_openelm.chat_cli import run_repl
from mlx_openelm.generation import stream_generate

from synthetic import CountingModel


# ---- the REPL and the command line -----------------------------------------------------

def test_repl_interrupt_then_next_message(loaded, capsys):
    model, tokenizer = loaded
    counting = CountingModel(model, interrupt_at=4)
    session = ChatSession(counting, tokenizer)
    run_repl(session, max_tokens=6, stdin=io.StringIO("Hello there\nGo on\n"), interactive=False)
    out, err = capsys.readouterr()
    assert "[interrupted" in err
    assert stats_lines(err) == 1  # a stats line for the completed reply only
    assert session.finish_reason == "length" and [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert ">>>" not in out


def stats_lines(err):
    return sum(1 for line in err.splitlines() if "tok/s" in line)


def test_chat_command_two_turns_reset_and_end_of_input(any_checkpoint, invoke_cli):
    model, tokenizer = load(any_checkpoint, dtype="float32")
    result = invoke_cli("chat", "--model", str(any_checkpoint), "-m", "6", "--system", "Be brief.",
                        input="Hello there\nTell me more\n/help\n/reset\nHello there\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    session = ChatSession(model, tokenizer, system="Be brief.")
    replies = []
    for text in ["Hello there", "Tell me more"]:
        replies.append("".join(r.text for r in session.send(text, max_tokens=6,
                                                              logits_processors=make_logits_processors(1.2))))
    assert result.stdout == replies[0] + "\n" + replies[1] + "\n" + replies[0] + "\n"
    assert stats_lines(result.stderr) == 3 and "[new conversation]" in result.stderr
    assert "/reset" in result.stderr and "/exit" in result.stderr  # the /help text


def test_chat_exit_command_stops_reading(hf_checkpoint, invoke_cli):
    result = invoke_cli("chat", "--model", str(hf_checkpoint), "-m", "3", "-q", input="hi\n/exit\nnever sent\n",
                        catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout.count("\n") == 1
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines())  # -q: no stats lines


def test_chat_through_a_pipe(hf_checkpoint):
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_openelm.cli", "chat", "--model", str(hf_checkpoint), "-m", "5"],
        input="hi\nand again\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert stats_lines(proc.stderr) == 2 and ">>>" not in proc.stdout
    assert proc.stdout.count("\n") >= 2


def test_generate_chat_applies_the_template(hf_checkpoint, loaded, invoke_cli):
    model, tokenizer = loaded
    result = invoke_cli("generate", "--model", str(hf_checkpoint), "--chat", "--system", "Be brief.",
                        "-p", "Hello there", "-m", "6", "--json", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ids = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hello there"}])
    data = json.loads(result.stdout)
    expected = "".join(r.text for r in stream_generate(model, tokenizer, ids, max_tokens=6,
                                                       logits_processors=make_logits_processors(1.2)))
    assert data["prompt_tokens"] == len(ids) and data["text"] == expected
