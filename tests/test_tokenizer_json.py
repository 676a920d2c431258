"""A Hugging Face tokenizer.json (byte-level BPE, as SmolLM2's): encode, decode and streaming
against `transformers` loading the same file; BOS/EOS; bad files; loading model folders."""

from __future__ import annotations

import json
import random
import shutil
import warnings

import pytest

from mlx_openelm import load
from mlx_openelm.errors import CheckpointError, OpenELMWarning, TokenizerError
from mlx_openelm.hub import resolve_tokenizer
from mlx_openelm.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

from synthetic import TEXT_SAMPLES, TOKENIZER_TEXT, cache_repo, train_byte_level_tokenizer

SAMPLES = [*TEXT_SAMPLES, ""]  # the same texts as the SentencePiece tests, and nothing
BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json_path):
    return Tokenizer(tokenizer_json_path, bos_id=BOS, eos_id=EOS)


@pytest.fixture(scope="module")
def hf(tokenizer_json_path):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json_path),
                                                bos_token="<|im_start|>", eos_token="<|im_end|>")


def stream(tokenizer, ids):
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.add_token(i) for i in ids]
    pieces.append(detokenizer.finalize())
    return pieces


def random_ids(tokenizer, rng, past=0):
    return [rng.randrange(tokenizer.vocab_size + past) for _ in range(rng.randint(1, 12))]


def test_tokenizer_path_picks_the_tokenizers_backend(tokenizer, tokenizer_path):
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.byte_level
    assert isinstance(Tokenizer(tokenizer_path), SentencePieceTokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (384, BOS, EOS)
    assert (tokenizer.piece(BOS), tokenizer.piece(EOS)) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_and_decode_equal_transformers(tokenizer, hf, text):
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.encode(text, add_bos=False) == ids
    assert tokenizer.encode(text, add_bos=True) == [BOS] + ids
    # no post-processor and no add_bos_token (SmolLM2's tokenizer.json): no BOS, as transformers
    assert not tokenizer.add_bos and tokenizer.encode(text) == ids == hf(text)["input_ids"]
    assert tokenizer.decode([BOS] + ids + [EOS]) == hf.decode([BOS] + ids + [EOS], skip_special_tokens=True) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_equals_decoding_at_once(tokenizer, text):
    ids = tokenizer.encode(text)
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == text


def test_a_character_split_across_tokens_waits_for_its_last_byte(tokenizer):
    ids = tokenizer.encode("🚀", add_bos=False)
    assert len(ids) >= 2, "the rocket is not one token of the tiny vocabulary, so its bytes are split"
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == "🚀" and pieces[0] == "" and all("\ufffd" not in p for p in pieces)


def test_random_token_sequences_stream_as_transformers_decodes(tokenizer, hf):
    """Thousands of sequences: split and invalid UTF-8, special tokens mid-stream, ids past the tokenizer."""
    rng = random.Random(0)
    size = tokenizer.vocab_size
    for _ in range(3000):
        ids = random_ids(tokenizer, rng, past=3)
        text = "".join(stream(tokenizer, ids))
        assert text == tokenizer.decode(ids) == hf.decode([i for i in ids if i < size], skip_special_tokens=True), ids


def test_added_tokens_stream_as_the_library_decodes(tokenizer_json_path, tmp_path):
    """An added token whose text is in the byte alphabet ('é' stands for byte 0xE9) and one outside it."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(tokenizer_json_path))
    backend.add_tokens([AddedToken("héllo", normalized=False), AddedToken("日本", normalized=False)])
    backend.add_special_tokens(["<|extra|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path / "tokenizer.json", bos_id=BOS, eos_id=EOS)
    assert tok.vocab_size == 387
    rng = random.Random(1)
    for _ in range(2000):
        ids = [rng.choice([384, 385, 386, rng.randrange(387)]) for _ in range(rng.randint(1, 8))]
        assert "".join(stream(tok, ids)) == tok.decode(ids) == backend.decode(ids, skip_special_tokens=True), ids


def test_special_token_text_in_a_prompt_stays_text(tokenizer, hf):
    text = "hi <|im_end|> and <|im_start|>"
    ids = tokenizer.encode(text, add_bos=False)
    assert BOS not in ids and EOS not in ids and tokenizer.decode(ids) == text
    assert ids == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_bos_is_never_doubled_by_a_post_processor(tokenizer_json_path, tmp_path):
    """A tokenizer.json whose post-processor adds BOS itself still gets exactly one."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.processors import TemplateProcessing

    backend = Backend.from_file(str(tokenizer_json_path))
    backend.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", BOS)])
    backend.save(str(tmp_path / "tokenizer.json"))
    assert backend.encode("Once upon").ids[:1] == [BOS]  # the file itself adds one
    tok = Tokenizer(tmp_path / "tokenizer.json", bos_id=BOS, eos_id=EOS)
    ids = tok.encode("Once upon")
    assert ids == [BOS] + backend.encode("Once upon", add_special_tokens=False).ids and ids.count(BOS) == 1


def test_other_decoders_stream_exactly_by_re_decoding(tokenizer_path, tmp_path):
    """A Llama-2 style tokenizer.json (Metaspace, byte fallback, strip), converted by transformers."""
    transformers = pytest.importorskip("transformers")
    from mlx_openelm.hf_files import write_tokenizer_files

    source = tmp_path / "sentencepiece"
    source.mkdir()
    shutil.copyfile(tokenizer_path, source / "tokenizer.model")
    write_tokenizer_files(source)
    transformers.AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(tmp_path / "json"))
    assert not (tmp_path / "json" / "tokenizer.model").exists()
    tok = Tokenizer(tmp_path / "json" / "tokenizer.json")  # BOS/EOS from the tokenizer_config.json beside it
    assert not tok.byte_level and (tok.bos_id, tok.eos_id) == (1, 2)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids.count(1) == 1 and "".join(stream(tok, ids)) == tok.decode(ids)  # the Strip rule can drop a space
    rng = random.Random(2)
    for _ in range(1000):
        ids = random_ids(tok, rng, past=2)
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids
    spaces = [i for i in range(tok.vocab_size) if tok.piece(i).startswith("\u2581")]
    for _ in range(200):  # longer, with many word starts: the window moves along
        ids = [rng.choice(spaces) if rng.random() < 0.5 else rng.randrange(tok.vocab_size) for _ in range(60)]
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids


