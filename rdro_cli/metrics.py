"""Evaluation metrics shared by `eval` (which computes them) and `report` (which may need them again from
stored log-ratios). numpy only, so `report` stays free of torch."""

from __future__ import annotations

import numpy as np


def auc(scores, labels) -> float | None:
    """P(score of a preferred row > score of a non-preferred row), ties counting half (Mann–Whitney U / n⁺n⁻).

    None when either class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    positive, negative = scores[labels], np.sort(scores[~labels])
    if len(positive) == 0 or len(negative) == 0:
        return None
    below = np.searchsorted(negative, positive, side="left")
    not_above = np.searchsorted(negative, positive, side="right")
    return float((below + 0.5 * (not_above - below)).sum() / (len(positive) * len(negative)))
