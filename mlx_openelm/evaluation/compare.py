"""A model's task accuracy against a reference (e.g. a quantized model against its float original),
paired item by item: the same items, so the differences' spread, not each accuracy's, sets the error.

It reads lm-eval's logged samples (`log_samples=True`): per item its `doc_id`, the per-item metric
values (`acc`, `acc_norm`, ...), `target` (the gold choice's index) and `filtered_resps`, one
(log-likelihood, is_greedy) per choice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence


@dataclass
class PairedResult:
    task: str
    metric: str
    items: int
    model: float  # the metric's mean on the model
    reference: float  # and on the reference
    difference: float  # model - reference
    stderr: float  # standard error of the paired difference
    changed: Optional[float]  # share of items whose chosen answer differs
    gold_logprob_change: Optional[float]  # mean change in the gold answer's log-likelihood (nats)

    def to_dict(self) -> dict:
        return asdict(self)


def paired_stderr(differences: Sequence[float]) -> float:
    """Standard error of the mean of per-item differences (sample standard deviation / sqrt(n))."""
    n = len(differences)
    if n < 2:
        return float("nan")
    mean = sum(differences) / n
    return math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1) / n)


def _choice_logprobs(sample: dict) -> Optional[list[float]]:
    responses = sample.get("filtered_resps")
    if not isinstance(responses, list) or not responses:
        return None
    try:
        return [float(r[0] if isinstance(r, (list, tuple)) else r) for r in responses]
    except (TypeError, ValueError, IndexError):
        return None


def compare_samples(task: str, metric: str, model_samples: list[dict], reference_samples: list[dict]
                    ) -> Optional[PairedResult]:
    """The paired comparison of one task's metric; None when the samples do not carry it."""
    reference = {s["doc_id"]: s for s in reference_samples}
    pairs = [(s, reference[s["doc_id"]]) for s in model_samples if s["doc_id"] in reference]
    pairs = [(a, b) for a, b in pairs if isinstance(a.get(metric), (int, float)) and
             isinstance(b.get(metric), (int, float))]
    if not pairs:
        return None
    differences = [float(a[metric]) - float(b[metric]) for a, b in pairs]
    changed, gold = [], []
    for a, b in pairs:
        la, lb = _choice_logprobs(a), _choice_logprobs(b)
        if la is None or lb is None or len(la) != len(lb) or len(la) < 2:
            continue
        changed.append(max(range(len(la)), key=la.__getitem__) != max(range(len(lb)), key=lb.__getitem__))
        target = a.get("target")
        if isinstance(target, int) and 0 <= target < len(la):
            gold.append(la[target] - lb[target])
    n = len(pairs)
    return PairedResult(
        task=task, metric=metric, items=n,
        model=sum(float(a[metric]) for a, _ in pairs) / n,
        reference=sum(float(b[metric]) for _, b in pairs) / n,
        difference=sum(differences) / n, stderr=paired_stderr(differences),
        changed=sum(changed) / len(changed) if changed else None,
        gold_logprob_change=sum(gold) / len(gold) if gold else None,
    )