def test_chat_template_equals_transformers_rendering_the_same_template(tokenizer, hf):
    from mlx_openelm.hf_files import CHAT_TEMPLATE

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 🎉 what is MLX?"},
                {"role": "assistant", "content": " It runs models."}, {"role": "user", "content": "More"}]
    hf.chat_template = CHAT_TEMPLATE
    for generation_prompt in (True, False):
        out = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt) == ids
    assert ids[0] == BOS and ids.count(EOS) == 4


# ---- BOS / EOS ----------------------------------------------------------------------------

def test_special_ids_come_from_the_files_beside_it_unless_given(tokenizer_json_path, tmp_path):
    shutil.copyfile(tokenizer_json_path, tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match=r"tokenizer.json: a tokenizer.json does not say which tokens are BOS "
                                             r"and EOS.*pass bos_id and eos_id"):
        Tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>"}))
    assert (Tokenizer(tmp_path / "tokenizer.json").bos_id, Tokenizer(tmp_path / "tokenizer.json").eos_id) == (0, 2)
    with pytest.warns(OpenELMWarning, match=r"special_tokens_map.json: its bos_token is '<\|endoftext\|>' \(id 0\) "
                                             r"but the model's is id 1 \('<\|im_start\|>'\); using the model's"):
        given = Tokenizer(tmp_path / "tokenizer.json", bos_id=1, eos_id=2)
    assert (given.bos_id, given.eos_id) == (1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Tokenizer(tmp_path / "tokenizer.json", bos_id=0, eos_id=2).bos_id == 0  # agreeing: no warning
    with pytest.raises(TokenizerError, match=r"tokenizer.json: the EOS id 384 is not in the tokenizer's 384 tokens"):
        Tokenizer(tmp_path / "tokenizer.json", bos_id=1, eos_id=384)


# ---- bad files ----------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"not json at all", r"not a tokenizer.json \(not valid JSON: Expecting value"),
    (b'{"version": "1.0", "vocab": [1, 2]}', r"not a tokenizer.json \(JSON without the 'model' object"),
    (b'{"model": {"type": "Nonsense"}}', r"not a tokenizer.json the tokenizers library can read"),
    (b"\xff\xfe{", r"not a tokenizer.json \(not UTF-8 text\)"),
    (b"[" * 100000, r"not a tokenizer.json \(not valid JSON"),
])
def test_a_bad_tokenizer_json_is_one_line_naming_the_file(tmp_path, content, message):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(content)
    with pytest.raises(TokenizerError, match=message) as info:
        Tokenizer(bad, bos_id=1, eos_id=2)
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)


def test_a_bad_tokenizer_json_on_the_command_line_is_an_error_line(hf_checkpoint, tmp_path, invoke_cli):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "Nonsense"}}')
    result = invoke_cli("generate", "--model", hf_checkpoint, "--tokenizer", bad, "-p", "hi", "-m", "2")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: {bad}: not a tokenizer.json")


# ---- model folders and references ----------------------------------------------------------

def test_a_folder_with_tokenizer_json_loads_it_with_the_configs_ids(json_checkpoint):
    assert not (json_checkpoint / "tokenizer.model").exists()
    model, tok = load(json_checkpoint, dtype="float32")
    assert isinstance(tok, HFTokenizer) and tok.path == json_checkpoint / "tokenizer.json"
    assert (tok.bos_id, tok.eos_id) == (model.args.bos_token_id, model.args.eos_token_id) == (BOS, EOS)


