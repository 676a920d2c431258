"""The machine a benchmark ran on, and the peak memory bandwidth of Apple's chips.

Nothing here imports MLX at module level.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from typing import Optional

# Peak unified-memory bandwidth in GB/s, from Apple's published specifications.
# Chips sold in two memory configurations map to {performance cores: GB/s}.
CHIP_BANDWIDTH_GBS: dict[str, object] = {
    "M1": 68.25,
    "M1 Pro": 200.0,
    "M1 Max": 400.0,
    "M1 Ultra": 800.0,
    "M2": 100.0,
    "M2 Pro": 200.0,
    "M2 Max": 400.0,
    "M2 Ultra": 800.0,
    "M3": 100.0,
    "M3 Pro": 150.0,
    "M3 Max": {10: 300.0, 12: 400.0},  # 14-core CPU (10P) / 16-core CPU (12P)
    "M4": 120.0,
    "M4 Pro": 273.0,
    "M4 Max": {10: 410.0, 12: 546.0},  # 14-core CPU (10P) / 16-core CPU (12P)
}


def _run(cmd: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text or None


def cpu_name() -> str:
    """'Apple M2 Max' on a Mac, the /proc/cpuinfo model name on Linux, else platform.processor()."""
    if sys.platform == "darwin":
        name = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if name:
            return name
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def apple_chip(name: str) -> Optional[str]:
    """'M2 Max' from 'Apple M2 Max'; None for a CPU that is not an M-series chip."""
    match = re.search(r"\b(M\d+)(?:\s+(Pro|Max|Ultra))?\b", name)
    if not match or "apple" not in name.lower():
        return None
    return " ".join(part for part in match.groups() if part)


def _performance_cores() -> Optional[int]:
    value = _run(["sysctl", "-n", "hw.perflevel0.physicalcpu"]) if sys.platform == "darwin" else None
    try:
        return int(value) if value else None
    except ValueError:
        return None


def chip_bandwidth_gbs(name: str, performance_cores: Optional[int] = None) -> Optional[float]:
    """Peak memory bandwidth of the chip called `name` (GB/s), or None when unknown."""
    chip = apple_chip(name)
    if chip is None or chip not in CHIP_BANDWIDTH_GBS:
        return None
    entry = CHIP_BANDWIDTH_GBS[chip]
    if isinstance(entry, dict):
        if performance_cores is None:
            performance_cores = _performance_cores()
        if performance_cores not in entry:
            return None  # two configurations and we cannot tell which one
        return float(entry[performance_cores])
    return float(entry)


def memory_gb() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        value = _run(["sysctl", "-n", "hw.memsize"]) if sys.platform == "darwin" else None
        return int(value) / 1e9 if value and value.isdigit() else None


def sgemm_gflops(m: int = 64, k: int = 576, n: int = 1536, seconds: float = 0.2) -> float:
    """Float32 matrix-product speed on MLX's CPU device (GFLOP/s, best of a few timed runs): the
    check that the BLAS `blas.info()` names is the one MLX calls (reference BLAS: about 2)."""
    import time

    import mlx.core as mx

    with mx.stream(mx.cpu):
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a, b, a @ b)
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds or best == float("inf"):
            tic = time.perf_counter()
            mx.eval(a @ b)
            best = min(best, time.perf_counter() - tic)
    return 2 * m * k * n / best / 1e9


def machine_info() -> dict:
    """The chip or CPU, memory, OS, Python, MLX's version and device, and the BLAS under MLX's
    CPU backend with its measured float32 matrix-product speed."""
    import mlx.core as mx

    from mlx_openelm.blas import info as blas_info

    name = cpu_name()
    info = {
        "cpu": name,
        "chip": apple_chip(name),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(memory_gb(), 2) if memory_gb() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx_version": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "peak_bandwidth_gbs": chip_bandwidth_gbs(name),
        "blas": {**blas_info(), "sgemm_gflops": round(sgemm_gflops(), 1)},
    }
    try:
        from importlib.metadata import version

        info["mlx_lm_version"] = version("mlx-lm")
    except Exception:  # not installed
        info["mlx_lm_version"] = None
    return info
