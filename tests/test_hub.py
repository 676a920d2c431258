"""Model and tokenizer references: local paths, and Hugging Face repo ids from a pre-populated cache, offline."""

from __future__ import annotations

import pytest

from mlx_openelm import generate, load, make_logits_processors
from mlx_openelm.errors import CheckpointError, TokenizerError
from mlx_openelm.hub import (
    DEFAULT_MODEL,
    DEFAULT_TOKENIZER_REPO,
    looks_like_repo_id,
    resolve_model_path,
    resolve_tokenizer,
)

from synthetic import cache_repo


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def cached_model(hf_cache, sharded_checkpoint):
    """A tokenizer-less checkpoint (like Apple's repos) cached as apple/OpenELM-tiny."""
    files = {p.name: p for p in sharded_checkpoint.iterdir()}
    assert "tokenizer.model" not in files
    return cache_repo(hf_cache, "apple/OpenELM-tiny", files)


@pytest.mark.parametrize(
    "reference, expected",
    [("apple/OpenELM-270M-Instruct", True), ("mlx-community/OpenELM-270M-Instruct-4bit", True),
     ("/abs/path", False), ("./rel", False), ("a/b/c", False), ("../x", False), ("name", False)],
)
def test_looks_like_repo_id(reference, expected):
    assert looks_like_repo_id(reference) is expected


def test_repo_id_resolves_to_the_cached_snapshot_offline(cached_model):
    assert resolve_model_path("apple/OpenELM-tiny") == cached_model


def test_local_folder_wins(hf_checkpoint):
    assert resolve_model_path(str(hf_checkpoint)) == hf_checkpoint


def test_repo_not_cached_while_offline_says_so(hf_cache):
    with pytest.raises(CheckpointError) as info:
        resolve_model_path("apple/OpenELM-missing")
    message = str(info.value)
    assert "apple/OpenELM-missing is not in the Hugging Face cache" in message
    assert str(hf_cache) in message and "HF_HUB_OFFLINE" in message


def test_missing_local_folder_is_not_a_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="missing: model folder not found"):
        resolve_model_path(str(tmp_path / "missing"))


def test_no_reference_means_the_default_model(hf_cache, sharded_checkpoint):
    snapshot = cache_repo(hf_cache, DEFAULT_MODEL, {p.name: p for p in sharded_checkpoint.iterdir()})
    assert DEFAULT_MODEL == "apple/OpenELM-270M-Instruct"
    assert resolve_model_path() == resolve_model_path(None) == snapshot


def test_default_model_not_cached_offline_says_the_command_and_the_option(hf_cache):
    with pytest.raises(CheckpointError) as info:
        resolve_model_path()
    message = str(info.value)
    assert f"`hf download {DEFAULT_MODEL}`" in message
    assert "pass --model with a local model folder" in message and "HF_HUB_OFFLINE is set" in message


def test_unreachable_hub_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(TokenizerError) as info:
        resolve_tokenizer(tmp_path)
    message = str(info.value)
    assert "cannot be reached" in message and f"`hf download {DEFAULT_TOKENIZER_REPO} tokenizer.model`" in message
    assert "--tokenizer" in message


def test_tokenizer_explicit_path_folder_and_repo_id(hf_cache, tokenizer_path, cached_model):
    assert resolve_tokenizer(cached_model, tokenizer_path) == tokenizer_path
    assert resolve_tokenizer(cached_model, tokenizer_path.parent) == tokenizer_path.parent / "tokenizer.model"
    snapshot = cache_repo(hf_cache, "someone/llama-tok", {"tokenizer.model": tokenizer_path})
    assert resolve_tokenizer(cached_model, "someone/llama-tok") == snapshot / "tokenizer.model"
    with pytest.raises(TokenizerError, match="someone/absent is not in the Hugging Face cache"):
        resolve_tokenizer(cached_model, "someone/absent")


def test_a_local_folder_without_a_tokenizer_is_named_never_looked_up(hf_cache, tokenizer_path, cached_model,
                                                                     tmp_path, monkeypatch):
    """A folder named like a repo id (owner/name) is still the user's folder."""
    cache_repo(hf_cache, "someone/llama-tok", {"tokenizer.model": tokenizer_path})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone" / "llama-tok").mkdir(parents=True)
    with pytest.raises(TokenizerError) as info:
        resolve_tokenizer(cached_model, "someone/llama-tok")
    assert str(info.value) == "someone/llama-tok: no tokenizer.model or tokenizer.json in this folder"


