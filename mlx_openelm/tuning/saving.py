"""Writing an adapter folder atomically: each file goes to a temporary file beside it and is renamed
into place when complete, so a full disk or a kill never leaves a half-written adapter."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import mlx.core as mx

from mlx_openelm.folder.names import ADAPTER_CONFIG_FILE, ADAPTERS_FILE
from mlx_openelm.folder.writing import writing

from .adapters import adapter_weights
from .config import AdapterConfig


def _replace_atomically(target: Path, write) -> None:
    """`write(temporary path)` then rename it over `target`; the temporary file goes on any failure."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp" + target.suffix)
    os.close(fd)
    try:
        with writing(target):
            write(tmp)
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_weights(path: Path, weights: Mapping[str, mx.array]) -> None:
    """A safetensors file written atomically."""
    _replace_atomically(Path(path), lambda tmp: mx.save_safetensors(tmp, dict(weights)))


def save_adapter_config(folder: Path, config: AdapterConfig, record: Optional[Mapping[str, Any]] = None) -> None:
    """adapter_config.json: the adapter (`config`) plus `record`, the training settings (as mlx-lm
    writes them beside the adapter's own keys; they are informative and never read back)."""
    entries = {**(record or {}), **config.to_dict()}
    text = json.dumps(entries, indent=2) + "\n"
    _replace_atomically(Path(folder) / ADAPTER_CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_adapters(model, folder: Path, config: AdapterConfig, record: Optional[Mapping[str, Any]] = None,
                  weights_file: str = ADAPTERS_FILE) -> Path:
    """The model's trainable parameters into `folder/weights_file` and the config beside them; returns
    the weights' path. The folder is created if need be."""
    folder = Path(folder)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / weights_file
    save_weights(path, adapter_weights(model))
    save_adapter_config(folder, config, record)
    return path
