"""Read CoreNet (PyTorch) OpenELM checkpoints without importing torch.

A `.pt` file written by ``torch.save`` (PyTorch >= 1.6) is a zip archive:

    <prefix>/data.pkl      the pickled object (a state_dict, or a dict holding one)
    <prefix>/data/<key>    the raw little-endian bytes of each storage
    <prefix>/version       the format version

Tensors inside ``data.pkl`` are ``torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)`` calls whose storages are persistent ids
``('storage', torch.FloatStorage, key, location, numel)``. `read_corenet` unpickles
with a restricted unpickler that knows exactly those globals (plus
``collections.OrderedDict``) and refuses every other one, so a checkpoint cannot run
code. Tensors are rebuilt lazily with numpy: a storage is read from the zip only
when its tensor is asked for, so a conversion holds one tensor at a time.

CoreNet's ``GeneralGPTModel`` (corenet/modeling/models/language_modeling/general_gpt.py)
names its parameters without the ``transformer.`` prefix Hugging Face's port adds,
and calls the untied output head ``classifier``; `corenet_names` spells the mapping
out for every tensor of a given architecture.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import CheckpointError

# torch storage class name -> (numpy dtype of the stored elements, dtype name)
# bfloat16 has no numpy dtype: its bits are read as uint16 and widened to float32.
STORAGE_DTYPES = {
    "FloatStorage": (np.dtype("<f4"), "float32"),
    "DoubleStorage": (np.dtype("<f8"), "float64"),
    "HalfStorage": (np.dtype("<f2"), "float16"),
    "BFloat16Storage": (np.dtype("<u2"), "bfloat16"),
    "LongStorage": (np.dtype("<i8"), "int64"),
    "IntStorage": (np.dtype("<i4"), "int32"),
    "ShortStorage": (np.dtype("<i2"), "int16"),
    "CharStorage": (np.dtype("i1"), "int8"),
    "ByteStorage": (np.dtype("u1"), "uint8"),
    "BoolStorage": (np.dtype("?"), "bool"),
}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    key: str
    storage_type: _StorageType
    numel: int


class LazyTensor:
    """A tensor of a `.pt` archive; `load()` reads its bytes and returns a numpy array."""

    def __init__(self, archive: "CoreNetArchive", storage: _Storage, offset: int, shape, stride):
        self._archive = archive
        self.storage = storage
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.stride = tuple(int(s) for s in stride)
        self.dtype = STORAGE_DTYPES[storage.storage_type.name][1]

    def load(self) -> np.ndarray:
        """The tensor as a contiguous numpy array (bfloat16 widened to float32)."""
        np_dtype, name = STORAGE_DTYPES[self.storage.storage_type.name]
        if self.offset < 0 or any(s < 0 for s in self.stride) or self.elements_needed() > self.storage.numel:
            raise CheckpointError(
                f"{self._archive.path}: a tensor of shape {self.shape} does not fit its storage '{self.storage.key}'"
            )
        raw = self._archive.read_storage(self.storage, np_dtype.itemsize)
        flat = np.frombuffer(raw, dtype=np_dtype)
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:],
            shape=self.shape,
            strides=tuple(s * flat.itemsize for s in self.stride),
            writeable=False,
        )
        array = np.ascontiguousarray(view)
        if name == "bfloat16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def elements_needed(self) -> int:
        """How many storage elements the tensor's view reaches (offset + highest index + 1)."""
        if not all(self.shape):
            return 0
        return self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return ("tensor", storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Knows the globals a state_dict pickle uses; refuses everything else."""

    def __init__(self, file, archive: "CoreNetArchive"):
        super().__init__(file)
        self._archive = archive

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._make_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch._utils" and name == "_rebuild_parameter_with_state":
            return _rebuild_parameter_with_state
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"{self._archive.path}: refusing to load global '{module}.{name}' from the pickle "
            "(only tensors, storages and OrderedDict are allowed in a checkpoint)"
        )

    def _make_tensor(self, storage, storage_offset, size, stride, *rest):
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"{self._archive.path}: malformed tensor record in data.pkl")
        return LazyTensor(self._archive, storage, storage_offset, size, stride)

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._archive.path}: unsupported persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._archive.path}: unsupported storage type {storage_type!r}")
        return _Storage(str(key), storage_type, int(numel))


class CoreNetArchive:
    """An open `.pt` zip archive; `state_dict()` lists its tensors lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: checkpoint file not found")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise CheckpointError(
                f"{self.path}: not a zip-format PyTorch checkpoint (files from torch.save before "
                "PyTorch 1.6 are not supported)"
            ) from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        pickles = [n for n in self._zip.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{self.path}: expected one '<name>/data.pkl' in the archive, found {len(pickles)}")
        self._prefix = pickles[0][: -len("data.pkl")]
        self._needed: dict[str, int] = {}  # storage key -> elements its tensors reach
        byteorder = self._prefix + "byteorder"
        try:
            order = self._zip.read(byteorder).strip() if byteorder in self._zip.namelist() else b"little"
        except (zipfile.BadZipFile, zlib.error, OSError) as e:
            raise CheckpointError(f"{self.path}: '{byteorder}' is corrupt ({e})") from None
        if order != b"little":
            raise CheckpointError(f"{self.path}: big-endian checkpoints are not supported")

    def read_storage(self, storage: "_Storage", itemsize: int) -> bytes:
        """A storage's bytes, read no further than its size in the pickle, which must be what
        its tensors need: a larger, mis-sized or corrupt entry (a zip bomb, a bad CRC) is refused."""
        size = storage.numel * itemsize
        needed = self._needed.get(storage.key, storage.numel) * itemsize
        where = f"{self.path}: storage '{storage.key}'"
        try:
            info = self._zip.getinfo(f"{self._prefix}data/{storage.key}")
        except KeyError:
            raise CheckpointError(f"{where} is missing from the archive") from None
        if size > needed:
            raise CheckpointError(f"{where} holds {storage.numel} elements, its tensors need {needed // itemsize}")
        if info.file_size != size:
            raise CheckpointError(f"{where} is {info.file_size} bytes, the pickle says {size}")
        try:
            with self._zip.open(info) as f:
                data = f.read(size)
                f.read(1)  # reaching the end checks the CRC
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
            raise CheckpointError(f"{where} is corrupt ({e})") from None
        if len(data) != size:
            raise CheckpointError(f"{where} is truncated ({len(data)} of {size} bytes)")
        return data

    def load_pickle(self) -> Any:
        with self._zip.open(self._prefix + "data.pkl") as f:
            try:
                return _RestrictedUnpickler(f, self).load()
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{self.path}: cannot unpickle data.pkl ({e})") from None

    def state_dict(self) -> dict[str, LazyTensor]:
        """The model's tensors by name. Accepts a bare state_dict (CoreNet's
        `checkpoint_last.pt`, `checkpoint_avg.pt`, ...) or a training checkpoint holding
        one under 'model_state_dict'."""
        obj = self.load_pickle()
        if isinstance(obj, dict) and "model_state_dict" in obj:
            obj = obj["model_state_dict"]
        if not isinstance(obj, dict) or not obj:
            raise CheckpointError(f"{self.path}: expected a state_dict (name -> tensor) in the checkpoint")
        out = {}
        for name, value in obj.items():
            if not isinstance(value, LazyTensor):
                raise CheckpointError(f"{self.path}: entry '{name}' is not a tensor")
            out[str(name)] = value
            key = value.storage.key
            self._needed[key] = max(self._needed.get(key, 0), value.elements_needed())
        return out


# ---- names -----------------------------------------------------------------------------

def corenet_names(args: ModelArgs) -> "OrderedDict[str, str]":
    """Our (Hugging Face) tensor name -> CoreNet's, for every tensor of `args`, in model order.

    CoreNet's GeneralGPTModel holds `token_embeddings`, `layers` and `norm` at the top
    level (HF nests them under `transformer.`), names the untied head `classifier`
    (HF: `lm_head`), and has no `classifier` at all when the head is tied. Inside a layer
    the names agree: attn_norm, attn.{qkv_proj,q_norm,k_norm,out_proj}, ffn_norm,
    ffn.{proj_1,proj_2}. RoPE's `inv_freq` is a non-persistent buffer, so never saved.
    """
    names: "OrderedDict[str, str]" = OrderedDict()
    names["transformer.token_embeddings.weight"] = "token_embeddings.weight"
    for i in range(args.num_transformer_layers):
        ours, theirs = f"transformer.layers.{i}.", f"layers.{i}."
        modules = ["attn_norm", "attn.qkv_proj"]
        if args.normalize_qk_projections:
            modules += ["attn.q_norm", "attn.k_norm"]
        modules += ["attn.out_proj", "ffn_norm", "ffn.proj_1", "ffn.proj_2"]
        for module in modules:
            names[f"{ours}{module}.weight"] = f"{theirs}{module}.weight"
    names["transformer.norm.weight"] = "norm.weight"
    if not args.share_input_output_layers:
        names["lm_head.weight"] = "classifier.weight"
    return names


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Our tensor name -> shape for `args` (the float model's parameters), in model order.

    Read off `Model(args)` itself: its parameters are lazy and never evaluated, so
    this allocates nothing and cannot drift from the model's definition.
    """
    from mlx.utils import tree_flatten

    from mlx_openelm.model import Model

    return {name: tuple(p.shape) for name, p in tree_flatten(Model(args).parameters())}


def match_corenet(
    state: dict[str, LazyTensor], args: ModelArgs, source: str, what: str
) -> "OrderedDict[str, LazyTensor]":
    """Our name -> tensor, checked against `Model(args)` by `loading.check_weights`.

    The first tensor that disagrees (missing, wrong shape or dtype, or not part of the
    model) is a CheckpointError naming it as CoreNet spells it, and `what` (e.g. "preset 270M").
    """
    from mlx_openelm.loading import check_weights
    from mlx_openelm.model import Model

    # DDP-wrapped models save 'module.'-prefixed names; strip that one wrapper.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    names = corenet_names(args)
    ours = {theirs: our for our, theirs in names.items()}
    mapped = {ours.get(k, f"corenet:{k}"): v for k, v in state.items()}
    problems = check_weights(Model(args), mapped)
    if problems:
        first = problems[0]
        if first.kind == "unexpected":
            extra = sum(p.kind == "unexpected" for p in problems) - 1
            theirs = first.name[len("corenet:"):]
            raise CheckpointError(f"{source}: tensor '{theirs}' is not part of {what}"
                                  + (f" (and {extra} more)" if extra else ""))
        raise CheckpointError(f"{source}: {first.describe(what, name=names[first.name])}")
    return OrderedDict((our, mapped[our]) for our in names)


def read_corenet(path: Path, args: ModelArgs, what: str) -> "OrderedDict[str, LazyTensor]":
    """Our name -> lazy tensor for the CoreNet checkpoint at `path`, validated against `args`."""
    archive = CoreNetArchive(path)
    return match_corenet(archive.state_dict(), args, str(path), what)
