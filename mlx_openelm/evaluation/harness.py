"""Running lm-eval tasks on an mlx-openelm model: one lm-eval run per shot count, results per task.

lm-eval (the optional `eval` extra) is imported here only when a run starts. Task data sets come
from the Hugging Face Hub through `datasets` (cached after the first download), or from local task
files in an include folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ..errors import OpenELMError, OptionError
from .tasks import check_task_files, check_task_names

INSTALL_HINT = 'task evaluation needs lm-eval: pip install "mlx-openelm[eval]"'


class TaskDataError(OpenELMError):
    """A task whose data set cannot be loaded (offline, not yet downloaded, or a bad local file)."""


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise OptionError(INSTALL_HINT) from None
    return lm_eval


@dataclass
class TaskRun:
    """lm-eval's results, by task: `metrics[task]` ({"acc,none": ..., ...}), `shots[task]`, `samples[task]`."""

    metrics: dict = field(default_factory=dict)
    shots: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)


def task_manager(names: list[str], include_path: Optional[str] = None):
    """lm-eval's TaskManager; only the include folder's tasks (fast) when it holds every named task."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        check_task_files(include_path)
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = TaskManager(include_path=include_path)
    check_task_names(names, list(manager.all_tasks))
    return manager


def run_tasks(lm, shots: dict[str, Optional[int]], include_path: Optional[str] = None, limit=None,
              seed: int = 1234, use_cache: Optional[str] = None, log_samples: bool = False,
              manager=None, done: Optional[TaskRun] = None) -> TaskRun:
    """Run `shots` ({task: shots, None for the task's default}) on the lm-eval LM `lm`, one lm-eval run per
    shot count; the few-shot examples are drawn with `seed` (1234, lm-eval's and Apple's). Results collect
    into `done` as each run finishes (a caller interrupted part way keeps the finished runs)."""
    lm_eval = require_lm_eval()
    manager = manager or task_manager(list(shots), include_path)
    run = done if done is not None else TaskRun()
    for count in sorted(set(shots.values()), key=lambda c: -1 if c is None else c):
        names = [name for name, c in shots.items() if c == count]
        try:
            result = lm_eval.simple_evaluate(
                model=lm, tasks=names, num_fewshot=count, limit=limit, task_manager=manager, use_cache=use_cache,
                log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed, bootstrap_iters=1000)
        except (ConnectionError, OSError, ValueError) as e:
            raise _data_error(names, e) from None
        for name, metrics in result["results"].items():
            run.metrics[name] = metrics
            run.shots[name] = result.get("n-shot", {}).get(name, count)
            run.versions[name] = result.get("versions", {}).get(name)
        for name, samples in (result.get("samples") or {}).items():
            run.samples[name] = samples
    return run


def _data_error(names: list[str], error: Exception) -> Exception:
    """The error of a run that could not load its data, said plainly; other errors as they are."""
    text = str(error)
    kind = type(error).__module__.split(".")[0]
    offline = kind in ("datasets", "huggingface_hub", "requests", "urllib3") or isinstance(error, ConnectionError) \
        or re.search(r"offline|Couldn't reach|Connection|not find|No such|Unable to find", text, re.I)
    if not offline:
        return error
    dataset = re.search(r"'([\w.-]+/[\w.-]+)'", text)
    which = f" (data set {dataset.group(1)})" if dataset else ""
    return TaskDataError(
        f"task(s) {', '.join(names)}: the data{which} could not be loaded: {text.splitlines()[0] if text else error!r}. "
        f"Download it once while online (`datasets` caches it; e.g. `hf download --repo-type dataset NAME`), "
        f"or point a local task file at your own copy through an include folder")
