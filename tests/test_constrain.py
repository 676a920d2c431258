"""Constrained decoding (mlx_openelm.constrain): the matcher's tokenizer, grammar checks, and that a
grammar changes generation exactly where it must and nowhere else (random tiny models: exactness;
the trained model: JSON that parses)."""

from __future__ import annotations

import json
import math
import re

import mlx.core as mx
import numpy as np
import pytest
from synthetic import TOKENIZER_TEXT

from mlx_openelm import load, load_model
from mlx_openelm.constrain import ConstraintError, make_constraint, validate_constraint
from mlx_openelm.constrain.processor import apply_bitmask
from mlx_openelm.constrain.vocabulary import sentencepiece_to_json
from mlx_openelm.errors import GrammarError
from mlx_openelm.generation import generate_step, stream_generate
from mlx_openelm.model import make_cache
from mlx_openelm.batching import Batch
from mlx_openelm.tokenizer import Tokenizer

ALL_TEXT = r"(?s:.*)"
ENUM_SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}, "ok": {"type": "boolean"}},
               "required": ["mood", "ok"], "additionalProperties": False}
STRING_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                  "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                           "maxItems": 3}},
                 "required": ["name", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module", params=["tokenizer.model", "tokenizer.json"])
def tiny(request):
    folder = request.getfixturevalue("hf_checkpoint" if request.param == "tokenizer.model" else "json_checkpoint")
    return load(folder)


def text_only(tokenizer):
    """A processor forbidding what no grammar over text allows: special tokens but EOS, and tokens
    whose bytes are not valid UTF-8 on their own."""
    banned = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.piece_bytes(i)
        try:
            piece.decode()
        except UnicodeDecodeError:
            banned.append(i)
            continue
        if not piece and i != tokenizer.eos_id:
            banned.append(i)
    banned = mx.array(banned)

    def process(history, logits):
        logits[:, banned] = -math.inf
        return logits

    return process


def tokens(model, prompt, processors, max_tokens=24, **kwargs):
    return [s.token for s in generate_step(prompt, model, max_tokens=max_tokens, logits_processors=processors,
                                           **kwargs)]


def test_sentencepiece_model_converts_to_a_tokenizer_json_that_encodes_the_same(tokenizer_path):
    from tokenizers import Tokenizer as Backend

    sp = Tokenizer(tokenizer_path).sp
    converted = Backend.from_str(sentencepiece_to_json(sp))
    texts = TOKENIZER_TEXT + ['{"a": 1}', "  two  spaces", "x\n\ny", "123 wörld 🎉", "apple apples appl", ""]
    for text in texts:
        assert converted.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert converted.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_a_grammar_allowing_all_text_leaves_greedy_decoding_unchanged(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("Once upon a time")
    plain = tokens(model, prompt, [text_only(tokenizer)])
    constrained = tokens(model, prompt, [text_only(tokenizer), make_constraint(tokenizer, regex=ALL_TEXT)])
    assert constrained == plain
    looked_up = tokens(model, prompt, [text_only(tokenizer), make_constraint(tokenizer, regex=ALL_TEXT)],
                       prompt_lookup=3)
    assert looked_up == plain


def test_the_mask_allows_eos_only_where_the_grammar_accepts(tiny):
    model, tokenizer = tiny
    ab = tokenizer.encode("ab", add_bos=False)
    text = b"".join(tokenizer.piece_bytes(t) for t in ab).decode()  # " ab" for SentencePiece
    processor = make_constraint(tokenizer, regex=f"(?:{re.escape(text)}){{1,2}}")
    logits = mx.zeros((1, model.args.vocab_size))
    start = mx.array(tokenizer.encode("x"))

    def allowed(generated):
        out = processor(mx.concatenate([start, mx.array(generated, dtype=start.dtype)]), logits)
        return set(np.flatnonzero(np.isfinite(np.array(out[0]))).tolist())

    assert tokenizer.eos_id not in allowed([])
    assert tokenizer.eos_id in allowed(ab)  # "ab" is complete, "abab" may follow
    assert len(allowed(ab)) > 1
    assert allowed(ab + ab) == {tokenizer.eos_id}  # complete and nothing may follow: only EOS
    assert tokenizer.eos_id not in allowed(ab[:1]) or len(ab) == 1  # rolled back: a prefix again
    with pytest.raises(ConstraintError, match="outside the grammar"):
        allowed(tokenizer.encode("zz", add_bos=False))


def test_padding_columns_past_the_tokenizer_are_never_allowed(tiny):
    model, tokenizer = tiny
    wide = tokenizer.vocab_size + 16
    processor = make_constraint(tokenizer, regex=ALL_TEXT, vocab_size=wide)
    out = np.array(processor(mx.array(tokenizer.encode("x")), mx.zeros((1, wide))))
    assert np.isinf(out[0, tokenizer.vocab_size:]).all() and np.isfinite(out[0, :tokenizer.vocab_size]).any()
    bits = mx.array([[-1]], dtype=mx.int32)  # 32 allowed ids, 40 columns: the 8 past the mask stay -inf
    assert np.isfinite(np.array(apply_bitmask(mx.zeros((1, 40)), bits))).sum() == 32


@pytest.mark.parametrize("schema", [ENUM_SCHEMA, STRING_SCHEMA])
def test_json_schema_output_parses_and_follows_the_schema(tiny, schema):
    model, tokenizer = tiny
    prompt = tokenizer.encode("Give me JSON:")
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=120,
                                     logits_processors=[make_constraint(tokenizer, json_schema=schema)]))
    assert responses[-1].finish_reason == "stop"
    document = json.loads("".join(r.text for r in responses))
    assert set(document) == set(schema["required"])
    if schema is ENUM_SCHEMA:
        assert document["mood"] in ("happy", "sad") and isinstance(document["ok"], bool)
    else:
        assert isinstance(document["name"], str) and len(document["name"]) <= 12
        assert set(document["tags"]) <= {"a", "b"} and len(document["tags"]) <= 3


