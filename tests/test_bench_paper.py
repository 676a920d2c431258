"""bench --protocol paper: the protocol's settings beside ours, the paper's figures from a user's file,
and a plot title that names the chip and backend plainly."""

from __future__ import annotations

import json

import pytest

from mlx_openelm.bench.paper import load_reference, machine_title, size_key
from mlx_openelm.errors import ConfigError

from synthetic import BENCH_CONFIG


@pytest.fixture(scope="module")
def preset_270m(tmp_path_factory):
    """A tiny architecture in a folder named like the 270M, so reference rows for 270M match it."""
    folder = tmp_path_factory.mktemp("bench") / "OpenELM-270M-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BENCH_CONFIG))
    return str(folder / "config.json")


def reference_file(tmp_path, rows, source="OpenELM paper, Table 7b (typed in by hand)"):
    path = tmp_path / "paper.json"
    path.write_text(json.dumps({"source": source, "rows": rows}))
    return path


def table_lines(stdout: str, title: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def test_paper_protocol_prints_its_settings_beside_this_runs(preset_270m, invoke_cli):
    result = invoke_cli("bench", "--preset", preset_270m, "--protocol", "paper", "--generation-tokens", 3,
                        "--trials", 1, "--no-warmup", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = "\n".join(table_lines(result.stdout, "Protocol of the OpenELM paper"))
    assert "35 tokens, fixed" in table and "35 tokens, fixed" in table.split("35 tokens, fixed", 1)[1]
    assert "1024" in table and "16-bit, 4-bit" in table and "MLX on the CPU" in table
    generated = next(line for line in table.splitlines() if line.startswith("generated tokens"))
    assert generated.split()[-1] == "3"
    warmup = next(line for line in table.splitlines() if line.startswith("warm-up run"))
    assert warmup.split()[-2:] == ["yes", "no"]
    assert "not found" not in result.stdout and "--reference-json" in result.stdout


def test_reference_figures_print_beside_ours_with_the_ratio(preset_270m, tmp_path, invoke_cli):
    path = reference_file(tmp_path, [{"model": "OpenELM-270M", "bits": 16, "generation_tps": 2.0},
                                     {"model": "270M", "bits": 4, "prompt_tps": 5.0, "generation_tps": 4.0},
                                     {"model": "3B", "bits": 16, "generation_tps": 9.0}])
    out = tmp_path / "out.json"
    result = invoke_cli("bench", "--preset", preset_270m, "--protocol", "paper", "--generation-tokens", 3,
                        "--trials", 1, "--no-warmup", "--reference-json", path, "--json", out, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    ours = {(r["bits"]): r for r in doc["rows"]}
    lines = table_lines(result.stdout, "Beside OpenELM paper, Table 7b (typed in by hand)")
    body = [line.split() for line in lines[3:]]
    assert len(body) == 3  # 16-bit generation; 4-bit prompt and generation; nothing for 3B
    gen16 = next(cells for cells in body if cells[1] != "q4/g64" and cells[2] == "generation")
    assert gen16[-2] == "2.0" and gen16[-1] == f"x{ours[None]['generation_tps'] / 2.0:.2f}"
    prompt4 = next(cells for cells in body if cells[1] == "q4/g64" and cells[2] == "prompt")
    assert prompt4[-2] == "5.0" and prompt4[-1] == f"x{ours[4]['prompt_tps'] / 5.0:.2f}"
    assert doc["reference"]["rows"][0] == {"model": "270M", "bits": None, "generation_tps": 2.0}


@pytest.mark.parametrize("content, message", [
    ("not json", "not JSON"),
    ('{"rows": []}', 'expected {"rows"'),
    ('{"rows": [{"model": "7B", "bits": 16, "generation_tps": 1}]}', "rows[0].model must name an OpenELM size"),
    ('{"rows": [{"model": "270M", "bits": 3, "generation_tps": 1}]}', "rows[0].bits must be 16, 8 or 4"),
    ('{"rows": [{"model": "270M", "bits": 4, "generation_tps": -1}]}', "generation_tps must be a positive number"),
    ('{"rows": [{"model": "270M", "bits": 4}]}', "gives none of prompt_tps"),
])
def test_bad_reference_files_are_refused_before_any_work(preset_270m, tmp_path, content, message, invoke_cli):
    path = tmp_path / "ref.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{")):
        load_reference(path)
    result = invoke_cli("bench", "--preset", preset_270m, "--reference-json", str(path))
    assert result.exit_code == 1 and "--reference-json" in result.output and "building" not in result.output


def test_sizes_and_machine_titles_are_plain():
    assert [size_key(x) for x in ("OpenELM-1.1B-Instruct", "1_1B", "openelm-270m", "tiny")] == [
        "1_1B", "1_1B", "270M", None]
    mac = {"cpu": "Apple M2 Max", "chip": "M2 Max", "mlx_device": "Device(gpu, 0)", "os": "macOS-14.4-arm64"}
    assert machine_title(mac) == "Apple M2 Max, MLX on the GPU (Metal)"
    linux = {"cpu": "AMD EPYC 7B13", "chip": None, "mlx_device": "Device(cpu, 0)", "os": "Linux-6.1-x86_64"}
    assert machine_title(linux) == "AMD EPYC 7B13, MLX on the CPU"
    cuda = {"cpu": "Intel Xeon", "chip": None, "mlx_device": "Device(gpu, 0)", "os": "Linux-6.1-x86_64"}
    assert machine_title(cuda) == "Intel Xeon, MLX on the GPU (CUDA)"
