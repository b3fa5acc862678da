"""KTO (with its batch reference point from mismatched pairs) and BCO (a binary classifier on beta * r with a
running mean delta) (docs/losses.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rdro_cli.losses.common import check_inputs, logratio_stats
from rdro_cli.losses.types import LossOutput


def kto_ref_point(kl_logratios: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0 = max(0, mean(kl_logratios))``, detached (docs/losses.md, KTO).

    ``kl_logratios`` are the log-ratios of mismatched prompt/completion pairs over the *global*
    batch: under data parallelism, gather them across ranks before calling this.
    """
    return kl_logratios.detach().mean().clamp(min=0.0)


def kto_loss(
    logratios: torch.Tensor,
    labels: torch.Tensor,
    *,
    kl_ref_point: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Kahneman-Tversky optimisation as in TRL's KTOTrainer (docs/losses.md, KTO)::

        l+(r) = lambda_D * (1 - sigmoid(beta * (r - z0)))
        l-(r) = lambda_U * (1 - sigmoid(beta * (z0 - r)))

    with ``z0 = kl_ref_point`` from :func:`kto_ref_point`.
    """
    check_inputs(logratios, labels)
    z0 = torch.as_tensor(kl_ref_point, dtype=logratios.dtype, device=logratios.device).detach()
    # 1 - sigmoid(u) = sigmoid(-u), which stays exact when sigmoid(u) rounds to 1
    preferred = desirable_weight * torch.sigmoid(-beta * (logratios - z0))
    non_preferred = undesirable_weight * torch.sigmoid(-beta * (z0 - logratios))
    losses = torch.where(labels, preferred, non_preferred)
    stats = logratio_stats(logratios, labels)
    stats["kl_ref_point"] = z0
    return LossOutput(losses, stats)


def bco_update_delta(delta: float, count: int, u_batch: torch.Tensor) -> tuple[float, int]:
    """Advance BCO's delta, the running mean of every ``u = beta * r`` seen so far (docs/losses.md, BCO).

    Call it with the current global batch's ``u`` *before* :func:`bco_loss`. The mean is exact (not
    exponential); ``(delta, count)`` is the state to keep in checkpoints, starting from ``(0.0, 0)``.
    """
    u = u_batch.detach().double()
    new_count = count + u.numel()
    if new_count == 0:
        return delta, count
    # incremental form keeps precision when count grows into the millions
    new_delta = delta + (u.sum().item() - u.numel() * delta) / new_count
    return new_delta, new_count


def bco_loss(
    logratios: torch.Tensor,
    labels: torch.Tensor,
    *,
    delta: torch.Tensor | float,
    beta: float = 0.1,
) -> LossOutput:
    """Binary classifier optimisation, Jung et al. 2024, as in TRL (docs/losses.md, BCO)::

        u = beta * r,   l+(r) = softplus(-(u - delta)),   l-(r) = softplus(u - delta)

    ``delta`` comes from :func:`bco_update_delta`, already updated with this batch.
    """
    check_inputs(logratios, labels)
    delta_t = torch.as_tensor(delta, dtype=logratios.dtype, device=logratios.device).detach()
    margin = beta * logratios - delta_t
    losses = torch.where(labels, F.softplus(-margin), F.softplus(margin))
    stats = logratio_stats(logratios, labels)
    stats["delta"] = delta_t
    return LossOutput(losses, stats)
