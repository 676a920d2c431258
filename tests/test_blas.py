"""The optimized BLAS under MLX on Linux (mlx_openelm/blas.py).

Loading is once per process and must precede MLX's import, so each case runs in a fresh Python
process, with $LD_PRELOAD removed (a preloaded BLAS would serve whatever the switch says).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlx_openelm import blas

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS is swapped on Linux only")
SYSTEM_OPENBLAS = next((path for path, source in blas._candidates() if source == "system"), None) \
    if sys.platform.startswith("linux") else None
needs_openblas = pytest.mark.skipif(SYSTEM_OPENBLAS is None, reason="no system OpenBLAS (apt-get install "
                                                                    "libopenblas0-pthread)")

# Import mlx_openelm, then MLX; a product checked against numpy; which BLAS serves, as JSON.
PROBE = """
import json, warnings
import numpy as np
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import mlx_openelm
    import mlx.core as mx
a = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
product = np.array(mx.array(a) @ mx.array(a.T))
from mlx_openelm import blas
print(json.dumps({"info": blas.info(), "warnings": [str(w.message) for w in caught],
                  "error": float(np.abs(product - a.astype(np.float64) @ a.T.astype(np.float64)).max())}))
"""


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("LD_PRELOAD", blas.ENV, "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=300, check=False)


def probe(**env) -> dict:
    result = run_python(PROBE, **env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["error"] < 1e-3  # whichever BLAS serves, the product is right
    return report


@linux_only
@needs_openblas
def test_a_system_openblas_serves_mlx_by_default_and_the_switch_turns_it_off():
    on = probe()
    assert on["info"]["name"].startswith("OpenBLAS") and on["info"]["source"] == "system"
    assert os.path.realpath(SYSTEM_OPENBLAS) == on["info"]["library"]  # where MLX's cblas_sgemm resolves
    assert on["info"]["threads"] == blas.default_threads()
    assert on["warnings"] == []
    off = probe(MLX_OPENELM_BLAS="0")
    assert off["info"]["name"] == blas.BUNDLED and off["info"]["library"] is None
    assert "MLX_OPENELM_BLAS=0" in off["info"]["note"] and off["warnings"] == []


@linux_only
@needs_openblas
def test_a_path_in_the_variable_is_loaded_and_the_users_thread_count_is_kept():
    report = probe(MLX_OPENELM_BLAS=SYSTEM_OPENBLAS, OPENBLAS_NUM_THREADS="2")
    assert report["info"]["source"] == "$MLX_OPENELM_BLAS"
    assert report["info"]["library"] == os.path.realpath(SYSTEM_OPENBLAS) and report["info"]["threads"] == 2


@linux_only
def test_a_missing_or_broken_library_falls_back_with_a_warning(tmp_path):
    import _ctypes

    broken = tmp_path / "libbroken.so"
    broken.write_text("not a shared library\n")
    cases = {"/nonexistent/libopenblas.so": "no such file", str(broken): "cannot be loaded",
             _ctypes.__file__: "exports no cblas_sgemm"}  # a real shared library that is not a BLAS
    for path, reason in cases.items():
        report = probe(MLX_OPENELM_BLAS=path)
        assert report["info"]["name"] == blas.BUNDLED and report["info"]["library"] is None
        (warning,) = report["warnings"]
        assert warning.startswith(f"$MLX_OPENELM_BLAS={path}: {reason}") and "bundled" in warning


@linux_only
def test_mlx_imported_first_keeps_its_blas_and_says_so():
    result = run_python("import mlx.core, json, mlx_openelm.blas as b; print(json.dumps(b.info()))")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["name"] == blas.BUNDLED and "imported before mlx_openelm" in info["note"]


@linux_only
@needs_openblas
def test_a_preloaded_blas_is_reported_even_when_switched_off():
    report = probe(LD_PRELOAD=SYSTEM_OPENBLAS, MLX_OPENELM_BLAS="0")
    assert report["info"]["source"] == "preloaded" and report["info"]["library"] == os.path.realpath(SYSTEM_OPENBLAS)


def _topology(root, cores_of: list[tuple[int, int]]):
    """A fake sysfs: logical CPU i on (package, core) cores_of[i]."""
    for cpu, (package, core) in enumerate(cores_of):
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return str(root)


def test_physical_cores_count_smt_siblings_once(tmp_path):
    smt = _topology(tmp_path / "smt", [(0, 0), (0, 1), (0, 0), (0, 1)])  # 2 cores, 2 threads each
    assert blas.physical_cores([0, 1, 2, 3], smt) == 2
    assert blas.physical_cores([0, 2], smt) == 1  # both siblings of core 0
    sockets = _topology(tmp_path / "sockets", [(0, 0), (1, 0)])  # the same core id on two packages
    assert blas.physical_cores([0, 1], sockets) == 2
    assert blas.physical_cores([0, 1, 5], sockets) == 3  # no topology for cpu5: count logical CPUs


def test_default_threads_one_per_core_capped_at_eight(monkeypatch):
    monkeypatch.setattr(blas, "physical_cores", lambda cpus: len(cpus) // 2)  # SMT pairs
    for cpus, threads in ((1, 1), (2, 1), (4, 2), (16, 8), (128, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert blas.default_threads() == threads


def test_describe_names_the_library_threads_and_any_note():
    state = {"name": "OpenBLAS 0.3.21", "library": "/usr/lib/libopenblas.so.0", "threads": 1,
             "detail": "Zen, pthreads", "source": "system", "note": None}
    assert blas.describe(state) == "OpenBLAS 0.3.21 (Zen, pthreads, 1 thread) from /usr/lib/libopenblas.so.0"
    off = {"name": blas.BUNDLED, "library": None, "threads": None, "detail": None, "note": "turned off"}
    assert blas.describe(off) == f"{blas.BUNDLED}; turned off"


@linux_only
def test_version_says_which_blas(run_cli, monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv(blas.ENV, "0")
    result = run_cli("--version")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines()[1] == f"BLAS: {blas.BUNDLED}; $MLX_OPENELM_BLAS=0 turned the optimized BLAS off"
    monkeypatch.setenv(blas.ENV, "/nonexistent.so")
    result = run_cli("--version")
    assert result.returncode == 0 and "$MLX_OPENELM_BLAS=/nonexistent.so: no such file" in result.stdout


# The trained model's logits for one prompt, saved to the path given.
LOGITS = """
import sys
import numpy as np
from mlx_openelm import load  # before MLX, so the BLAS can serve it
from mlx_openelm.blas import info
import mlx.core as mx
model, tokenizer = load(sys.argv[1])
ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. In 1905 Albert Einstein published")
np.save(sys.argv[2], np.array(model(mx.array([ids]))[0], dtype=np.float32))
print(info()["name"])
"""


@linux_only
@needs_openblas
def test_trained_model_logits_agree_with_and_without_openblas_to_float32_round_off(trained_model_path, tmp_path):
    outputs = {}
    for setting in ("auto", "0"):
        path = tmp_path / f"{setting}.npy"
        result = subprocess.run([sys.executable, "-c", LOGITS, str(trained_model_path), str(path)],
                                capture_output=True, text=True, timeout=300, check=False,
                                env={**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, blas.ENV: setting})
        assert result.returncode == 0, result.stderr
        outputs[result.stdout.strip()] = np.load(path)
    assert len(outputs) == 2 and blas.BUNDLED in outputs  # two different libraries served
    fast, reference = outputs.pop(next(name for name in outputs if name != blas.BUNDLED)), outputs[blas.BUNDLED]
    scale = np.abs(reference).max()
    assert np.abs(fast - reference).max() < 3e-5 * scale  # summation order only (measured: 4e-6)
    assert np.array_equal(fast.argmax(-1), reference.argmax(-1))


@linux_only
def test_cli_shows_a_failed_load_as_one_warning_line_and_runs_on(run_cli, trained_model_path, monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv(blas.ENV, "/nonexistent.so")
    result = run_cli("generate", "--model", trained_model_path, "--prompt", "Hello", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert f"warning: $MLX_OPENELM_BLAS=/nonexistent.so: no such file; using {blas.BUNDLED} (slow)" in \
        result.stderr.splitlines()
    assert "Traceback" not in result.stderr
