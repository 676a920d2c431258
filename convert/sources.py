"""Reading conversion inputs: Hugging Face / MLX folders, CoreNet `.pt` files, and averages.

Each `Source` gives its architecture (`args`) and its tensors by our (Hugging Face) names,
read lazily one at a time, in float32 (float64 numpy for averages), checked against
`Model(args)` when opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from mlx_openelm.config import CORENET_VOCAB_SIZE, ModelArgs, preset_args, read_config
from mlx_openelm.errors import CheckpointError, ConfigError
from mlx_openelm.folder.names import CONFIG_FILE
from mlx_openelm.hub import find_tokenizer, resolve_model_path
from mlx_openelm.loading import IGNORED_KEYS, check_weights, read_weights
from mlx_openelm.generation_config import OPENELM_ARCHITECTURE
from mlx_openelm.model import Model
from mlx_openelm.quantization import apply_quantization, read_quantization

from .corenet import expected_shapes, read_corenet


class Source:
    """One input checkpoint: its architecture and its tensors (our names), read lazily."""

    path: Path
    args: ModelArgs
    kind: str
    tokenizer: Optional[Path] = None
    architectures: Optional[list] = None  # config.json's, kept in the output (it says whether this is an OpenELM)

    def names(self) -> list[str]:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def get(self, name: str) -> Union[np.ndarray, mx.array]:
        """The tensor in float32 (float64 numpy for averages); read once, then forgotten."""
        raise NotImplementedError


class HFSource(Source):
    """A Hugging Face OpenELM folder (config.json plus safetensors), or a folder this
    converter quantized, whose weights are dequantized as they are read."""

    def __init__(self, folder: Path):
        self.path = folder
        config_path = folder / CONFIG_FILE
        config = read_config(config_path)
        self.args = ModelArgs.from_dict(config, source=str(config_path))
        # A quantized MLX folder (--dequantize): its tensors are dequantized as they are read.
        self.quantization = read_quantization(config, str(config_path))
        self.kind = "mlx-quantized" if self.quantization else "huggingface"
        self._arrays = {n: a for n, a in read_weights(folder).items() if n not in IGNORED_KEYS}  # lazy
        model = Model(self.args)  # a lazy skeleton: never evaluated
        if self.quantization is not None:
            apply_quantization(model, self.quantization, str(config_path), self._arrays)
        problems = check_weights(model, self._arrays)
        if problems:
            raise CheckpointError(f"{folder}: {problems[0].describe(str(config_path))}")
        # weight name -> (bits, group size) of each quantized layer
        self._quantized = {f"{path}.weight": (m.bits, m.group_size)
                           for path, m in model.named_modules() if hasattr(m, "scales")}
        self._shapes = expected_shapes(self.args)  # the float model's, in model order
        self._order = list(self._shapes)
        self.tokenizer = find_tokenizer(folder)
        names = config.get("architectures")
        self.architectures = names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None

    def names(self) -> list[str]:
        return list(self._order)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def get(self, name: str) -> mx.array:
        array = self._arrays.pop(name)  # evaluated data must not stay referenced here
        try:
            if name in self._quantized:
                module, (bits, group) = name[: -len(".weight")], self._quantized[name]
                scales = self._arrays.pop(f"{module}.scales").astype(mx.float32)  # dequantize in float32
                biases = self._arrays.pop(f"{module}.biases").astype(mx.float32)
                array = mx.dequantize(array, scales, biases, group_size=group, bits=bits)
            array = array.astype(mx.float32)
            mx.eval(array)
            return array
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({e})") from None


class CoreNetSource(Source):
    """A CoreNet `.pt` checkpoint. Its architecture is a named preset (with CoreNet's
    vocabulary of 32128) or a config.json (for other CoreNet OpenELM configurations)."""

    kind = "corenet"

    def __init__(self, path: Path, preset: Optional[str] = None, config: Union[str, Path, None] = None):
        self.path = path
        if config is not None:
            config_path = Path(config).expanduser()
            self.args = ModelArgs.from_dict(read_config(config_path), source=str(config_path))
            what = f"{config_path}"
        else:
            self.args = preset_args(preset, vocab_size=CORENET_VOCAB_SIZE)
            what = f"preset {preset} (vocab {CORENET_VOCAB_SIZE})"
        self._tensors = read_corenet(path, self.args, what)
        self.tokenizer = None
        self.architectures = [OPENELM_ARCHITECTURE]  # CoreNet's checkpoints are Apple's OpenELM

    def names(self) -> list[str]:
        return list(self._tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: t.shape for n, t in self._tensors.items()}

    def get(self, name: str) -> np.ndarray:
        array = self._tensors[name].load()
        return array if array.dtype in (np.float32, np.float64) else array.astype(np.float32)


class AveragedSource(Source):
    """The element-wise mean of several checkpoints of one architecture, in float64."""

    kind = "average"

    def __init__(self, sources: Sequence[Source]):
        first = sources[0]
        for other in sources[1:]:
            if other.args != first.args:
                raise ConfigError(f"average: {other.path} has a different architecture from {first.path}")
        self.sources = list(sources)
        self.path = first.path
        self.args = first.args
        self.tokenizer = first.tokenizer
        self.architectures = first.architectures

    def names(self) -> list[str]:
        return self.sources[0].names()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.sources[0].shapes()

    def get(self, name: str) -> np.ndarray:
        total = np.array(self.sources[0].get(name), dtype=np.float64)
        for source in self.sources[1:]:
            total += np.asarray(source.get(name), dtype=np.float64)
        return total / len(self.sources)


def leaves(source: Source) -> list[Source]:
    return list(source.sources) if isinstance(source, AveragedSource) else [source]


def open_source(reference: Union[str, Path], preset: Optional[str] = None,
                config: Union[str, Path, None] = None) -> Source:
    """A folder is a Hugging Face checkpoint; a file is a CoreNet `.pt` (needs `preset` or `config`)."""
    path = resolve_model_path(reference)
    if path.is_dir():
        if preset is not None or config is not None:
            option = "preset" if preset is not None else "config"
            raise ConfigError(
                f"{option}: {path} is a Hugging Face folder whose config.json gives the architecture; "
                f"`{option}` is only for CoreNet .pt checkpoints"
            )
        return HFSource(path)
    if preset is not None and config is not None:
        raise ConfigError("give either `preset` or `config` for a CoreNet checkpoint, not both")
    if preset is None and config is None:
        raise ConfigError(f"{path}: a CoreNet .pt checkpoint needs `preset` (270M, 450M, 1_1B or 3B) or `config`")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    return CoreNetSource(path, preset=preset, config=config)
