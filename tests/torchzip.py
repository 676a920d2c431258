"""Write `.pt` files the way `torch.save(state_dict)` does, without torch.

The archive holds `<name>/data.pkl` (protocol 2 pickle whose tensors are
`torch._utils._rebuild_tensor_v2` calls on persistent-id storages
`('storage', torch.FloatStorage, key, 'cpu', numel)`), `<name>/data/<key>` (raw
little-endian bytes), `<name>/byteorder` and `<name>/version`. The pickle is
emitted opcode by opcode, since the globals it names live in torch.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

STORAGE_NAMES = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("float64"): "DoubleStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("int64"): "LongStorage",
}


class _Writer:
    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def op(self, code: bytes, payload: bytes = b"") -> None:
        self.out += code + payload

    def glob(self, module: str, name: str) -> None:
        self.op(b"c", f"{module}\n{name}\n".encode())  # GLOBAL

    def text(self, value: str) -> None:
        data = value.encode()
        self.op(b"X", struct.pack("<I", len(data)) + data)  # BINUNICODE

    def integer(self, value: int) -> None:
        self.op(b"J", struct.pack("<i", value))  # BININT

    def int_tuple(self, values) -> None:
        self.op(b"(")  # MARK
        for v in values:
            self.integer(int(v))
        self.op(b"t")  # TUPLE

    def ordered_dict(self) -> None:
        self.glob("collections", "OrderedDict")
        self.op(b")")  # EMPTY_TUPLE
        self.op(b"R")  # REDUCE

    def tensor(self, key: str, storage: str, numel: int, shape, stride, offset: int = 0) -> None:
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.op(b"(")
        self.op(b"(")  # persistent id tuple
        self.text("storage")
        self.glob("torch", storage)
        self.text(key)
        self.text("cpu")
        self.integer(numel)
        self.op(b"t")
        self.op(b"Q")  # BINPERSID
        self.integer(offset)
        self.int_tuple(shape)
        self.int_tuple(stride)
        self.op(b"\x89")  # NEWFALSE (requires_grad)
        self.ordered_dict()  # backward_hooks
        self.op(b"t")
        self.op(b"R")


def write_torch_zip(
    path: Path,
    state: dict[str, np.ndarray],
    archive_name: str = "archive",
    wrap: Optional[str] = None,
    bfloat16: bool = False,
    extra_global: Optional[tuple[str, str]] = None,
    transpose: tuple[str, ...] = (),
) -> Path:
    """Write `state` (name -> numpy array) like `torch.save` does.

    wrap: save {wrap: state_dict, 'epoch': 3} (a CoreNet training checkpoint).
    bfloat16: store float32 arrays as BFloat16Storage (round to nearest even).
    extra_global: also pickle a reference to this (module, name) global, under key 'evil'.
    transpose: names stored column-major (a non-contiguous view: stride (1, rows)).
    """
    w = _Writer()
    blobs: dict[str, bytes] = {}
    if wrap is not None:
        w.op(b"}")  # EMPTY_DICT
        w.op(b"(")
        w.text(wrap)
    w.ordered_dict()
    w.op(b"(")
    for i, (name, array) in enumerate(state.items()):
        array = np.asarray(array)
        if bfloat16 and array.dtype == np.float32:
            bits = np.ascontiguousarray(array).view(np.uint32).astype(np.uint64)
            array = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).reshape(array.shape)
            storage = "BFloat16Storage"
        else:
            storage = STORAGE_NAMES[array.dtype]
        if name in transpose and array.ndim == 2:
            rows, cols = array.shape
            blobs[str(i)] = np.ascontiguousarray(array.T).tobytes()
            stride = (1, rows)
        else:
            blobs[str(i)] = np.ascontiguousarray(array).tobytes()
            stride = tuple(int(np.prod(array.shape[k + 1:])) for k in range(array.ndim))
        w.text(name)
        w.tensor(str(i), storage, array.size, array.shape, stride)
    if extra_global is not None:
        w.text("evil")
        w.glob(*extra_global)
    w.op(b"u")  # SETITEMS
    if wrap is not None:
        w.text("epoch")
        w.integer(3)
        w.op(b"u")
    w.op(b".")  # STOP

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive_name}/data.pkl", bytes(w.out))
        z.writestr(f"{archive_name}/byteorder", "little")
        for key, blob in blobs.items():
            z.writestr(f"{archive_name}/data/{key}", blob)
        z.writestr(f"{archive_name}/version", "3\n")
    return Path(path)


def corenet_state(hf_weights: dict[str, Any], share_head: bool = True) -> dict[str, np.ndarray]:
    """HF-named weights -> CoreNet names (drop `transformer.`, lm_head -> classifier)."""
    out = {}
    for name, array in hf_weights.items():
        if name == "transformer.classifier.weight":
            continue  # HF's vestigial head; CoreNet has none when tied
        if name == "lm_head.weight":
            out["classifier.weight"] = array
        elif name.startswith("transformer."):
            out[name[len("transformer."):]] = array
        else:
            raise KeyError(name)
    return out