def test_bos_and_eos_follow_the_model_config(json_checkpoint, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(json_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "bos_token_id": 2, "eos_token_id": 0}))
    _model, tok = load(folder)
    assert (tok.bos_id, tok.eos_id) == (2, 0) and tok.encode("hi", add_bos=True)[0] == 2
    del config["bos_token_id"], config["eos_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    _model, tok = load(folder)
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # Apple's defaults, as ModelArgs has them


def test_a_folder_with_both_files_uses_tokenizer_model(hf_checkpoint, tokenizer_json_path, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(hf_checkpoint, folder)
    shutil.copyfile(tokenizer_json_path, folder / "tokenizer.json")
    assert resolve_tokenizer(folder) == folder / "tokenizer.model"
    assert resolve_tokenizer(None, folder) == folder / "tokenizer.model"


def test_tokenizer_option_takes_a_json_file_its_folder_or_a_repo_id(sharded_checkpoint, tokenizer_json_path,
                                                                    tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = cache_repo(cache, "someone/byte-tok", {"tokenizer.json": tokenizer_json_path})
    for reference, path in [(tokenizer_json_path, tokenizer_json_path),
                            (tokenizer_json_path.parent, tokenizer_json_path),
                            ("someone/byte-tok", snapshot / "tokenizer.json")]:
        assert resolve_tokenizer(sharded_checkpoint, reference) == path
        _model, tok = load(sharded_checkpoint, tokenizer=reference)
        assert isinstance(tok, HFTokenizer) and tok.encode("Once", add_bos=True) == [BOS] + tok.encode("Once")


def test_vocabulary_size_checks_work_for_tokenizer_json(sharded_checkpoint, tokenizer_json_path, tmp_path):
    small = train_byte_level_tokenizer(tmp_path / "small.json", vocab_size=320)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(sharded_checkpoint, tokenizer=small)
    assert any(issubclass(w.category, OpenELMWarning) and "320 pieces, fewer than the model's vocab_size 384"
               in str(w.message) for w in caught)
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(tokenizer_json_path))
    backend.add_tokens([f"<extra{i}>" for i in range(8)])
    backend.save(str(tmp_path / "large.json"))
    with pytest.raises(CheckpointError, match=r"large.json: tokenizer has 392 pieces but the model's vocab_size is 384"):
        load(sharded_checkpoint, tokenizer=tmp_path / "large.json")


def test_eval_texts_and_prompts_with_tokenizer_json(json_checkpoint):
    from mlx_openelm.evaluate import evaluate_text

    model, tok = load(json_checkpoint, dtype="float32")
    text = " ".join(TOKENIZER_TEXT)
    result = evaluate_text(model, tok, text, context=32, stride=16)
    assert result.tokens == len(tok.encode(text)) - 1 and result.bytes == len(text.encode())


def test_a_model_repo_with_tokenizer_json_generates_offline(json_checkpoint, tmp_path, monkeypatch, invoke_cli):
    """A repo id (as mlx-community's) whose snapshot holds a tokenizer.json and no tokenizer.model."""
    from mlx_openelm import generate, make_logits_processors

    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cache_repo(cache, "someone/OpenELM-tiny-json", {p.name: p for p in json_checkpoint.iterdir()})
    result = invoke_cli("generate", "--model", "someone/OpenELM-tiny-json", "-p", "Héllo 🎉", "-m", "8", "-q",
                        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    model, tok = load(json_checkpoint)
    assert result.stdout == generate(model, tok, "Héllo 🎉", max_tokens=8,
                                     logits_processors=make_logits_processors(1.2)) + "\n"


# ---- the trained test model's tokenizer.json (SmolLM2's byte-level BPE, 49152 tokens) ------

def test_the_trained_models_tokenizer_matches_transformers_on_real_text(trained_model_path):
    transformers = pytest.importorskip("transformers")
    from mlx_openelm.loading import special_token_ids

    from trained import real_text

    path = resolve_tokenizer(trained_model_path)
    config = json.loads((trained_model_path / "config.json").read_text())
    tok = Tokenizer(path, **special_token_ids(config))  # as `load` opens it
    assert path.name == "tokenizer.json" and tok.byte_level and tok.vocab_size == 49152
    assert (tok.piece(tok.bos_id), tok.piece(tok.eos_id)) == ("<|im_start|>", "<|im_end|>")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    text = real_text()[:20000]
    ids = tok.encode(text)  # no BOS: the folder's tokenizer_config.json says add_bos_token false, as SmolLM2's
    assert ids == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == text
    rng = random.Random(3)
    for _ in range(1000):
        ids = random_ids(tok, rng)
        assert "".join(stream(tok, ids)) == tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), ids


def test_generate_on_the_trained_model_answers_in_english(trained_model_path, invoke_cli):
    """The command line end to end on real weights and their tokenizer.json (2 greedy tokens)."""
    result = invoke_cli("generate", "--model", trained_model_path, "-p", "The capital of France is", "-m", "2",
                        "--repetition-penalty", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["text"].startswith(" Paris") and data["prompt_tokens"] == 5  # 5 words; SmolLM2's tokenizer adds no BOS
