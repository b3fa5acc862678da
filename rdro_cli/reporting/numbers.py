"""report's numbers: finite-value filtering, metric series, the smoothing that plots use (an EMA whose weight
grows with the run's length), the accuracies and the AUC an eval.json records. The AUC itself is computed once,
by `evaluation.scoring.auc`, when eval runs.
"""

from __future__ import annotations

import math
from typing import Any

from rdro_cli.reporting.runs import EvalResult, RunData


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(row.get("step", i + 1), row.get(key)) for i, row in enumerate(rows)]
    points = [(x, y) for x, y in points if finite(x) and finite(y)]
    return [p[0] for p in points], [float(p[1]) for p in points]


def smoothing_weight(n: int) -> float:
    """EMA weight growing with the run's length: light for a handful of steps, ~0.95 for thousands."""
    return min(0.95, max(0.3, 1.0 - 8.0 / max(n, 1)))


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (the first points are not pulled towards zero)."""
    smoothed, average, norm = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        smoothed.append(average / norm)
    return smoothed


def flatten_numbers(body: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], float]]:
    """Numeric leaves of a nested eval.json task as (key path, value); strings and lists are skipped."""
    if isinstance(body, dict):
        return [leaf for key, value in body.items() for leaf in flatten_numbers(value, prefix + (str(key),))]
    return [(prefix, body)] if finite(body) else []


def _is_reference(words: tuple[str, ...]) -> bool:
    return any(w in ("ref", "reference") or w.startswith("ref_") or w.endswith("_ref") for w in words)


_GENERIC = {"accuracy", "acc", "tasks", "per_task", "score"}


def accuracy_metrics(tasks: dict) -> dict[str, float]:
    """The bar-chart numbers of an eval: accuracies and AUCs in [0, 1], one label per number.

    Tolerant of the exact layout: `preference.auc`, `exact_match.accuracy`, `bbh.<task>` or
    `bbh.tasks.<task>.accuracy`, `bbh.mean` all qualify; the reference model's numbers do not.
    """
    bars: dict[str, float] = {}
    for task, body in tasks.items():
        if task == "generate":
            continue
        for path, value in flatten_numbers(body):
            words = tuple(p.lower() for p in path)
            if not 0 <= value <= 1 or _is_reference(words):
                continue
            last = words[-1] if words else ""
            named = "acc" in last or "auc" in last
            # bbh / exact_match may store a bare float per subtask; counts there are ints, not scores
            if not named and not (task in ("bbh", "exact_match") and isinstance(value, float)):
                continue
            rest = [p for p in path if p.lower() not in _GENERIC]
            bars[f"{task}: {'/'.join(rest)}" if rest else task] = float(value)
    return bars


def recorded_auc(result: EvalResult | None) -> float | None:
    if result is None:
        return None
    for path, value in flatten_numbers(result.tasks.get("preference", {})):
        if path and "auc" in path[-1].lower() and not _is_reference(tuple(p.lower() for p in path)):
            return float(value)
    return None


def fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4g}"


def bound(run: RunData) -> tuple[list[float], list[float]]:
    return series(run.rows, "bound")
