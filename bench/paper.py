"""The OpenELM paper's throughput protocol (Table 7b), and the paper's figures when a user supplies them.

Mehta et al., "OpenELM: An Efficient Language Model Family with Open Training and
Inference Framework", arXiv:2404.14619, Section 4 / Table 7b: throughput on a
MacBook Pro with an M2 Max (64 GB) using MLX, a short prompt, 1024 generated
tokens, batch size 1, 16-bit and 4-bit weights, a warm-up run first. Table 8 is
the normalization ablation (a naive RMSNorm against optimized kernels).

The published figures are not bundled (no sourced copy of the table was reachable
offline). Whoever has them passes a reference file (`--reference-json`):

    {"source": "OpenELM paper, Table 7b (MacBook Pro M2 Max, MLX)",
     "rows": [{"model": "270M", "bits": 16, "prompt_tps": 0.0, "generation_tps": 0.0},
              {"model": "270M", "bits": 4, "generation_tps": 0.0}]}

`model` names the size (270M, 450M, 1_1B or 1.1B, 3B; "OpenELM-270M-Instruct" works too),
`bits` is 16 (unquantized) or the quantized width, and any of `prompt_tps`,
`generation_tps`, `total_tps` (tokens per second) may be given. `source` is optional.
No MLX here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

from mlx_openelm.errors import ConfigError

PAPER_SOURCE = "OpenELM paper (arXiv:2404.14619), Table 7b: MacBook Pro M2 Max, MLX"

# Table 7b's settings.
PAPER_PROMPT_TOKENS = 35  # "a short prompt" of about 35 tokens
PAPER_GENERATION_TOKENS = 1024
PAPER_BITS = (None, 4)  # 16-bit float (None: unquantized) and 4-bit
PAPER_HARDWARE = "MacBook Pro, Apple M2 Max (64 GB), MLX on the GPU (Metal)"

REFERENCE_METRICS = ("prompt_tps", "generation_tps", "total_tps")
_SIZE = re.compile(r"(270M|450M|1[_.]1B|3B)", re.IGNORECASE)


def size_key(label: str) -> Optional[str]:
    """'270M', '450M', '1_1B' or '3B' found in a model label ('OpenELM-1.1B-Instruct' -> '1_1B')."""
    match = _SIZE.search(str(label))
    return match.group(1).upper().replace(".", "_") if match else None


def protocol_rows(rows: list[dict], settings: dict, machine: dict) -> list[tuple[str, str, str]]:
    """(setting, the paper's, this run's) for each setting of Table 7b's protocol."""
    floats = sorted({r["dtype"] for r in rows if r.get("bits") is None})  # float32 on the CPU: say so
    quantized = sorted({r["bits"] for r in rows if r.get("bits") is not None}, reverse=True)
    run_weights = ", ".join(floats + [f"{b}-bit" for b in quantized])
    return [
        ("prompt", f"{PAPER_PROMPT_TOKENS} tokens, fixed",
         f"{', '.join(map(str, settings.get('prompt_tokens', [])))} tokens, {settings.get('prompt', '?')}"),
        ("generated tokens", str(PAPER_GENERATION_TOKENS), ", ".join(map(str, settings.get("generation_tokens", [])))),
        ("batch size", "1", "1"),
        ("weights", "16-bit, 4-bit", run_weights or "-"),
        ("warm-up run", "yes", "yes" if settings.get("warmup") else "no"),
        ("hardware", PAPER_HARDWARE, machine_title(machine)),
    ]


def machine_title(machine: dict) -> str:
    """The chip and the backend, said plainly: 'Apple M2 Max, MLX on the GPU (Metal)'."""
    name = machine.get("chip") and f"Apple {machine['chip']}" or machine.get("cpu") or "unknown CPU"
    device = str(machine.get("mlx_device", ""))
    if "gpu" in device:
        backend = "MLX on the GPU (Metal)" if "macOS" in machine.get("os", "") or machine.get("chip") else \
            "MLX on the GPU (CUDA)"
    elif "cpu" in device:
        backend = "MLX on the CPU"
    else:
        backend = "MLX"
    return f"{name}, {backend}"


def load_reference(path: str | Path) -> dict:
    """The paper's figures from a user's file (shape in the module docstring); ConfigError if malformed."""
    where = f"--reference-json {path}"
    try:
        document = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # undecodable bytes, bad JSON, a 5000-digit number, deep nesting
        raise ConfigError(f"{where}: not JSON ({e})") from None
    rows = document.get("rows") if isinstance(document, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f'{where}: expected {{"rows": [{{"model": "270M", "bits": 16, "generation_tps": ...}}]}}')
    return {"source": str(document.get("source") or "reference"), "rows": [_reference_row(r, i, where)
                                                                           for i, r in enumerate(rows)]}


def _reference_row(row, i: int, where: str) -> dict:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: rows[{i}] must be an object")
    size = size_key(row.get("model", ""))
    if size is None:
        raise ConfigError(f"{where}: rows[{i}].model must name an OpenELM size (270M, 450M, 1_1B, 3B), "
                          f"got {row.get('model')!r}")
    bits = row.get("bits")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in (16, 8, 4):
        raise ConfigError(f"{where}: rows[{i}].bits must be 16, 8 or 4, got {bits!r}")
    values = {}
    for key in REFERENCE_METRICS:
        value = row.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: rows[{i}].{key} must be a positive number, got {value!r}")
        values[key] = float(value)
    if not values:
        raise ConfigError(f"{where}: rows[{i}] gives none of {', '.join(REFERENCE_METRICS)}")
    return {"model": size, "bits": None if bits == 16 else bits, **values}


def compare_rows(rows: list[dict], reference: dict) -> list[dict]:
    """Our rows (mlx-openelm's engine) beside the reference's for the same size and bits."""
    out = []
    for row in rows:
        if row.get("engine") != "mlx-openelm" or row.get("variant"):
            continue
        key = (size_key(row["model"]), row.get("bits"))
        for ref in reference["rows"]:
            if (ref["model"], ref["bits"]) == key:
                out.append({"row": row, "reference": ref})
    return out
