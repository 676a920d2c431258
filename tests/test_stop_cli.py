"""--stop TEXT (repeatable) for generate and chat: the reply ends before the text, which is not printed."""

from __future__ import annotations

import json

import pytest

from mlx_openelm import ChatSession, load, make_logits_processors

PROMPT = "Once upon a time"


def succeeded(result):
    assert result.exit_code == 0, result.output
    return result


def stop_text_inside(text: str) -> tuple[str, int]:
    """A stop string that first occurs in the middle of `text`, and where."""
    for start in range(2, len(text) - 3):
        candidate = text[start:start + 3]
        if candidate.strip() and text.index(candidate) == start:
            return candidate, start
    pytest.fail(f"no usable stop string in {text!r}")


def test_generate_stops_before_the_text(hf_checkpoint, invoke_cli):
    base = ["generate", "--model", hf_checkpoint, "-p", PROMPT, "-m", "24", "-q"]
    full = succeeded(invoke_cli(*base, catch_exceptions=False)).stdout[:-1]
    stop, at = stop_text_inside(full)
    assert succeeded(invoke_cli(*base, "--stop", stop, catch_exceptions=False)).stdout == full[:at] + "\n"
    # repeatable: the earliest of several ends it; a stop text that never comes changes nothing
    later, _ = stop_text_inside(full[at + 3:])
    earliest = invoke_cli(*base, "--stop", later, "--stop", stop, catch_exceptions=False)
    assert succeeded(earliest).stdout == full[:at] + "\n"
    assert succeeded(invoke_cli(*base, "--stop", "never said \u2603", catch_exceptions=False)).stdout == full + "\n"
    fields = json.loads(succeeded(invoke_cli(*base[:-1], "--json", "--stop", stop, catch_exceptions=False)).stdout)
    assert fields["text"] == full[:at] and fields["finish_reason"] == "stop" and fields["context_full"] is False


def test_chat_stops_before_the_text_and_remembers_what_was_shown(hf_checkpoint, invoke_cli):
    model, tokenizer = load(hf_checkpoint)
    penalty = make_logits_processors(1.2)
    full = "".join(r.text for r in ChatSession(model, tokenizer).send("hi", max_tokens=24, logits_processors=penalty))
    stop, at = stop_text_inside(full)
    session = ChatSession(model, tokenizer)
    shown = "".join(r.text for r in session.send("hi", max_tokens=24, logits_processors=penalty, stop=stop))
    assert shown == full[:at] and session.finish_reason == "stop"
    assert session.messages[-1] == {"role": "assistant", "content": full[:at]}
    second = list(session.send("more", max_tokens=4, logits_processors=penalty))
    assert second and session.messages[-1]["role"] == "assistant"

    result = succeeded(invoke_cli("chat", "--model", hf_checkpoint, "-m", "24", "--stop", stop, input="hi\n",
                                  catch_exceptions=False))
    assert result.stdout == full[:at] + "\n"


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_an_empty_stop_text_is_a_flag_error_naming_the_option(hf_checkpoint, command, invoke_cli):
    prompt = ["-p", PROMPT] if command == "generate" else []
    result = invoke_cli(command, "--model", hf_checkpoint, *prompt, "--stop", "", input="hi\n")
    assert result.exit_code == 2 and result.exception is not None  # click's usage error, before loading
    assert "Invalid value for '--stop': an empty text would end every reply at once" in result.output


def test_stream_generate_refuses_an_empty_stop_string(loaded):
    from mlx_openelm import stream_generate
    from mlx_openelm.errors import OptionError

    model, tokenizer = loaded
    with pytest.raises(OptionError, match="stop strings must be non-empty strings, got ''"):
        next(stream_generate(model, tokenizer, PROMPT, max_tokens=2, stop=""))
