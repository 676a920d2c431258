"""Fault injection for the converter and the loader (issue 8): races for the output folder,
signals at any moment, killed runs, hostile indexes and archives, bad values, failed writes.

Each test builds its bad input itself and checks the message, the exit status, that every
file the user had is byte-identical afterwards, and that no temporary folder remains.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import resource
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mlx_openelm import load_model
from mlx_openelm.convert import convert, pipeline
from mlx_openelm.errors import CheckpointError, ConfigError, TokenizerError
from synthetic import TINY_CONFIG, random_weights, write_hf_checkpoint
from torchzip import corenet_state, write_torch_zip

# Big enough that a conversion takes a second or two, so signals land mid-way.
SLOW_CONFIG = {**TINY_CONFIG, "model_dim": 512, "vocab_size": 8192}
CLI = [sys.executable, "-m", "mlx_openelm.cli", "convert"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its bytes (folders as 'dir')."""
    out = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def temp_folders(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def user_files(tmp_path):
    """A source checkpoint and an unrelated file of the user's beside the output."""
    src = write_hf_checkpoint(tmp_path / "src", TINY_CONFIG, random_weights(TINY_CONFIG, seed=0))
    (tmp_path / "notes.txt").write_text("user data")
    return tmp_path, src


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("slow") / "src", SLOW_CONFIG,
                               random_weights(SLOW_CONFIG, seed=0))


