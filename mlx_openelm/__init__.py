"""mlx-openelm: Apple's OpenELM models on Apple silicon with MLX.

The public API is imported lazily, so `import mlx_openelm` (and the CLI's
`--help`) does not load MLX. On Linux it arranges for an optimized BLAS to be
loaded when MLX is first imported (`blas.py`; `MLX_OPENELM_BLAS=0` turns it off).
"""

from importlib import import_module
from typing import Any

from . import blas as _blas

__version__ = "0.1.0"

_blas.install()  # before any submodule imports MLX

_API = {
    "load": "loading",
    "load_model": "loading",
    "Model": "model",
    "make_cache": "model",
    "KVCache": "cache",
    "ModelArgs": "config",
    "Tokenizer": "tokenizer",
    "generate_step": "generation",
    "stream_generate": "generation",
    "generate": "generation",
    "GenerationResponse": "generation",
    "batch_generate": "batching",
    "BatchResponse": "batching",
    "SpeculativeOptions": "speculative",
    "ChatSession": "chat",
    "make_sampler": "sampling",
    "make_logits_processors": "sampling",
    "OpenELMError": "errors",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'mlx_openelm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
