"""Resolve `--model` / `--tokenizer` references to local paths."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from .errors import CheckpointError


def resolve_model_path(reference: Union[str, Path]) -> Path:
    """A local model folder for `reference` (a path today; Hugging Face repo ids to come)."""
    path = Path(reference).expanduser()
    if path.exists():
        return path
    raise CheckpointError(f"{reference}: model folder not found")
