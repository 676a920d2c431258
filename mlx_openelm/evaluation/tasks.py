"""The OpenELM paper's task sets, Apple's published numbers, and checks on task names and task files.

Apple evaluated with lm-eval at commit dc90fec (2024-03), `add_bos_token=True`, in four runs that
differ in shots; each preset here runs the tasks of one published table with their shots, grouped
into one lm-eval run per shot count. The numbers are the tables of the apple/OpenELM model cards
(the card's "LLM360" heading holds the paper's OpenLLM set, and its "OpenLLM Leaderboard" heading
the paper's LLM360 set plus TruthfulQA: the presets follow the paper). The metric per task is the
one the paper reports (acc_norm for ARC, HellaSwag, PIQA; pct_stereotype for CrowS-Pairs; mc2,
lm-eval's `acc` of truthfulqa_mc2, for TruthfulQA; acc elsewhere). Nothing here imports lm_eval.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import NamedTuple, Optional

from ..errors import OptionError


class PresetTask(NamedTuple):
    task: str
    shots: int
    metric: str


PRESETS: dict[str, tuple[PresetTask, ...]] = {
    "paper-zeroshot": tuple(PresetTask(t, 0, m) for t, m in [
        ("arc_challenge", "acc_norm"), ("arc_easy", "acc_norm"), ("boolq", "acc"), ("hellaswag", "acc_norm"),
        ("piqa", "acc_norm"), ("sciq", "acc"), ("winogrande", "acc")]),
    "paper-openllm": (PresetTask("arc_challenge", 25, "acc_norm"), PresetTask("hellaswag", 10, "acc_norm"),
                      PresetTask("mmlu", 5, "acc"), PresetTask("truthfulqa_mc2", 0, "acc"),
                      PresetTask("winogrande", 5, "acc")),
    "paper-llm360": (PresetTask("arc_challenge", 25, "acc_norm"), PresetTask("crows_pairs_english", 25,
                                                                             "pct_stereotype"),
                     PresetTask("hellaswag", 10, "acc_norm"), PresetTask("mmlu", 5, "acc"),
                     PresetTask("piqa", 0, "acc_norm"), PresetTask("race", 0, "acc"),
                     PresetTask("truthfulqa_mc2", 0, "acc"), PresetTask("winogrande", 5, "acc")),
}

# lm-eval changed these tasks since dc90fec (the version Apple ran): its numbers can move.
CHANGED_SINCE_PAPER = {
    "mmlu": "MMLU moved from hails/mmlu_no_train to cais/mmlu (lm-eval PR #2918, task version 1.0)",
    "race": "RACE's few-shot rendering changed (lm-eval PR #3716, task version 3.0)",
    "truthfulqa_mc2": "TruthfulQA-mc2's scoring was rewritten (lm-eval PR #2768; equal when true labels come first)",
}

# %, in each preset's task order (apple/OpenELM model cards, "Evaluation").
PUBLISHED: dict[str, dict[str, tuple[float, ...]]] = {
    "OpenELM-270M": {"paper-zeroshot": (26.45, 45.08, 53.98, 46.71, 69.75, 84.70, 53.91),
                     "paper-openllm": (27.65, 47.15, 25.72, 39.24, 53.83),
                     "paper-llm360": (27.65, 66.79, 47.15, 25.72, 69.75, 30.91, 39.24, 53.83)},
    "OpenELM-270M-Instruct": {"paper-zeroshot": (30.55, 46.68, 48.56, 52.07, 70.78, 84.40, 52.72),
                              "paper-openllm": (32.51, 51.58, 26.70, 38.72, 53.20),
                              "paper-llm360": (32.51, 66.01, 51.58, 26.70, 70.78, 33.78, 38.72, 53.20)},
    "OpenELM-450M": {"paper-zeroshot": (27.56, 48.06, 55.78, 53.97, 72.31, 87.20, 58.01),
                     "paper-openllm": (30.20, 53.86, 26.01, 40.18, 57.22),
                     "paper-llm360": (30.20, 68.63, 53.86, 26.01, 72.31, 33.11, 40.18, 57.22)},
    "OpenELM-450M-Instruct": {"paper-zeroshot": (30.38, 50.00, 60.37, 59.34, 72.63, 88.00, 58.96),
                              "paper-openllm": (33.53, 59.31, 25.41, 40.48, 58.33),
                              "paper-llm360": (33.53, 67.44, 59.31, 25.41, 72.63, 36.84, 40.48, 58.33)},
    "OpenELM-1_1B": {"paper-zeroshot": (32.34, 55.43, 63.58, 64.81, 75.57, 90.60, 61.72),
                     "paper-openllm": (36.69, 65.71, 27.05, 36.98, 63.22),
                     "paper-llm360": (36.69, 71.74, 65.71, 27.05, 75.57, 36.46, 36.98, 63.22)},
    "OpenELM-1_1B-Instruct": {"paper-zeroshot": (37.97, 52.23, 70.00, 71.20, 75.03, 89.30, 62.75),
                              "paper-openllm": (41.55, 71.83, 25.65, 45.95, 64.72),
                              "paper-llm360": (41.55, 71.02, 71.83, 25.65, 75.03, 39.43, 45.95, 64.72)},
    "OpenELM-3B": {"paper-zeroshot": (35.58, 59.89, 67.40, 72.44, 78.24, 92.70, 65.51),
                   "paper-openllm": (42.24, 73.28, 26.76, 34.98, 67.25),
                   "paper-llm360": (42.24, 73.29, 73.28, 26.76, 78.24, 38.76, 34.98, 67.25)},
    "OpenELM-3B-Instruct": {"paper-zeroshot": (39.42, 61.74, 68.17, 76.36, 79.00, 92.50, 66.85),
                            "paper-openllm": (47.70, 76.87, 24.80, 38.76, 67.96),
                            "paper-llm360": (47.70, 72.33, 76.87, 24.80, 79.00, 38.47, 38.76, 67.96)},
}
PUBLISHED_MODELS = tuple(PUBLISHED)


def check_published(name: Optional[str]) -> Optional[str]:
    """One of the eight published checkpoints' names (case-insensitive), or None."""
    if name is None:
        return None
    for model in PUBLISHED_MODELS:
        if name.lower() in (model.lower(), model.lower().removeprefix("openelm-")):
            return model
    raise OptionError(f"no published numbers for {name!r}; choose one of {', '.join(PUBLISHED_MODELS)}")