def test_whitespace_is_bounded_for_a_model_that_wants_spaces(tiny):
    model, tokenizer = tiny
    spaces = [i for i in range(tokenizer.vocab_size) if tokenizer.piece_bytes(i) and
              not tokenizer.piece_bytes(i).strip()]

    def loves_spaces(history, logits):
        logits[:, mx.array(spaces)] += 1000.0
        return logits

    responses = list(stream_generate(model, tokenizer, tokenizer.encode("JSON:"), max_tokens=100,
                                     logits_processors=[loves_spaces, make_constraint(tokenizer,
                                                                                      json_schema=ENUM_SCHEMA)]))
    text = "".join(r.text for r in responses)
    assert responses[-1].finish_reason == "stop"
    assert json.loads(text)["mood"] in ("happy", "sad")
    assert max(len(run) for run in text.replace("\t", " ").split("\n")) < 60  # no run of more than 20 spaces


def test_a_grammar_that_cannot_finish_in_time_ends_with_length(tiny):
    model, tokenizer = tiny
    responses = list(stream_generate(model, tokenizer, tokenizer.encode("x"), max_tokens=5,
                                     logits_processors=[make_constraint(tokenizer, regex="a{40}")]))
    assert responses[-1].finish_reason == "length"
    assert set("".join(r.text for r in responses)) == {"a"}


def test_constrained_speculative_decoding_is_constrained_greedy(tiny, untied_checkpoint):
    model, tokenizer = tiny
    draft = load_model(untied_checkpoint)
    prompt = tokenizer.encode('Say {"name": "apple", "tags": ["a"]} again:')

    def run(**kwargs):
        return tokens(model, prompt, [make_constraint(tokenizer, json_schema=STRING_SCHEMA)], max_tokens=40, **kwargs)

    plain = run()
    assert run(prompt_lookup=4) == plain
    assert run(draft_model=draft, num_draft_tokens=3) == plain


def test_batched_constrained_rows_decode_as_they_would_alone(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.encode("Give me JSON:"), tokenizer.encode("Once upon a time there")]
    alone = [tokens(model, p, [make_constraint(tokenizer, json_schema=STRING_SCHEMA)], max_tokens=30)
             for p in prompts]
    batch = Batch(model)
    rows = [batch.add(p, make_cache(model), lambda lp: mx.argmax(lp, axis=-1),
                      [make_constraint(tokenizer, json_schema=STRING_SCHEMA)], 30) for p in prompts]
    together = [[], []]
    while batch.rows or batch.waiting:
        batch.step()
        for i, row in enumerate(rows):
            if row in batch and row.ready:
                step = next(row)
                together[i].append(step.token)
                if step.last or step.token == tokenizer.eos_id:
                    batch.remove(row)
    assert [t[: len(a)] for t, a in zip(together, alone)] == alone


@pytest.mark.parametrize("options, message", [
    ({"json_schema": {"type": "array", "uniqueItems": True}, "strict": True}, "uniqueItems"),
    ({"regex": "(ab"}, "regex: .*unclosed group"),
    ({"grammar": 'start: a\na: "x" | b\n'}, 'grammar: .*unknown name: "b"'),
])
def test_what_does_not_compile_is_a_grammar_error_naming_it(tiny, options, message):
    with pytest.raises(GrammarError, match=message):
        make_constraint(tiny[1], **options)


def test_unimplemented_keywords_are_ignored_unless_strict(tiny):
    assert make_constraint(tiny[1], json_schema={"type": "array", "uniqueItems": True}) is not None


