"""Valid JSON under a schema, constrained vs unconstrained, on the trained test model (SmolLM2-135M-Instruct
as OpenELM, float32).

20 prompts over 5 pydantic models (flat object, enums, arrays, nested objects, optional fields). Each
prompt asks, as a user would, for JSON matching the schema, which it quotes. Each is generated greedy
and sampled (temperature 0.7, top-p 0.95, seed = the prompt's index), without a constraint and under
`make_constraint(json_schema=...)`; no repetition penalty in either. A reply counts as valid
when the whole reply (surrounding whitespace and a Markdown code fence stripped) parses and
validates against the schema (pydantic's `model_validate_json`). tok/s is generated tokens over the
generation's wall time (prompt included).

    python scripts/measure_json_validity.py [--max-tokens 128]

Prefix `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0` for OpenBLAS; say which.
"""

from __future__ import annotations

import argparse
import json
import time
from enum import Enum
from typing import Literal, Optional

from pydantic import BaseModel, ValidationError
from support import trained

from mlx_openelm import load
from mlx_openelm.constrain import make_constraint
from mlx_openelm.generation import stream_generate
from mlx_openelm.sampling import make_sampler


class Person(BaseModel):
    name: str
    age: int
    email: str


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Product(BaseModel):
    name: str
    color: Color
    size: Literal["S", "M", "L"]
    price: float


class Recipe(BaseModel):
    title: str
    ingredients: list[str]
    steps: list[str]


class Address(BaseModel):
    city: str
    country: str


class Company(BaseModel):
    name: str
    founded: int
    address: Address
    employees: list[Person]


class Event(BaseModel):
    title: str
    day: str
    online: bool
    note: Optional[str]


PROMPTS = [
    (Person, "Invent a person who works as a baker."), (Person, "Describe the author of a mystery novel."),
    (Person, "Give me a contact card for a made-up teacher."), (Person, "Create a customer record for Ana, 34."),
    (Product, "Describe a T-shirt for sale."), (Product, "Make up a product listing for a mug."),
    (Product, "List one item from a clothing store."), (Product, "Describe a blue hat in size M."),
    (Recipe, "Give me a simple pancake recipe."), (Recipe, "How do I make a cup of tea?"),
    (Recipe, "A recipe for a tomato salad."), (Recipe, "Write a recipe for scrambled eggs."),
    (Company, "Invent a small software company with two employees."),
    (Company, "Describe a bakery business in Paris."), (Company, "Make up a startup founded in 2015."),
    (Company, "Describe a bookshop company and its staff."),
    (Event, "Plan a team meeting next Monday."), (Event, "Create an online yoga class event."),
    (Event, "Describe a birthday party on Saturday."), (Event, "Schedule a webinar about Python."),
]


def ask(model_cls, task: str) -> list[dict]:
    schema = json.dumps(model_cls.model_json_schema())
    return [{"role": "user", "content": f"{task} Respond only with JSON matching this schema: {schema}"}]


def valid(model_cls, text: str) -> bool:
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[-1].rsplit("```", 1)[0]
    try:
        model_cls.model_validate_json(text)
        return True
    except ValidationError:
        return False


def run(model, tokenizer, args, constrained: bool, sampled: bool) -> tuple[int, float]:
    good, tokens, seconds = 0, 0, 0.0
    for i, (model_cls, task) in enumerate(PROMPTS[:args.prompts]):
        prompt = tokenizer.apply_chat_template(ask(model_cls, task))
        processors = [make_constraint(tokenizer, json_schema=model_cls.model_json_schema(),
                                      vocab_size=model.args.vocab_size)] if constrained else []
        sampler = make_sampler(temp=0.7, top_p=0.95, seed=i) if sampled else make_sampler(temp=0.0)
        start, text, n = time.perf_counter(), "", 0
        for response in stream_generate(model, tokenizer, prompt, args.max_tokens, sampler=sampler,
                                        logits_processors=processors):
            text, n = text + response.text, n + 1
        seconds += time.perf_counter() - start
        tokens += n
        good += valid(model_cls, text)
    return good, tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="the first N prompts only")
    parser.add_argument("--greedy-only", action="store_true", help="skip the sampled rows")
    args = parser.parse_args()
    count = min(args.prompts, len(PROMPTS))
    model, tokenizer = load(trained.trained_model_path())
    print("| decoding | unconstrained: valid | constrained: valid | unconstrained tok/s | constrained tok/s |")
    print("|---|---|---|---|---|")
    for sampled in (False,) if args.greedy_only else (False, True):
        free, free_speed = run(model, tokenizer, args, False, sampled)
        held, held_speed = run(model, tokenizer, args, True, sampled)
        label = "sampled (T 0.7, top-p 0.95)" if sampled else "greedy"
        print(f"| {label} | {free}/{count} | {held}/{count} | {free_speed:.1f} | {held_speed:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