def published_model(args) -> Optional[str]:
    """The base checkpoint whose architecture `args` (a ModelArgs) has, by config values, else None.

    Base and Instruct checkpoints share an architecture: the base one is named; pass the Instruct
    name explicitly for an Instruct model.
    """
    from ..config import PRESET_NAMES, preset_args

    def shape(a):
        return (a.model_dim, a.head_dim, a.num_transformer_layers, tuple(a.num_query_heads),
                tuple(a.num_kv_heads), tuple(a.ffn_dims), a.ffn_with_glu, a.normalize_qk_projections)

    for size in PRESET_NAMES:
        if shape(preset_args(size)) == shape(args) and f"OpenELM-{size}" in PUBLISHED:
            return f"OpenELM-{size}"
    return None


def parse_tasks(text: str) -> tuple[list[str], Optional[str]]:
    """`--tasks` as (task names, preset name or None): a preset alone, or comma-separated task names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise OptionError("tasks: name at least one task (comma-separated) or a preset: " + ", ".join(PRESETS))
    presets = [name for name in names if name in PRESETS]
    if presets and len(names) > 1:
        raise OptionError(f"tasks: the preset {presets[0]} runs alone, not with other tasks")
    if presets:
        return [t.task for t in PRESETS[presets[0]]], presets[0]
    return names, None


def check_task_names(names: list[str], known: list[str]) -> None:
    """Refuse a task name lm-eval does not know, listing close names."""
    for name in names:
        if name not in known and not any(ch in name for ch in "*?["):
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else "; `lm-eval ls tasks` lists them"
            raise OptionError(f"unknown task {name!r}{hint}")


def check_task_files(folder: str) -> None:
    """Parse each task YAML under `folder` and the JSON-lines data files they name: a malformed one is
    an error naming the file and line (lm-eval itself would skip or fail on it with a traceback)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # lm-eval's !function tags
    for path in sorted(Path(folder).rglob("*.yaml")):
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise OptionError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(config, dict):
            raise OptionError(f"{path}:1: a task file must be a YAML mapping (task:, dataset_path:, ...)")
        files = ((config.get("dataset_kwargs") or {}).get("data_files") or {})
        for data in (files.values() if isinstance(files, dict) else [files]):
            for name in ([data] if isinstance(data, str) else list(data or [])):
                if str(name).endswith(".jsonl") and config.get("dataset_path") == "json":
                    _check_jsonl(path, Path(name) if Path(name).is_absolute() else Path.cwd() / name)


def _check_jsonl(task_file: Path, data: Path) -> None:
    if not data.is_file():
        raise OptionError(f"{task_file}: its data file {data} does not exist (relative paths are read from the "
                          f"current folder)")
    with open(data, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    raise OptionError(f"{data}:{number}: not a JSON object ({e})") from None
