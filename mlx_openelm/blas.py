"""An optimized BLAS under MLX's Linux CPU backend.

MLX's Linux CPU wheel links the reference BLAS it bundles (netlib: about 2 GFLOP/s for float32
matrix products). A BLAS loaded into the process with RTLD_GLOBAL before MLX is first imported takes
its place: the dynamic linker resolves libmlx's `cblas_sgemm` to the first definition in the
process's global scope. `install()` (called by the package's `__init__`) arranges that for the first
`import mlx`, so `import mlx_openelm` itself stays cheap; `info()` says which BLAS MLX uses.

`$MLX_OPENELM_BLAS`: unset (or `auto`) looks for a system OpenBLAS, then Intel's MKL installed by pip
(the `mkl` extra); `0` keeps MLX's bundled BLAS; a path loads that library. macOS (Accelerate) and
other systems are left alone. Nothing here imports MLX.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

ENV = "MLX_OPENELM_BLAS"
OFF = ("0", "off", "no", "false", "none")
AUTO = ("", "1", "auto", "on", "yes", "true")
BUNDLED = "MLX's bundled reference BLAS"
# Variables that already set a library's thread count; when one is set we leave the count alone.
THREAD_VARIABLES = {"openblas": ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"),
                    "mkl": ("MKL_NUM_THREADS", "OMP_NUM_THREADS")}

_state: dict | None = None


def install() -> None:
    """Load the BLAS just before MLX is first imported (Linux only; nothing to do elsewhere).

    Cheap: it adds an import hook; the library is looked for and loaded at the first `import mlx`.
    MLX already imported: too late, which `info()` then says."""
    if not sys.platform.startswith("linux") or _state is not None:
        return
    if "mlx.core" in sys.modules:
        load()
        return
    if not any(isinstance(finder, _BeforeMLX) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMLX())


class _BeforeMLX:
    """An import hook that loads the BLAS when `mlx` is first imported, and then stands aside
    (it stays in sys.meta_path: removing a finder while the import system walks the list would skip one)."""

    def find_spec(self, name, path=None, target=None):
        if _state is None and (name == "mlx" or name.startswith("mlx.")):
            load()
        return None


def load() -> dict:
    """Find, load and check the BLAS once per process (what `info()` returns)."""
    global _state
    if _state is None:
        _state = _choose()
        for message in _state.pop("warnings"):
            warnings.warn(message, _warning_category(), stacklevel=2)
    return _state


def info() -> dict:
    """Which BLAS MLX's float matrix products use: `name`, `library` (its path), `threads`,
    `source` (how it came: system, pip, $MLX_OPENELM_BLAS, preloaded, bundled, Accelerate) and `note`
    (why it is not an optimized one, or None). Loads it first when MLX has not been imported yet."""
    if sys.platform == "darwin":
        return {"name": "Accelerate", "library": None, "threads": None, "source": "macOS", "note": None}
    if not sys.platform.startswith("linux"):
        return {"name": "as MLX was built", "library": None, "threads": None, "source": sys.platform, "note": None}
    return dict(load())


def describe(state: dict | None = None) -> str:
    """One line for `--version` and `bench`: 'OpenBLAS 0.3.21 (Zen, 1 thread) from /usr/lib/...'."""
    state = info() if state is None else state
    threads = state.get("threads")
    details = [part for part in (state.get("detail"), threads and f"{threads} thread{'s' * (threads != 1)}") if part]
    line = state["name"] + (f" ({', '.join(details)})" if details else "")
    if state.get("library"):
        line += f" from {state['library']}"
    if state.get("note"):
        line += f"; {state['note']}"
    return line


def default_threads() -> int:
    """BLAS threads when the user has not chosen: one per physical core this process may use (SMT
    siblings share a core's vector units), at most 8 (the model's products are too small for more).
    On a quiet 2-core machine two threads decoded 1.5x faster than one (docs/performance.md)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    return max(1, min(8, physical_cores(cpus)))


