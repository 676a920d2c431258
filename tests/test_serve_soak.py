"""`python -m mlx_openelm.bench.serve_soak` with tiny numbers: a real server process, every kind of
request, and counters that agree with each other."""

from __future__ import annotations

import json

import pytest

from mlx_openelm.bench.serve_soak import COLUMNS, main


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory, tiny_config):
    path = tmp_path_factory.mktemp("soak") / "config.json"
    path.write_text(json.dumps(tiny_config))
    return path


def test_the_load_tool_reports_consistent_counters(tiny_config_file, tokenizer_path, capsys):
    main(["--preset", str(tiny_config_file), "--tokenizer", str(tokenizer_path), "--clients", "1,3",
          "--seconds", "1.5", "--soak-requests", "40", "--soak-clients", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["server_exit"] == 0
    phases = result["phases"] + [result["soak"]]
    assert [p["clients"] for p in phases] == [1, 3, 3]
    assert result["soak"]["requests"] == 40 and result["soak"]["left_running"] == 0
    for phase in phases:
        assert set(COLUMNS) <= set(phase)
        assert phase["errors"] == 0, phase["error_samples"]
        assert phase["deliberate_errors"] == phase["deliberate_sent"]
        assert phase["requests"] == phase["completed"] + phase["disconnects"] + phase["deliberate_errors"]
        assert phase["spot_equal"] == phase["spot_checks"]
        assert phase["tokens"] > 0 and phase["tokens_per_s"] > 0
        assert 0 < phase["ttft_ms_p50"] <= phase["ttft_ms_p99"] and 0 < phase["itl_ms_p50"] <= phase["itl_ms_p99"]
    assert sum(p["spot_checks"] for p in phases) > 0 and sum(p["deliberate_sent"] for p in phases) > 0
    assert sum(p["disconnects"] for p in phases) > 0
    soak = result["soak"]
    assert 0 < soak["rss_start_mb"] and soak["rss_growth_mb"] == pytest.approx(soak["rss_end_mb"] - soak["rss_start_mb"], abs=0.2)
    assert soak["rss_ok"] == (soak["rss_growth_mb"] <= result["rss_growth_bound_mb"])


def test_the_table_names_every_column(tiny_config_file, tokenizer_path, capsys):
    main(["--preset", str(tiny_config_file), "--tokenizer", str(tokenizer_path), "--clients", "2",
          "--seconds", "0.5", "--soak-requests", "5", "--soak-clients", "1", "--spot-prompts", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == COLUMNS and lines[2].split()[:2] == ["soak", "1"]
    assert lines[-1].startswith("server RSS over the soak:") and lines[-1].endswith("checks passed")


@pytest.mark.parametrize("args, message", [
    (["--clients", "0"], "must be positive"),
    (["--preset", "nope"], "unknown preset 'nope'"),
])
def test_bad_arguments_are_usage_errors(tokenizer_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["--tokenizer", str(tokenizer_path), *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and message in err.strip().splitlines()[-1]
