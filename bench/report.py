"""Turning benchmark rows into a table, JSON, CSV and a plot. No MLX here."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional, Sequence


RATE_KEYS = ("prompt_tps", "generation_tps", "total_tps")
TRIAL_KEYS = ("prompt_tps", "generation_tps", "total_tps", "peak_memory_gb", "ttft_s", "generation_s", "bandwidth_gbs")


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _range(row: dict, key: str, digits: int = 1) -> str:
    lo, hi = row.get(f"{key}_min"), row.get(f"{key}_max")
    if lo is None or hi is None or row.get("num_trials", 0) < 2:
        return _fmt(row.get(key), digits)
    return f"{_fmt(row.get(key), digits)} ({_fmt(lo, digits)}-{_fmt(hi, digits)})"


def weights_label(row: dict) -> str:
    if row.get("quantized"):
        return f"q{row['bits']}/g{row['group_size']}"
    return row["dtype"]


def engine_label(row: dict) -> str:
    return row["engine"] + (f" [{row['variant']}]" if row.get("variant") else "")


def render_table(headers: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """Aligned columns: text left, numbers right."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]

    def numeric(text: str) -> bool:
        return bool(text) and (text[0].isdigit() or text[0] in "-x") and text not in ("-",) and not text[0].isalpha()

    def fmt_line(cells):
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if i >= 3 and numeric(cell) else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_line(headers), sep, *(fmt_line(line) for line in lines)])


def results_table(rows: Sequence[dict]) -> str:
    headers = ["model", "weights", "engine", "prompt", "gen", "prompt tok/s", "gen tok/s", "total tok/s",
               "peak GB", "GB/s", "% peak BW"]
    lines = []
    for row in rows:
        share = row.get("bandwidth_share")
        lines.append([
            row["model"], weights_label(row), engine_label(row), str(row["prompt_tokens"]),
            str(row["generation_tokens"]), _range(row, "prompt_tps"), _range(row, "generation_tps"),
            _range(row, "total_tps"), _fmt(row.get("peak_memory_gb"), 3), _fmt(row.get("bandwidth_gbs"), 1),
            "" if share is None else f"{100 * share:.0f}%",
        ])
    if any("acceptance_rate" in row for row in rows):
        headers += ["accepted", "passes/tok"]
        for line, row in zip(lines, rows):
            line += _speculative_cells(row)
    return render_table(headers, lines)


def protocol_table(settings: Sequence[tuple[str, str, str]], title: str) -> str:
    """`title` over (setting, the protocol's value, this run's value) lines."""
    return title + "\n" + render_table(["setting", "protocol", "this run"], [list(line) for line in settings])


def reference_table(pairs: Sequence[dict], source: str) -> str:
    """Our medians beside a reference's figures (from `paper.compare_rows`), with ours/reference."""
    names = {"prompt_tps": "prompt tok/s", "generation_tps": "generation tok/s", "total_tps": "total tok/s"}
    lines = []
    for pair in pairs:
        row, ref = pair["row"], pair["reference"]
        for key, name in names.items():
            if key in ref:
                ours = row.get(key)
                ratio = f"x{ours / ref[key]:.2f}" if ours else "-"
                lines.append([row["model"], weights_label(row), name, _fmt(ours), _fmt(ref[key]), ratio])
    headers = ["model", "weights", "metric", "this run", "reference", "this run / reference"]
    return f"Beside {source}:\n" + render_table(headers, lines)


def _speculative_cells(row: dict) -> list[str]:
    """Acceptance rate and target passes per generated token (blank for plain decoding)."""
    if "acceptance_rate" not in row:
        return ["", ""]
    rate = row["acceptance_rate"]
    return ["-" if rate is None else f"{100 * rate:.0f}%", _fmt(row.get("target_passes_per_token"), 2)]


def ratio_table(ratios: Sequence[dict], title: str) -> str:
    """`title` over the per-configuration ratios (numerator / denominator) of each column."""
    headers = ["model", "weights", "ratio", "prompt tok/s", "gen tok/s", "total tok/s", "peak GB"]
    lines = []
    for r in ratios:
        cells = ["-" if r.get(key) is None else f"x{r[key]:.2f}" for key in (*RATE_KEYS, "peak_memory_gb")]
        lines.append([r["model"], weights_label(r), f"{r['numerator']} / {r['denominator']}", *cells])
    if any("acceptance_rate" in r for r in ratios):
        headers += ["accepted", "passes/tok"]
        for line, r in zip(lines, ratios):
            line += _speculative_cells(r)
    return title + "\n" + render_table(headers, lines)


# ---- files ----------------------------------------------------------------------------

def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, document: dict) -> None:
    Path(path).write_text(json.dumps(_clean(document), indent=2) + "\n")


CSV_FIELDS = ["engine", "variant", "model", "bits", "group_size", "dtype", "prompt_tokens", "generation_tokens",
              "trial", *TRIAL_KEYS]


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """One line per trial."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            for i, trial in enumerate(row["trials"], start=1):
                line = {k: row.get(k) for k in CSV_FIELDS[:8]}
                line["group_size"] = row.get("group_size") if row.get("quantized") else ""
                line["trial"] = i
                line.update({k: _clean(trial.get(k)) for k in TRIAL_KEYS})
                writer.writerow(line)


def write_plot(path: Path, rows: Sequence[dict], title: Optional[str] = None) -> None:
    """Bars of generation tok/s per configuration (median, min-max whiskers), one bar per engine."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "--plot needs matplotlib: pip install 'mlx-openelm[plot]'  (or: pip install matplotlib)"
        ) from None

    configs, engines = [], []
    for row in rows:
        config = f"{row['model']}\n{weights_label(row)}\n{row['prompt_tokens']}+{row['generation_tokens']}"
        if config not in configs:
            configs.append(config)
        if engine_label(row) not in engines:
            engines.append(engine_label(row))
    width = 0.8 / max(1, len(engines))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(configs) * max(1, len(engines)) ** 0.5), 4.0))
    for j, engine in enumerate(engines):
        xs, ys, lo, hi = [], [], [], []
        for i, config in enumerate(configs):
            for row in rows:
                label = f"{row['model']}\n{weights_label(row)}\n{row['prompt_tokens']}+{row['generation_tokens']}"
                if label == config and engine_label(row) == engine and row.get("generation_tps"):
                    xs.append(i + (j - (len(engines) - 1) / 2) * width)
                    ys.append(row["generation_tps"])
                    lo.append(row["generation_tps"] - (row.get("generation_tps_min") or row["generation_tps"]))
                    hi.append((row.get("generation_tps_max") or row["generation_tps"]) - row["generation_tps"])
        bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=engine)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(configs)), configs, fontsize=8)
    ax.set_ylabel("generation tok/s (median)")
    ax.set_title(title or "mlx-openelm bench")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
