"""`--adapter-path` in generate, chat, eval and serve: each computes what the adapted model does in
this process (and not what the base model does); a bad adapter is one `Error:` line."""

from __future__ import annotations

import signal

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm import ChatSession, generate, load, make_logits_processors
from mlx_openelm.evaluate import evaluate
from mlx_openelm.tuning.adapters import adapter_weights, apply_adapters
from mlx_openelm.tuning.config import check_adapter_config
from mlx_openelm.tuning.saving import save_adapters

from serving import start_server

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def adapter(hf_checkpoint, tmp_path_factory):
    """A DoRA adapter with large random weights: it changes what the model generates."""
    model, _ = load(hf_checkpoint, dtype="float32")
    config = check_adapter_config("dora", 2, len(model.layers), rank=4, scale=3.0)
    apply_adapters(model, config)
    rng = np.random.default_rng(0)
    model.load_weights([(name, a * 1.5 if name.endswith(".m") else mx.array(rng.normal(0, 0.3, a.shape), mx.float32))
                        for name, a in adapter_weights(model).items()], strict=False)
    folder = tmp_path_factory.mktemp("adapter") / "adapters"
    save_adapters(model, folder, config)
    return folder


@pytest.fixture(scope="module")
def adapted(hf_checkpoint, adapter):
    return load(hf_checkpoint, dtype="float32", adapter_path=adapter)


def test_generate_uses_the_adapter(hf_checkpoint, adapter, adapted, loaded, invoke_cli):
    result = invoke_cli("generate", "--model", hf_checkpoint, "--adapter-path", adapter, "-p", PROMPT, "-m", 12)
    assert result.exit_code == 0, result.output
    penalty = make_logits_processors(1.2)
    assert result.stdout == generate(*adapted, PROMPT, max_tokens=12, logits_processors=penalty) + "\n"
    assert result.stdout != generate(*loaded, PROMPT, max_tokens=12, logits_processors=penalty) + "\n"
    assert f"Adapter {adapter} applied" in result.stderr


def test_chat_uses_the_adapter(hf_checkpoint, adapter, adapted, invoke_cli):
    result = invoke_cli("chat", "--model", hf_checkpoint, "--adapter-path", adapter, "-m", 10, "-q", input="hi\n")
    assert result.exit_code == 0, result.output
    reply = "".join(r.text for r in ChatSession(*adapted).send("hi", max_tokens=10,
                                                                 logits_processors=make_logits_processors(1.2)))
    assert reply and reply in result.stdout


def test_eval_uses_the_adapter(hf_checkpoint, adapter, adapted, loaded, tmp_path, invoke_cli):
    import json

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    result = invoke_cli("eval", "--model", hf_checkpoint, "--adapter-path", adapter, "--text", text, "--context", 32,
                        "--json")
    assert result.exit_code == 0, result.output
    model, tokenizer = adapted
    tokens = tokenizer.encode(text.read_text())
    ours = evaluate(model, tokens, 32, 16)
    assert json.loads(result.stdout)["perplexity"] == pytest.approx(ours.perplexity, rel=1e-5)
    assert ours.perplexity != pytest.approx(evaluate(loaded[0], tokens, 32, 16).perplexity, rel=1e-3)


def test_serve_uses_the_adapter(hf_checkpoint, adapter, adapted):
    openai = pytest.importorskip("openai")

    server = start_server(hf_checkpoint, "--adapter-path", str(adapter), "--max-tokens", "10")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        text = client.completions.create(model="m", prompt=PROMPT, max_tokens=10).choices[0].text
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=20)
    assert text == generate(*adapted, PROMPT, max_tokens=10, logits_processors=make_logits_processors(1.2))


@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["eval", "--text", "README.md"]])
def test_a_bad_adapter_path_is_one_error_line(hf_checkpoint, tmp_path, command, invoke_cli):
    result = invoke_cli(command[0], "--model", hf_checkpoint, "--adapter-path", tmp_path / "none", *command[1:])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {tmp_path / 'none'}: adapter folder not found " \
                                                      "(expected adapter_config.json and adapters.safetensors)"
