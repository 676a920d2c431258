"""Writing a model folder: safetensors shards, config.json and the tokenizer files, into the
temporary folder that `install.installing` gives (the converter and `fuse` both write through here).

OS errors (disk full, read-only or vanished folders) become one-line CheckpointErrors
naming the path; MLX reports a failed write as a RuntimeError, which is turned the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import mlx.core as mx

from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError
from ..loading import DTYPE_NAMES
from ..quantization import Quantization
from ..tokenizer import HFTokenizer, Tokenizer
from .names import (CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX, TOKENIZER_FILE, TOKENIZER_JSON,
                    TOKENIZER_JSON_COMPANIONS, shard_name)

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write under `path` into a CheckpointError naming it."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(f"{e.filename or path}: cannot write ({e.strerror or e})") from None
    except RuntimeError as e:  # mlx.core.save_safetensors: "[write] Unable to write ..."
        raise CheckpointError(f"{path}: cannot write ({e}); is the disk full?") from None


def parse_size(value: Union[str, int, float]) -> int:
    """'5GB', '500MB', '64KB', '123' (bytes) -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = int(value)
    else:
        text = str(value).strip().upper().replace("IB", "B")
        units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1}
        for unit, factor in units.items():
            if text.endswith(unit):
                try:
                    size = int(float(text[: -len(unit)]) * factor)
                except (ValueError, OverflowError):
                    raise ConfigError(f"max_shard_size: cannot read {value!r} (e.g. 5GB, 500MB)") from None
                break
        else:
            try:
                size = int(text)
            except (ValueError, OverflowError):
                raise ConfigError(f"max_shard_size: cannot read {value!r} (e.g. 5GB, 500MB)") from None
    if size <= 0:
        raise ConfigError(f"max_shard_size: must be positive, got {value!r}")
    return size


class ShardWriter:
    """Collects converted tensors and writes a safetensors shard whenever the next would overflow."""

    def __init__(self, folder: Path, max_bytes: int, metadata: dict):
        self.folder, self.max_bytes, self.metadata = folder, max_bytes, metadata
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, group: dict[str, mx.array]) -> None:
        size = sum(a.nbytes for a in group.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(group)
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.files) + 1:05d}.safetensors"
        with writing(path):
            mx.save_safetensors(str(path), self.pending, metadata=self.metadata)
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Give the shards their final names; write the index when there are several."""
        self.flush()
        with writing(self.folder):
            return self._name_shards()

    def _name_shards(self) -> list[Path]:
        if len(self.files) == 1:
            final = self.folder / SAFETENSORS_FILE
            os.replace(self.files[0][0], final)
            return [final]
        n = len(self.files)
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self.files):
            final = self.folder / shard_name(i + 1, n)
            os.replace(path, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        return finals


def model_config(args: ModelArgs, dtype: mx.Dtype, quantization: Optional[Quantization],
                 architectures: Optional[list] = None) -> dict:
    """The output's config.json: the architecture, its float dtype and its quantization entry (and the
    source's ``architectures``, which tell Apple's OpenELM from another model in OpenELM form)."""
    config = args.to_dict()
    if architectures:
        config["architectures"] = list(architectures)
    config["torch_dtype"] = DTYPE_NAMES[dtype]
    if quantization is not None:
        config["quantization"] = quantization.to_config()
    return config


def write_config(folder: Path, config: dict) -> None:
    """config.json last of all: a folder without one is never taken for a model."""
    path = folder / CONFIG_FILE
    with writing(path):
        path.write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer(folder: Path, tokenizer: Tokenizer) -> None:
    """The tokenizer's file under its standard name (tokenizer.model or tokenizer.json); a
    tokenizer.json brings the tokenizer_config.json and special_tokens_map.json beside it."""
    is_json = isinstance(tokenizer, HFTokenizer)
    copies = [(tokenizer.path, TOKENIZER_JSON if is_json else TOKENIZER_FILE)]
    if is_json:
        copies += [(tokenizer.path.parent / name, name) for name in TOKENIZER_JSON_COMPANIONS
                   if (tokenizer.path.parent / name).is_file()]
    for source, name in copies:
        copy_file(source, folder / name)


def copy_file(source: Path, target: Path) -> None:
    """`source`'s bytes to `target`; a failed write is a CheckpointError naming it."""
    with writing(target):
        shutil.copyfile(source, target)
