"""Density-ratio losses: RDRO (the relative density ratio, bounded by log(1/alpha)) and DDRO (the unbounded
ratio p+/p-), with alpha's "auto" resolution (docs/losses.md).

Every loss is a pure function of log-ratios ``r = s_pol - s_ref`` and boolean labels (True = preferred); it
returns per-example losses, already weighted, whose plain mean is the objective, plus detached statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rdro_cli.losses.common import check_inputs, logratio_stats, weighted
from rdro_cli.losses.types import LossOutput

# rows within this distance of log(1/alpha) count as "at the bound" in the logged statistics
BOUND_TOLERANCE = 1e-3


def resolve_alpha(alpha: float | str, preferred_fraction: float | None) -> float:
    """RDRO's mixture weight: ``"auto"`` means the training split's preferred fraction pi-hat."""
    if alpha == "auto":
        if preferred_fraction is None or not 0.0 < preferred_fraction < 1.0:
            raise ValueError(
                f"alpha='auto' needs a preferred fraction strictly between 0 and 1, got {preferred_fraction}"
            )
        return float(preferred_fraction)
    if isinstance(alpha, str):
        raise ValueError(f"alpha must be a number in (0, 1) or 'auto', got {alpha!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be strictly between 0 and 1, got {alpha}")
    return alpha


def rdro_loss(
    logratios: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    weighting: str = "batch",
    preferred_fraction: float | None = None,
) -> LossOutput:
    """Relative density ratio optimisation (docs/losses.md, RDRO).

    Fits ``exp(r)`` to ``R_alpha = p+ / (alpha p+ + (1 - alpha) p-)`` through the population loss
    ``E_{p+}[softplus(-r)] + E_{mix_alpha}[softplus(r)]``, per example::

        l+(r) = softplus(-r) + alpha * softplus(r)      (preferred)
        l-(r) = (1 - alpha) * softplus(r)               (non-preferred)

    ``weighting="batch"`` returns these as they are (the reference implementation's plain mean).
    ``weighting="balanced"`` multiplies preferred rows by ``1 / (2 pi)`` and non-preferred rows by
    ``1 / (2 (1 - pi))`` with ``pi = preferred_fraction``; its optimum is exactly ``R_alpha``,
    whereas the batch mean's optimum is ``pi p+ / (alpha pi p+ + (1 - alpha)(1 - pi) p-)``.
    """
    check_inputs(logratios, labels)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be strictly between 0 and 1, got {alpha}")
    softplus_r = F.softplus(logratios)
    preferred = F.softplus(-logratios) + alpha * softplus_r
    non_preferred = (1.0 - alpha) * softplus_r
    losses = torch.where(labels, preferred, non_preferred)
    losses = weighted(losses, labels, weighting, preferred_fraction)

    bound = math.log(1.0 / alpha)
    at_bound = (logratios.detach() >= bound - BOUND_TOLERANCE) & labels
    stats = logratio_stats(logratios, labels)
    stats["frac_at_bound"] = at_bound.to(logratios.dtype).sum() / labels.sum().clamp(min=1)
    stats["bound"] = torch.tensor(bound, dtype=logratios.dtype, device=logratios.device)
    return LossOutput(losses, stats)


def ddro_loss(logratios: torch.Tensor, labels: torch.Tensor) -> LossOutput:
    """Unbounded density ratio baseline (docs/losses.md, DDRO), the ``alpha -> 0`` limit of RDRO::

        l+(r) = softplus(-r),   l-(r) = softplus(r),   optimum exp(r*) = p+ / p-

    This follows how the RDRO paper (arXiv 2604.04410) frames DDRO: logistic regression of p+
    against p-. The DDRO paper itself (Higuchi and Suzuki, arXiv 2505.07558, ICML 2025) could only
    be read up to its abstract offline, so whether its published objective differs from this form
    (and by which equation) is not confirmed; see docs/losses.md.
    """
    check_inputs(logratios, labels)
    losses = torch.where(labels, F.softplus(-logratios), F.softplus(logratios))
    return LossOutput(losses, logratio_stats(logratios, labels))