def start(src: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "--hf-path", str(src), "--mlx-path", str(out), "--bits", "4",
                             "--max-shard-size", "200KB", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_temp_folder(parent: Path, process: subprocess.Popen, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = temp_folders(parent)
        if found:
            return found[0]
        if process.poll() is not None:
            pytest.fail(f"conversion ended before its temp folder was seen: {process.stderr.read()}")
        time.sleep(0.005)
    pytest.fail("no temp folder appeared")


# ---- the output folder is claimed atomically ----------------------------------------------------

def test_folder_appearing_while_converting_is_never_replaced(user_files, monkeypatch):
    root, src = user_files
    target = root / "out"
    real = pipeline.write_config

    def someone_creates_the_target(folder, config):
        target.mkdir()
        (target / "theirs.txt").write_text("created meanwhile")
        real(folder, config)

    monkeypatch.setattr(pipeline, "write_config", someone_creates_the_target)
    with pytest.raises(ConfigError, match=r"out appeared while writing .*it was left as it is"):
        convert(src, target, evaluate=False)
    assert snapshot(target) == {"theirs.txt": hashlib.sha256(b"created meanwhile").hexdigest()}
    assert temp_folders(root) == []


@pytest.mark.parametrize("claim", ["renameat2", "mkdir"])
def test_an_empty_folder_appearing_is_not_replaced_either(user_files, monkeypatch, claim):
    # os.rename would silently replace an empty folder; the claim must not (with the system
    # call, or with the portable fallback: an exclusive mkdir, then a rename onto our own folder)
    from mlx_openelm.folder import install

    if claim == "mkdir":
        monkeypatch.setattr(install, "_libc_rename_noreplace", lambda: None)
    root, src = user_files
    target = root / "out"
    real = pipeline.write_config
    monkeypatch.setattr(pipeline, "write_config", lambda folder, config: (target.mkdir(), real(folder, config)))
    with pytest.raises(ConfigError, match="appeared while writing"):
        convert(src, target, evaluate=False)
    assert list(target.iterdir()) == [] and temp_folders(root) == []
    monkeypatch.setattr(pipeline, "write_config", real)
    convert(src, root / "free", evaluate=False)  # the same claim installs when the path is free
    assert load_model(root / "free").args.model_dim == TINY_CONFIG["model_dim"] and temp_folders(root) == []


def test_two_concurrent_converts_into_one_path_exactly_one_wins(user_files, slow_source):
    # the slow source makes the runs overlap, so usually all pass the early check and race to install
    root, _ = user_files
    before = snapshot(root)
    runs = [subprocess.Popen([*CLI, "--hf-path", str(slow_source), "--mlx-path", str(root / "out"), "--no-eval"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(run.wait(timeout=120), run.stdout.read(), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1, 1], results
    for code, _, err in results:
        if code:
            lines = [line for line in err.splitlines() if line.startswith("Error:")]
            assert len(lines) == 1 and ("already exists" in lines[0] or "appeared while writing" in lines[0])
            assert "Traceback" not in err
    assert load_model(root / "out").args.model_dim == SLOW_CONFIG["model_dim"]
    after = snapshot(root)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before
    assert temp_folders(root) == []


# ---- signals and killed runs ---------------------------------------------------------------------

@pytest.mark.parametrize("signum, delay", [
    (signal.SIGTERM, 0.0), (signal.SIGTERM, 0.4), (signal.SIGHUP, 0.1), (signal.SIGINT, 0.2),
])
def test_signals_mid_conversion_remove_the_temp_folder(tmp_path, slow_source, signum, delay):
    (tmp_path / "notes.txt").write_text("user data")
    before = snapshot(tmp_path)
    run = start(slow_source, tmp_path / "out")
    wait_for_temp_folder(tmp_path, run)
    time.sleep(delay)
    run.send_signal(signum)
    code = run.wait(timeout=60)
    err = run.stderr.read()
    assert code == 1, err
    assert f"Error: interrupted ({signal.Signals(signum).name})" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before and temp_folders(tmp_path) == []


def test_a_second_signal_does_not_interrupt_the_cleanup(tmp_path, slow_source):
    run = start(slow_source, tmp_path / "out")
    wait_for_temp_folder(tmp_path, run)
    time.sleep(0.2)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        run.send_signal(signum)
    code = run.wait(timeout=60)
    err = run.stderr.read()
    assert code == 1 and "interrupted" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


class SignalAt:
    """A trace function that sends this process SIGINT at its `at`-th moment (None: never), counting
    each call and line from the conversion's first step on the output (`make_parents`) on.
    `moments` lists each moment's (event: call, resume or line; file; function). Python runs a pending signal's handler at
    function entries (calls) and loop ends; sent from here, the handler runs as the trace function
    returns, so at the moment's own place: lines are a finer grid than Python's."""

    def __init__(self, at=None):
        self.at, self.moments, self.armed = at, [], False

    def __call__(self, frame, event, arg):
        self.armed = self.armed or frame.f_code.co_name == "make_parents"
        if not self.armed:
            return None  # no line events in this frame
        if event in ("call", "line"):
            if len(self.moments) == self.at:
                signal.raise_signal(signal.SIGINT)
            if event == "call" and frame.f_code.co_flags & inspect.CO_GENERATOR:
                event = "resume"  # a generator resumed (a throw into it, say: where Python runs no handler)
            self.moments.append((event, Path(frame.f_code.co_filename).name, frame.f_code.co_name))
        return self


def convert_with_signal(src: Path, out: Path, at, handlers: str) -> tuple[str, SignalAt]:
    """`convert` with SIGINT sent at moment `at`, as the CLI runs it (`handlers="cli"`: within
    `handle_signals`, SIGINT raises `Interrupted`) or as a library call in a program that left
    Python's own handler (`"python"`: KeyboardInterrupt); returns how it ended: "done",
    "interrupted" or "failed" (a RuntimeError)."""
    from mlx_openelm.signals import handle_signals

    tracer = SignalAt(at)
    try:
        with handle_signals() if handlers == "cli" else contextlib.nullcontext():
            sys.settrace(tracer)
            try:
                convert(src, out, evaluate=False)
            finally:
                sys.settrace(None)
    except KeyboardInterrupt:  # Interrupted too
        return "interrupted", tracer
    except RuntimeError:
        return "failed", tracer
    return "done", tracer


@pytest.mark.parametrize("work, handlers", [("succeeds", "cli"), ("fails", "cli"), ("fails", "python")])
def test_a_signal_at_any_moment_leaves_no_temporary_folder(user_files, monkeypatch, work, handlers):
    """The conversion's own work stubbed (a file written, then config.json or a RuntimeError, as a
    C call failing with a signal on its way does), so that the signal can be sent at each moment of
    what handles the output: the temp folder's creation, the install, the cleanup after an interrupt
    or a failure. With the CLI's handlers: every moment in pipeline.py, install.py, signals.py and contextlib and
    every 50th elsewhere (pathlib, tempfile, ctypes...), and after a failure every moment. With
    Python's own handler (nothing is deferred then), after a failure every call: where Python runs it."""
    root, src = user_files
    source = pipeline.open_sources([src], None, None)  # opened once: a run then takes milliseconds
    monkeypatch.setattr(pipeline, "open_sources", lambda *args: source)

    def write_model(source, folder, *args):
        (folder / "model.safetensors").write_bytes(b"weights")
        return pipeline.ConvertReport(str(folder), [str(src)], "hf", "float16", None, None, None, 0, 16.0, 7, 1,
                                      {}, {}, 0.0, "")

    def finish_folder(folder, *args):
        if work == "fails":
            raise RuntimeError("the work failed")
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(pipeline, "_write_model", write_model)
    monkeypatch.setattr(pipeline, "_finish_folder", finish_folder)
    for calibration in ("a", "b"):  # the second run's moments: caches are warm from then on
        ending, tracer = convert_with_signal(src, root / calibration / "out", None, handlers)
    assert ending == ("done" if work == "succeeds" else "failed")
    failure = [m[1:] for m in tracer.moments].index(("test_faults_convert.py", "finish_folder"))

    def chosen(i, event, file):
        if work == "fails":
            return i >= failure and (handlers == "cli" or event == "call")
        return file in ("pipeline.py", "install.py", "signals.py", "contextlib.py") or i % 50 == 0

    moments = [i for i, (event, file, _) in enumerate(tracer.moments) if chosen(i, event, file)]
    assert len(moments) > 20
    endings = set()
    for at in moments:
        out = root / str(at) / "out"  # one name for every run: the same moments (fnmatch caches its pattern)
        ending, _ = convert_with_signal(src, out, at, handlers)
        endings.add(ending)
        assert temp_folders(root) == [], tracer.moments[at]
        if ending == "done":  # the signal came during the install: the work is done, reported as done
            assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        else:  # and the folder holding it, which the conversion created, is gone too
            assert not out.parent.exists(), tracer.moments[at]
    # after a failure an interrupt that comes once the cleanup is done may go unraised: the failure is
    if work == "succeeds":
        assert endings == {"done", "interrupted"}
    else:
        assert "interrupted" in endings <= {"interrupted", "failed"}


def start_cold(src: Path, out: Path, cache: Path) -> subprocess.Popen:
    """A conversion in its own process group (so a signal to the group is a terminal's Ctrl-C) with an
    empty MLX kernel cache (MLX finds it under TMPDIR), so the first use of a kernel compiles it."""
    cache.mkdir()
    return subprocess.Popen([*CLI, "--hf-path", str(src), "--mlx-path", str(out), "--bits", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(cache)}, start_new_session=True)


def compiling(pid: int) -> bool:
    """Whether `pid` has a child compiling a kernel: `sh -c "g++ ... -shared ..."`, which MLX's CPU
    backend runs with popen (Linux's /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                if b"-shared" in (stat.parent / "cmdline").read_bytes():
                    return True
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return False


def test_ctrl_c_at_the_very_start_leaves_nothing(user_files):
    root, src = user_files
    run = start_cold(src, root / "out", root / "cache")
    os.killpg(run.pid, signal.SIGINT)  # before Python has even set its handlers, or just after
    assert run.wait(timeout=60) in (1, -signal.SIGINT), run.stderr.read()
    assert temp_folders(root) == [] and not (root / "out").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX's CPU backend compiles with a child process; "
                    "seen through /proc")
def test_ctrl_c_while_mlx_compiles_a_kernel_cold_leaves_nothing(user_files):
    """The Ctrl-C also kills the compiler MLX runs, so MLX raises (its kernel is missing) before
    Python runs the signal handler, which then lands just as the cleanup starts: that cleanup must
    still finish. (A Ctrl-C while MLX only checks for the compiler, with system(), is ignored by
    this process, as system() does, and the conversion completes.)"""
    root, src = user_files
    run = start_cold(src, root / "out", root / "cache")
    deadline = time.monotonic() + 60
    while not compiling(run.pid):
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()
        time.sleep(0.002)
    os.killpg(run.pid, signal.SIGINT)
    code, err = run.wait(timeout=60), run.stderr.read()
    assert code == 1 and "Error: interrupted (SIGINT)" in err and "Traceback" not in err, err
    assert temp_folders(root) == [] and not (root / "out").exists()


def test_a_killed_runs_temp_folder_is_no_model_and_is_cleaned_up_later(tmp_path, slow_source):
    run = start(slow_source, tmp_path / "out")
    leftover = wait_for_temp_folder(tmp_path, run)
    time.sleep(0.3)
    run.kill()
    run.wait(timeout=60)
    assert leftover.is_dir()
    assert not (leftover / "config.json").exists()  # written last, just before the rename
    with pytest.raises(CheckpointError, match="unfinished conversion's temporary folder"):
        load_model(leftover)
    convert(slow_source, tmp_path / "out", evaluate=False)  # its writer is dead: removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_runs_temp_folder_is_left_alone(tmp_path, slow_source):
    run = start(slow_source, tmp_path / "a")
    theirs = wait_for_temp_folder(tmp_path, run)
    os.kill(run.pid, signal.SIGSTOP)  # paused, not dead
    try:
        from mlx_openelm.folder.install import remove_stale_temp_folders

        assert remove_stale_temp_folders(tmp_path / "a") == [] and theirs.is_dir()
    finally:
        os.kill(run.pid, signal.SIGTERM)
        os.kill(run.pid, signal.SIGCONT)
    assert run.wait(timeout=60) == 1
    assert temp_folders(tmp_path) == []


# ---- hostile inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", ".."])
def test_index_naming_files_outside_the_folder_is_refused(user_files, shard):
    root, src = user_files
    folder = write_hf_checkpoint(root / "sharded", TINY_CONFIG, random_weights(TINY_CONFIG), shards=2)
    outside = root / "outside.safetensors"
    outside.write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    before = snapshot(root)
    message = rf"weight_map\['{name}'\] names '{shard}', which is not a plain file name in the model folder"
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)
    with pytest.raises(CheckpointError, match=message):
        convert(folder, root / "out")
    assert snapshot(root) == before


def _corenet_file(path: Path, compression=zipfile.ZIP_STORED) -> Path:
    plain = write_torch_zip(path.with_suffix(".plain"), corenet_state(random_weights(TINY_CONFIG)))
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", compression=compression) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    plain.unlink()
    return path


def _run_convert_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_zip_bomb_storage_is_refused_before_it_is_read(tmp_path):
    good = _corenet_file(tmp_path / "good.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/0"):
                data = bytes(64 * 1024 * 1024)  # 64 MB of zeros: ~64 KB deflated
            dst.writestr(info.filename, data)
    assert bomb.stat().st_size < 2 * 1024 * 1024
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    result = _run_convert_cli("--hf-path", bomb, "--config", config, "--mlx-path", tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "storage '0' is 67108864 bytes, the pickle says" in result.stderr
    assert not (tmp_path / "out").exists() and temp_folders(tmp_path) == []


def test_corrupt_storage_crc_is_a_clear_error(tmp_path):
    path = _corenet_file(tmp_path / "crc.pt")
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("archive/data/3")
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    start_of_data = header + 30 + int.from_bytes(raw[header + 26:header + 28], "little") \
        + int.from_bytes(raw[header + 28:header + 30], "little")
    raw[start_of_data + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    result = _run_convert_cli("--hf-path", path, "--config", config, "--mlx-path", tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "storage '3' is corrupt (Bad CRC-32" in result.stderr
    assert not (tmp_path / "out").exists() and temp_folders(tmp_path) == []


@pytest.mark.parametrize("value, message", [
    (np.nan, "holds NaN or infinite values"), (np.inf, "holds NaN or infinite values"),
    (1e6, "overflows mlx.core.float16"),
])
def test_non_finite_weights_are_refused_by_the_converter(user_files, value, message):
    root, _ = user_files
    weights = random_weights(TINY_CONFIG)
    weights["transformer.layers.2.attn.out_proj.weight"][0, 0] = value
    src = write_hf_checkpoint(root / "bad", TINY_CONFIG, weights)
    before = snapshot(root)
    with pytest.raises(CheckpointError, match=rf"tensor 'transformer.layers.2.attn.out_proj.weight' {message}"):
        convert(src, root / "out", dtype="float16")
    assert snapshot(root) == before and temp_folders(root) == []


# ---- failed writes -------------------------------------------------------------------------------

def test_unwritable_destination_fails_before_any_work(user_files):
    root, src = user_files
    result = _run_convert_cli("--hf-path", src, "--mlx-path", "/proc/mlx-openelm-out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Error: --mlx-path: cannot write into /proc" in result.stderr
    assert "converting" not in result.stderr  # refused before the first tensor


def test_disk_full_is_a_one_line_error_and_leaves_nothing(user_files):
    root, src = user_files
    before = snapshot(root)

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of a kill

    result = subprocess.run([*CLI, "--hf-path", str(src), "--mlx-path", str(root / "out"), "--dtype", "float32"],
                            capture_output=True, text=True, timeout=120, preexec_fn=small_disk)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot write" in errors[0] and str(root) in errors[0], result.stderr
    assert snapshot(root) == before and temp_folders(root) == []


@pytest.mark.parametrize("kind", ["file", "fifo", "link to a file"])
def test_force_never_replaces_something_that_is_not_a_folder(user_files, kind):
    """--force replaces an output folder; as root, `--mlx-path /dev/null --force` would otherwise delete the device."""
    root, src = user_files
    target = root / "target"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "file":
        target.write_text("the user's file")
    else:
        target.symlink_to(root / "notes.txt")
    before = snapshot(root) if kind != "fifo" else None
    with pytest.raises(ConfigError) as info:
        convert(src, target, force=True, evaluate=False)
    assert str(info.value) == f"mlx_path: {target} exists and is not a folder; `force=True` only replaces a folder"
    assert temp_folders(root) == [] and (target.is_fifo() if kind == "fifo" else snapshot(root) == before)


def test_a_tokenizer_that_cannot_be_read_is_refused_before_any_work_naming_the_users_file(user_files):
    root, src = user_files
    before = snapshot(root)
    bad = src / "config.json"  # JSON, so read as a tokenizer.json, but not one
    with pytest.raises(TokenizerError) as info:
        convert(src, root / "out", tokenizer=bad, evaluate=False)
    assert str(info.value).startswith(f"{bad}: not a tokenizer.json")  # not a file in the temp folder
    assert snapshot(root) == before and temp_folders(root) == []


def test_average_given_one_path_instead_of_a_list_is_a_type_error_not_a_read_of_slash(user_files):
    root, src = user_files
    with pytest.raises(TypeError, match="average must be a list of checkpoints, got str"):
        convert(average=str(src), mlx_path=root / "out", evaluate=False)
