"""What the unpaired losses share: masked class means, the log-ratio statistics every loss logs, and class
weighting (`batch` or `balanced`).
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # NaN, not 0, for an empty class: a batch without preferred rows has no preferred mean
    if not bool(mask.any()):
        return torch.full((), float("nan"), dtype=values.dtype, device=values.device)
    return values[mask].mean()


def logratio_stats(logratios: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    r = logratios.detach()
    return {
        "logratio_preferred": masked_mean(r, labels),
        "logratio_non_preferred": masked_mean(r, ~labels),
        "logratio_max": r.max(),
    }


def class_weights(labels: torch.Tensor, preferred_fraction: float, like: torch.Tensor) -> torch.Tensor:
    """1 / (2 pi) on preferred rows, 1 / (2 (1 - pi)) on the others, in ``like``'s dtype (not float32)."""
    pos = torch.tensor(0.5 / preferred_fraction, dtype=like.dtype, device=like.device)
    neg = torch.tensor(0.5 / (1.0 - preferred_fraction), dtype=like.dtype, device=like.device)
    return torch.where(labels, pos, neg)


def weighted(losses: torch.Tensor, labels: torch.Tensor, weighting: str,
             preferred_fraction: float | None) -> torch.Tensor:
    """`batch`: as they are; `balanced`: each class weighted to count half (its optimum ignores pi-hat)."""
    if weighting == "balanced":
        if preferred_fraction is None or not 0.0 < preferred_fraction < 1.0:
            raise ValueError(
                "weighting='balanced' needs preferred_fraction strictly between 0 and 1, "
                f"got {preferred_fraction}"
            )
        return losses * class_weights(labels, preferred_fraction, losses)
    if weighting != "batch":
        raise ValueError(f"weighting must be 'batch' or 'balanced', got {weighting!r}")
    return losses


def check_inputs(logratios: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dtype != torch.bool:
        raise TypeError(f"labels must be a bool tensor (True = preferred), got {labels.dtype}")
    if logratios.shape != labels.shape:
        raise ValueError(f"logratios {tuple(logratios.shape)} and labels {tuple(labels.shape)} differ in shape")