def physical_cores(cpus: list[int], sysfs: str = "/sys/devices/system/cpu") -> int:
    """How many distinct cores the logical `cpus` sit on (Linux sysfs topology); without the topology,
    every logical CPU counts as a core."""
    cores = set()
    for cpu in cpus:
        topology = Path(sysfs) / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores)


# ---- choosing and loading ------------------------------------------------------------------------------

def _warning_category():
    from .errors import OpenELMWarning

    return OpenELMWarning


def _choose() -> dict:
    setting = os.environ.get(ENV, "").strip()
    preloaded = _global_sgemm()
    if preloaded is not None:  # LD_PRELOAD or an earlier RTLD_GLOBAL load: MLX binds to it whatever we do
        return _loaded(preloaded, "preloaded", set_threads=setting.lower() not in OFF)
    if "mlx.core" in sys.modules:
        return _bundled("MLX was imported before mlx_openelm, so it keeps the BLAS it linked "
                        "(import mlx_openelm first for the faster one)")
    if setting.lower() in OFF:
        return _bundled(f"${ENV}={setting} turned the optimized BLAS off")
    if setting.lower() not in AUTO:
        problem = _try(setting)
        if problem:
            note = f"${ENV}={setting}: {problem}"
            return _bundled(note, [f"{note}; using {BUNDLED} (slow)"])
        return _loaded(setting, f"${ENV}")
    for path, source in _candidates():
        if _try(path) is None:
            return _loaded(path, source)
    return _bundled("no optimized BLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread; "
                    "or pip install 'mlx-openelm[mkl]')")


def _bundled(note: str | None, messages: list | None = None) -> dict:
    return {"name": BUNDLED, "library": None, "threads": None, "detail": None, "source": "bundled",
            "note": note, "warnings": messages or []}


