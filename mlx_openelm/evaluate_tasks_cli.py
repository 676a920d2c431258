"""`mlx-openelm eval --tasks`: lm-eval tasks on a model (and paired against a reference), as tables or JSON.

The options live here and `evaluate_cli.py`'s command hands `--tasks` runs to `run_task_command`.
lm-eval and MLX are imported only when a run starts.
"""

from __future__ import annotations

import json
import sys
import time

import click

from .cli_common import apply_options, load_model_and_tokenizer, note

# metrics lm-eval reports that are not scores
_NOT_METRICS = {"alias", "name", "sample_len", "sample_count"}


def task_options(fn):
    """The `--tasks` options of `eval`."""
    return apply_options([
        click.option("--tasks", default=None, metavar="NAMES",
                     help="Comma-separated lm-eval tasks (arc_easy,hellaswag,...), or a preset of the OpenELM "
                          "paper: paper-zeroshot, paper-openllm, paper-llm360 (Apple's shots per task). Needs "
                          'pip install "mlx-openelm[eval]".'),
        click.option("--num-fewshot", type=click.IntRange(min=0), default=None,
                     help="Few-shot examples per item (default: the task's; presets set their own)."),
        click.option("--limit", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Only the first N items of each task (a fraction below 1: that share)."),
        click.option("--include-path", type=click.Path(exists=True, file_okay=False), default=None, metavar="DIR",
                     help="Folder of lm-eval task YAML files (e.g. tasks over local JSONL or arrow data)."),
        click.option("--seed", type=int, default=1234, show_default=True,
                     help="Seed of the few-shot sampling (1234: lm-eval's and Apple's)."),
        click.option("--batch-size", default="auto", show_default=True,
                     help="Rows per forward pass, or auto (about 8192 tokens per pass); bounds memory."),
        click.option("--prefix-sharing/--no-prefix-sharing", default=True, show_default=True,
                     help="Read a context shared by several answers once (off: every answer reads it again; "
                          "the same numbers to float rounding)."),
        click.option("--empty-context", type=click.Choice(["eos", "bos"]), default="eos", show_default=True,
                     help="The token an empty context becomes: eos (the lm-eval Apple ran) or bos (today's)."),
        click.option("--use-cache", default=None, metavar="PATH",
                     help="lm-eval's response cache (SQLite): answers already scored are read from it."),
        click.option("--published", default=None, metavar="NAME",
                     help="Compare a preset with this checkpoint's published numbers (e.g. OpenELM-270M-Instruct; "
                          "default: the checkpoint whose architecture config.json matches, base version)."),
    ], fn)


class ProgressLine:
    """`scoring: 1,234/4,000 requests, 56.1/s, ETA 0:49` on stderr, redrawn at most twice a second."""

    def __init__(self, quiet: bool):
        self.quiet, self.start, self.shown = quiet, time.perf_counter(), 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == 0:  # a run starts: its rate counts from here
            self.start = now
        if self.quiet or (now - self.shown < 0.5 and done < total):
            return
        self.shown = now
        rate = done / max(now - self.start, 1e-9)
        eta = int((total - done) / rate) if rate > 0 else 0
        click.echo(f"\rscoring: {done:,}/{total:,} requests, {rate:.1f}/s, ETA {eta // 60}:{eta % 60:02d}  ",
                   err=True, nl=done >= total)


def _load_lm(model_path, tokenizer_path, dtype, adapter_path, quiet, options, progress):
    from .evaluation.lm_eval_backend import OpenELMLM

    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype, quiet=quiet,
                                                adapter_path=adapter_path)
    return OpenELMLM(model, tokenizer, pretrained=model_path, progress=progress, **options)


def run_task_command(model_path, tokenizer_path, dtype, adapter_path, reference_path, as_json, tasks, num_fewshot,
                     limit, include_path, seed, batch_size, prefix_sharing, empty_context, use_cache, published):
    """Run `--tasks` on the model (and the reference) and print the tables or the JSON."""
    import logging

    from .evaluation.harness import require_lm_eval, task_manager
    from .evaluation.scoring import check_batch_size
    from .evaluation.tasks import PRESETS, check_published, parse_tasks, published_model

    require_lm_eval()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    names, preset = parse_tasks(tasks)
    shots = {t.task: t.shots for t in PRESETS[preset]} if preset else {name: num_fewshot for name in names}
    options = {"batch_size": check_batch_size(batch_size), "share_prefixes": prefix_sharing,
               "empty_context": empty_context}
    published = check_published(published)
    limit = int(limit) if limit is not None and limit >= 1 else limit
    manager = task_manager(names, include_path)
    progress = ProgressLine(quiet=as_json)
    lm = _load_lm(model_path, tokenizer_path, dtype, adapter_path, as_json, options, progress)
    if preset and published is None:
        published = published_model(lm.model.args)
    run_options = {"limit": limit, "seed": seed, "use_cache": use_cache, "log_samples": reference_path is not None,
                   "manager": manager}
    run = _run_or_report(lm, shots, run_options, names, as_json, "--model")
    report = {"tasks": _task_rows(run, names), "truncated": lm.truncated, "requests": lm.scored,
              "changed_since_paper": _changed(names)}
    if preset:
        report["published"] = _published_rows(run, preset, published)
    if reference_path is not None:
        if not as_json:
            note(f"Loading reference {reference_path} ...")
        reference = _load_lm(reference_path, tokenizer_path, "float32", None, True, options, progress)
        reference_run = _run_or_report(reference, shots, run_options, names, as_json, "--reference")
        report["reference"] = _paired_rows(run, reference_run, names)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report, preset, published))