@pytest.mark.parametrize("options, message", [
    ({"json_schema": {"type": "object"}, "regex": "a"}, "give one constraint, not `json_schema` and `regex`"),
    ({"json_schema": "[1, 2]"}, "json_schema: a JSON schema is an object"),
    ({"json_schema": "{not json"}, "json_schema: not valid JSON"),
    ({"json_schema": "/no/such/schema.json"}, "json_schema: /no/such/schema.json: cannot read"),
    ({"json_schema": {"type": "object", "properties": {"a": {}}}}, None),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"regex": "a" * 300_000}, "more than"),
    ({"json_schema": {"type": "object"}, "strict": "yes"}, "strict must be true or false"),
])
def test_constraint_options_are_checked_once_with_clear_errors(options, message):
    if message is None:
        nested = options["json_schema"]["properties"]["a"]
        for _ in range(100):
            nested["items"] = {}
            nested = nested["items"]
        message = "nested deeper than 64 levels"
    with pytest.raises(GrammarError, match=message):
        validate_constraint(**options)


def test_a_schema_and_a_grammar_can_come_from_files(tmp_path):
    from pathlib import Path

    (tmp_path / "s.json").write_text(json.dumps(ENUM_SCHEMA))
    (tmp_path / "g.lark").write_text('start: "yes" | "no"\n')
    assert json.loads(validate_constraint(json_schema=str(tmp_path / "s.json")).source) == ENUM_SCHEMA
    assert validate_constraint(grammar=Path(tmp_path / "g.lark")).source == 'start: "yes" | "no"\n'
    assert validate_constraint() is None


def test_a_processor_serves_one_generation(tiny):
    model, tokenizer = tiny
    processor = make_constraint(tokenizer, regex=ALL_TEXT)
    processor(mx.array(tokenizer.encode("a long prompt here")), mx.zeros((1, model.args.vocab_size)))
    with pytest.raises(ConstraintError, match="one generation"):
        processor(mx.array(tokenizer.encode("x")), mx.zeros((1, model.args.vocab_size)))


@pytest.fixture(scope="module")
def trained(trained_model_path):
    return load(trained_model_path)


def test_trained_model_under_an_allow_all_grammar_is_its_greedy_self(trained):
    model, tokenizer = trained
    prompt = tokenizer.encode("The capital of France is")
    plain = tokens(model, prompt, [], max_tokens=12)
    assert tokens(model, prompt, [make_constraint(tokenizer, regex=ALL_TEXT, vocab_size=model.args.vocab_size)],
                  max_tokens=12) == plain


def test_trained_model_json_parses_and_prompt_lookup_keeps_it_exact(trained):
    model, tokenizer = trained
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Describe a cat as JSON with name and age."}])

    def run(**kwargs):
        constraint = make_constraint(tokenizer, json_schema=schema, vocab_size=model.args.vocab_size)
        return list(stream_generate(model, tokenizer, prompt, max_tokens=40, logits_processors=[constraint],
                                    **kwargs))

    plain = run()
    assert plain[-1].finish_reason == "stop"
    document = json.loads("".join(r.text for r in plain))
    assert set(document) == {"name", "age"} and isinstance(document["name"], str)
    assert isinstance(document["age"], int)
    assert [r.token for r in run(prompt_lookup=4)] == [r.token for r in plain]


def validity_models():
    """Pydantic models with enums, an array of nested objects and a nullable field (extra keys forbidden)."""
    from typing import Literal, Optional

    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Shirt(Strict):
        name: str
        size: Literal["S", "M", "L"]
        price: float

    class Tag(Strict):
        tag: str

    class Post(Strict):
        title: str
        tags: list[Tag] = Field(max_length=3)

    class Meeting(Strict):
        day: str
        online: bool
        note: Optional[str]

    return [(Shirt, "Describe a T-shirt for sale."), (Post, "Give a blog post a title and tags."),
            (Meeting, "Plan a team meeting.")]


@pytest.mark.parametrize("case, seed", [(0, None), (1, 3), (2, None)])  # greedy and sampled
def test_trained_model_constrained_json_always_validates(trained, case, seed):
    pytest.importorskip("pydantic")
    from mlx_openelm.sampling import make_sampler

    model, tokenizer = trained
    model_cls, task = validity_models()[case]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{task} Reply in JSON."}])
    constraint = make_constraint(tokenizer, json_schema=model_cls.model_json_schema(), vocab_size=model.args.vocab_size)
    sampler = make_sampler(temp=0.0) if seed is None else make_sampler(temp=0.8, seed=seed)
    out = list(stream_generate(model, tokenizer, prompt, max_tokens=120, logits_processors=[constraint],
                               sampler=sampler))
    assert out[-1].finish_reason == "stop"
    model_cls.model_validate_json("".join(r.text for r in out))  # raises ValidationError if it does not validate
