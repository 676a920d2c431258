"""`response_format` on `mlx-openelm serve` (the trained model), through the official openai client:
`parse()` with a pydantic model, json_object streamed, truncation, and 400s naming what is wrong."""

from __future__ import annotations

import json
import signal
from typing import Literal

import pytest

openai = pytest.importorskip("openai")

from pydantic import BaseModel  # noqa: E402
from test_server import KEY, start_server  # noqa: E402


class Pet(BaseModel):
    name: str
    species: Literal["cat", "dog", "bird"]
    age: int


ASK = [{"role": "user", "content": "Invent a pet and describe it as JSON with its name, species and age."}]


@pytest.fixture(scope="module")
def client(trained_model_path):
    server = start_server(trained_model_path, "--api-key", KEY, "--max-tokens", "60", "--model-id", "smol")
    yield openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0, "".join(server.log)


def test_parse_returns_the_pydantic_model(client):
    completion = client.chat.completions.parse(model="smol", messages=ASK, response_format=Pet)
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.species in ("cat", "dog", "bird")
    assert completion.choices[0].finish_reason == "stop"


def test_json_object_streams_one_json_object(client):
    stream = client.chat.completions.create(model="smol", messages=ASK, stream=True,
                                            response_format={"type": "json_object"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_reply_cut_by_max_tokens_is_length_not_stop(client):
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="smol", messages=ASK, response_format=Pet, max_tokens=4)


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                             "schema": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}, "json_schema.name must be"),
    ({"type": "yaml"}, "response_format.type must be"),
])
def test_a_bad_response_format_is_a_400_naming_it(client, response_format, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model="smol", messages=ASK, response_format=response_format)
