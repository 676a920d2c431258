"""The test support code the measurement scripts share, without putting tests/ on the import path.

`from support import trained` gives tests/trained.py (the trained test model's folder, held-out real
text, mlx-lm's llama on the same weights) and `from support import synthetic` tests/synthetic.py
(random OpenELM checkpoints, a tiny tokenizer). A script run as `python scripts/NAME.py` has scripts/
first on its path, so it finds this module; the two files are then loaded from tests/ by path, each
once and under its own name (as pytest names them), so nothing else in tests/ becomes importable.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
SHARED = ("trained", "synthetic")


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered before it runs, as an import would be
    spec.loader.exec_module(module)
    return module


def __getattr__(name: str):
    if name in SHARED:
        return _load(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} (it shares {', '.join(SHARED)})")
