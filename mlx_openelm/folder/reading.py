"""Reading a model folder's optional JSON files (tokenizer_config.json, generation_config.json):
absent is empty, and a file that is not a JSON object is a one-line error naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Type

from ..errors import one_line


def read_json_object(path: Path, error: Type[Exception]) -> dict:
    """`path`'s JSON object, {} when there is no such file; unreadable, not JSON, or not an object:
    `error` naming the file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise error(f"{path}: not a readable {path.name} ({one_line(e, 120)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: a {path.name} holds a JSON object, got {type(data).__name__}")
    return data