def _try(path: str) -> str | None:
    """None once `path` is loaded into the global scope and MLX's `cblas_sgemm` resolves to it;
    else the reason it cannot serve."""
    import ctypes
    import ctypes.util

    if not os.path.exists(path):
        return "no such file"
    if _kind(path) == "mkl":
        # MKL's default (Intel) threading layer needs libiomp5 on the loader's path; GNU's needs libgomp
        threaded = default_threads() > 1 and ctypes.util.find_library("gomp")
        os.environ.setdefault("MKL_THREADING_LAYER", "GNU" if threaded else "SEQUENTIAL")
    try:
        library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return f"cannot be loaded ({str(e).split(': ')[-1]})"
    try:
        own = ctypes.cast(library.cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        return "exports no cblas_sgemm, so it is not a CBLAS library"
    if _global_sgemm_address() != own:
        return "was loaded but MLX's cblas_sgemm does not resolve to it"
    return None


def _loaded(path: str, source: str, set_threads: bool = True) -> dict:
    import ctypes

    library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # already loaded: a handle to it
    kind = _kind(path, library)
    threads = _set_threads(library, kind) if set_threads else None
    if threads is None:
        threads = _get_threads(library, kind)
    name, detail = _name(library, kind, path)
    return {"name": name, "library": os.path.realpath(path), "threads": threads, "detail": detail,
            "source": source, "note": None, "warnings": []}


def _kind(path: str, library=None) -> str:
    if library is not None:
        if _has_symbol(library, "openblas_get_config"):
            return "openblas"
        if _has_symbol(library, "MKL_Get_Version_String"):
            return "mkl"
        return "other"
    base = os.path.basename(path).lower()
    return "mkl" if "mkl" in base else "openblas" if "openblas" in base else "other"


def _has_symbol(library, symbol: str) -> bool:
    try:
        getattr(library, symbol)
    except AttributeError:
        return False
    return True


def _set_threads(library, kind: str) -> int | None:
    """Set the default thread count unless the user's environment already chose one."""
    if kind not in THREAD_VARIABLES or any(os.environ.get(name) for name in THREAD_VARIABLES[kind]):
        return None
    threads = default_threads()
    if kind == "openblas":
        library.openblas_set_num_threads(threads)
    elif os.environ.get("MKL_THREADING_LAYER", "").upper() != "SEQUENTIAL":
        library.mkl_set_num_threads(threads)
    return threads


def _get_threads(library, kind: str) -> int | None:
    if kind == "openblas":
        return int(library.openblas_get_num_threads())
    if kind == "mkl":
        return 1 if os.environ.get("MKL_THREADING_LAYER", "").upper() == "SEQUENTIAL" \
            else int(library.mkl_get_max_threads())
    return None


def _name(library, kind: str, path: str) -> tuple[str, str | None]:
    """('OpenBLAS 0.3.21', 'Zen, pthreads') from the library's own report."""
    import ctypes
    import re

    if kind == "openblas":
        library.openblas_get_config.restype = ctypes.c_char_p
        config = (library.openblas_get_config() or b"OpenBLAS").decode(errors="replace").split()
        parallel = {0: "sequential", 1: "pthreads", 2: "OpenMP"}.get(library.openblas_get_parallel())
        core = None
        if _has_symbol(library, "openblas_get_corename"):
            library.openblas_get_corename.restype = ctypes.c_char_p
            core = (library.openblas_get_corename() or b"").decode(errors="replace") or None
        return " ".join(config[:2]), ", ".join(part for part in (core, parallel) if part) or None
    if kind == "mkl":
        buffer = ctypes.create_string_buffer(256)
        library.MKL_Get_Version_String(buffer, len(buffer))
        text = buffer.value.decode(errors="replace")
        match = re.search(r"Version ([\w.]+)", text)
        layer = os.environ.get("MKL_THREADING_LAYER", "INTEL").lower()
        return f"Intel MKL {match.group(1) if match else ''}".strip(), f"{layer} threading"
    return os.path.basename(path), None


def _global_sgemm_address() -> int | None:
    """Where `cblas_sgemm` resolves in the process's global scope, as MLX's lookup finds it (None: nowhere)."""
    import ctypes

    try:
        return ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        return None


def _global_sgemm() -> str | None:
    """The path of the library that defines the global `cblas_sgemm` (None: none does)."""
    address = _global_sgemm_address()
    return None if address is None else _library_of(address)


def _library_of(address: int) -> str | None:
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    libc = ctypes.CDLL(None)
    found = DlInfo()
    if not libc.dladdr(ctypes.c_void_p(address), ctypes.byref(found)) or not found.dli_fname:
        return None
    return found.dli_fname.decode(errors="replace")


def _candidates():
    """(path, source) of optimized BLAS libraries in the order tried: MKL installed by pip in this
    environment (a deliberate choice), the system's OpenBLAS in each distribution's place (pthreads
    builds first), then what `ldconfig -p` knows."""
    import glob
    import platform

    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True):
            yield path, "pip (mkl)"
    arch = platform.machine()
    patterns = [
        f"/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",  # Debian, Ubuntu
        f"/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
        f"/usr/lib/{arch}-linux-gnu/openblas-serial/libopenblas.so.0",
        f"/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
        "/usr/lib64/libopenblasp.so.0", "/usr/lib64/libopenblaso.so.0", "/usr/lib64/libopenblas.so.0",  # Fedora
        "/usr/lib64/libopenblas*.so*", "/usr/lib/libopenblas.so.0", "/usr/lib/libopenblas.so",  # Arch, Alpine
        "/usr/local/lib/libopenblas*.so*",
    ]
    seen = set()
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if path not in seen:
                seen.add(path)
                yield path, "system"
    for path in _ldconfig():
        if path not in seen:
            yield path, "system"


def _ldconfig() -> list[str]:
    import re
    import subprocess

    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"=>\s*(\S*libopenblas\S*\.so\S*)", out)