def _run_or_report(lm, shots, run_options, names, as_json, which):
    """`run_tasks`; on Ctrl-C, print the tasks that finished and how many requests were scored, exit 130."""
    from .evaluation.harness import TaskRun, run_tasks

    run = TaskRun()
    try:
        return run_tasks(lm, shots, done=run, **run_options)
    except KeyboardInterrupt:
        click.echo("", err=True)
        finished = _task_rows(run, names)
        if finished:
            click.echo(format_tasks(finished))
        click.echo(f"interrupted ({which}): {len(finished)} task(s) finished, {lm.scored:,} requests scored",
                   err=True)
        sys.exit(130)


def _metrics(values: dict) -> dict:
    """{"acc": (value, stderr), ...} from lm-eval's "acc,none" / "acc_stderr,none" keys."""
    out = {}
    for key, value in values.items():
        metric, _, _filter = key.partition(",")
        if metric in _NOT_METRICS or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = values.get(key.replace(metric, f"{metric}_stderr", 1))
        out[metric] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return out


def _task_rows(run, names) -> dict:
    shown = [name for name in names if name in run.metrics] or sorted(run.metrics)
    return {name: {"shots": run.shots.get(name), "version": run.versions.get(name),
                   "metrics": _metrics(run.metrics[name])} for name in shown}


def _changed(names) -> dict:
    from .evaluation.tasks import CHANGED_SINCE_PAPER

    return {name: why for name, why in CHANGED_SINCE_PAPER.items() if name in names}


def _published_rows(run, preset, published) -> list[dict]:
    from .evaluation.tasks import PRESETS, PUBLISHED

    rows = []
    numbers = PUBLISHED[published][preset] if published else [None] * len(PRESETS[preset])
    for task, number in zip(PRESETS[preset], numbers):
        value, stderr = _metrics(run.metrics.get(task.task, {})).get(task.metric, (None, None))
        ours = None if value is None else 100 * value
        rows.append({"task": task.task, "shots": task.shots, "metric": task.metric, "ours": ours,
                     "stderr": None if stderr is None else 100 * stderr, "published": number,
                     "difference": None if number is None or ours is None else ours - number})
    return rows


def _paired_rows(run, reference_run, names) -> list[dict]:
    from .evaluation.compare import compare_samples

    rows = []
    for name in [n for n in names if n in run.samples] or sorted(run.samples):
        for metric in ("acc", "acc_norm"):
            result = compare_samples(name, metric, run.samples[name], reference_run.samples.get(name, []))
            if result is not None:
                rows.append(result.to_dict())
    return rows


def _pct(value, stderr=None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" + (f" ± {100 * stderr:.2f}" if stderr is not None else "")


def format_tasks(tasks: dict) -> str:
    lines = [f"{'task':<24} {'shots':>5}  metrics (%, ± standard error)"]
    for name, row in tasks.items():
        metrics = ", ".join(f"{m} {_pct(v, s)}" for m, (v, s) in row["metrics"].items())
        lines.append(f"{name:<24} {str(row['shots']):>5}  {metrics}")
    return "\n".join(lines)


def format_report(report: dict, preset, published) -> str:
    """The run as readable tables: every metric per task, the paper's comparison, the paired comparison."""
    parts = [format_tasks(report["tasks"])]
    if preset:
        head = f"published: {published}" if published else "published: (not an OpenELM architecture; see --published)"
        lines = [f"{preset}, the paper's metric per task; {head}",
                 f"{'task':<22} {'shots':>5} {'metric':<15} {'ours':>15} {'published':>9} {'difference':>10}"]
        for r in report["published"]:
            ours = "-" if r["ours"] is None else f"{r['ours']:.2f}" + (f" ± {r['stderr']:.2f}" if r["stderr"] else "")
            pub = "-" if r["published"] is None else f"{r['published']:.2f}"
            diff = "-" if r["difference"] is None else f"{r['difference']:+.2f}"
            lines.append(f"{r['task']:<22} {r['shots']:>5} {r['metric']:<15} {ours:>15} {pub:>9} {diff:>10}")
        parts.append("\n".join(lines))
    for name, why in report["changed_since_paper"].items():
        parts.append(f"note: {name} changed in lm-eval since Apple's run: {why}")
    if "reference" in report:
        lines = [f"{'task':<24} {'metric':<9} {'model':>7} {'reference':>9} {'difference':>18} "
                 f"{'answers changed':>15} {'gold log-lik. change':>20}"]
        for r in report["reference"]:
            changed = "-" if r["changed"] is None else f"{100 * r['changed']:.1f}%"
            gold = "-" if r["gold_logprob_change"] is None else f"{r['gold_logprob_change']:+.4f}"
            lines.append(f"{r['task']:<24} {r['metric']:<9} {100 * r['model']:>7.2f} {100 * r['reference']:>9.2f} "
                         f"{_signed(r['difference'], r['stderr']):>18} {changed:>15} {gold:>20}")
        parts.append("paired against the reference (same items; ± the paired standard error):\n" + "\n".join(lines))
    parts.append(f"{report['requests']:,} requests scored; {report['truncated']:,} truncated to the model's context "
                 f"(left, as lm-eval does)")
    return "\n\n".join(parts)


def _signed(value, stderr) -> str:
    return f"{100 * value:+.2f} ± {100 * stderr:.2f}" if stderr == stderr else f"{100 * value:+.2f}"