def test_tokenizer_from_the_model_folder(hf_checkpoint):
    assert resolve_tokenizer(hf_checkpoint) == hf_checkpoint / "tokenizer.model"


def test_default_tokenizer_repo_from_the_cache(hf_cache, tokenizer_path, cached_model, monkeypatch):
    monkeypatch.setenv("MLX_OPENELM_TOKENIZER_REPO", "mirror/llama-2-tokenizer")
    snapshot = cache_repo(hf_cache, "mirror/llama-2-tokenizer", {"tokenizer.model": tokenizer_path})
    logged = []
    assert resolve_tokenizer(cached_model, log=logged.append) == snapshot / "tokenizer.model"
    assert logged and "mirror/llama-2-tokenizer" in logged[0]


def test_no_tokenizer_anywhere_says_exactly_what_to_pass(hf_cache, cached_model, monkeypatch):
    with pytest.raises(TokenizerError) as info:
        resolve_tokenizer(cached_model)
    message = str(info.value)
    assert "pass the Llama-2 SentencePiece tokenizer with --tokenizer" in message
    assert DEFAULT_TOKENIZER_REPO in message and "not in the Hugging Face cache" in message
    monkeypatch.setenv("MLX_OPENELM_TOKENIZER_REPO", "")
    with pytest.raises(TokenizerError, match="MLX_OPENELM_TOKENIZER_REPO is empty"):
        resolve_tokenizer(cached_model)


def test_generate_and_chat_accept_repo_ids_offline(cached_model, hf_cache, tokenizer_path, invoke_cli):
    cache_repo(hf_cache, "someone/llama-tok", {"tokenizer.model": tokenizer_path})
    result = invoke_cli("generate", "--model", "apple/OpenELM-tiny", "--tokenizer", "someone/llama-tok",
                        "-p", "Once upon a time", "-m", "6", "-q", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    model, tokenizer = load(cached_model, tokenizer=tokenizer_path)
    expected = generate(model, tokenizer, "Once upon a time", max_tokens=6,
                        logits_processors=make_logits_processors(1.2))
    assert result.stdout == expected + "\n"

    chat = invoke_cli("chat", "--model", "apple/OpenELM-tiny", "--tokenizer", str(tokenizer_path),
                      "-m", "4", input="hi\n", catch_exceptions=False)
    assert chat.exit_code == 0 and chat.stdout.count("\n") == 1


def test_cli_error_for_an_uncached_repo_is_one_line(hf_cache, invoke_cli):
    result = invoke_cli("chat", "--model", "apple/OpenELM-nope", input="hi\n")
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: apple/OpenELM-nope is not in the Hugging Face cache")
    assert "Traceback" not in result.output


def test_chat_and_generate_without_model_use_the_default(hf_cache, sharded_checkpoint, tokenizer_path, invoke_cli):
    cache_repo(hf_cache, DEFAULT_MODEL, {p.name: p for p in sharded_checkpoint.iterdir()})
    cache_repo(hf_cache, DEFAULT_TOKENIZER_REPO, {"tokenizer.model": tokenizer_path})
    chat = invoke_cli("chat", "-m", "4", input="hi\n", catch_exceptions=False)
    assert chat.exit_code == 0, chat.output
    assert f"Loading {DEFAULT_MODEL} (the default" in chat.stderr and chat.stdout.count("\n") == 1
    result = invoke_cli("generate", "-p", "Once upon a time", "-m", "6", "-q", catch_exceptions=False)
    model, tokenizer = load(sharded_checkpoint, tokenizer=tokenizer_path)
    expected = generate(model, tokenizer, "Once upon a time", max_tokens=6,
                        logits_processors=make_logits_processors(1.2))
    assert result.exit_code == 0 and result.stdout == expected + "\n"


def test_default_model_missing_offline_is_one_line_saying_what_to_do(hf_cache, invoke_cli):
    result = invoke_cli("chat", input="hi\n")
    assert result.exit_code == 1 and "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: {DEFAULT_MODEL} is not in the Hugging Face cache")
    assert f"`hf download {DEFAULT_MODEL}`" in last and "--model" in last
