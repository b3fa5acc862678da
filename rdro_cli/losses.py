"""Loss functions for learning from binary feedback (docs/losses.md).

Every loss is a pure function of log-ratios ``r = s_pol - s_ref`` (summed completion-token
log-probs under the policy minus the same under the frozen reference) and boolean labels
(True = preferred). It returns per-example losses, already weighted, whose plain mean is the
objective, plus detached statistics to log. The training loop does the reduction.

The one piece of state any loss needs, BCO's running mean delta, is owned by the caller and
advanced with :func:`bco_update_delta`; the registry declares it (``stateful=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# rows within this distance of log(1/alpha) count as "at the bound" in the logged statistics
BOUND_TOLERANCE = 1e-3


class LossOutput(NamedTuple):
    """Per-example losses (their plain mean is the objective) and statistics to log."""

    losses: torch.Tensor
    stats: dict[str, torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs from the data pipeline besides log-ratios and labels."""

    fn: Callable[..., LossOutput]
    needs_pairs: bool = False  # chosen/rejected pairs instead of single labelled rows (DPO)
    needs_kl: bool = False  # log-ratios of mismatched prompt/completion pairs (KTO's reference point)
    stateful: bool = False  # running state carried across steps and checkpoints (BCO's delta)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # NaN, not 0, for an empty class: a batch without preferred rows has no preferred mean
    if not bool(mask.any()):
        return torch.full((), float("nan"), dtype=values.dtype, device=values.device)
    return values[mask].mean()


def _logratio_stats(logratios: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    r = logratios.detach()
    return {
        "logratio_preferred": _masked_mean(r, labels),
        "logratio_non_preferred": _masked_mean(r, ~labels),
        "logratio_max": r.max(),
    }


def _check_inputs(logratios: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dtype != torch.bool:
        raise TypeError(f"labels must be a bool tensor (True = preferred), got {labels.dtype}")
    if logratios.shape != labels.shape:
        raise ValueError(f"logratios {tuple(logratios.shape)} and labels {tuple(labels.shape)} differ in shape")


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
    _check_inputs(logratios, labels)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be strictly between 0 and 1, got {alpha}")
    softplus_r = F.softplus(logratios)
    preferred = F.softplus(-logratios) + alpha * softplus_r
    non_preferred = (1.0 - alpha) * softplus_r
    losses = torch.where(labels, preferred, non_preferred)
    if weighting == "balanced":
        if preferred_fraction is None or not 0.0 < preferred_fraction < 1.0:
            raise ValueError(
                "weighting='balanced' needs preferred_fraction strictly between 0 and 1, "
                f"got {preferred_fraction}"
            )
        losses = losses * torch.where(
            labels, 0.5 / preferred_fraction, 0.5 / (1.0 - preferred_fraction)
        ).to(losses.dtype)
    elif weighting != "batch":
        raise ValueError(f"weighting must be 'batch' or 'balanced', got {weighting!r}")

    bound = math.log(1.0 / alpha)
    at_bound = (logratios.detach() >= bound - BOUND_TOLERANCE) & labels
    stats = _logratio_stats(logratios, labels)
    stats["frac_at_bound"] = at_bound.to(logratios.dtype).sum() / labels.sum().clamp(min=1)
    stats["bound"] = torch.tensor(bound, dtype=logratios.dtype, device=logratios.device)
    return LossOutput(losses, stats)


def ddro_loss(logratios: torch.Tensor, labels: torch.Tensor) -> LossOutput:
    """Unbounded density ratio baseline (docs/losses.md, DDRO), the ``alpha -> 0`` limit of RDRO::

        l+(r) = softplus(-r),   l-(r) = softplus(r),   optimum exp(r*) = p+ / p-

    This follows how the RDRO paper frames DDRO (logistic regression of p+ against p-); the DDRO
    paper's own parametrisation could not be checked offline.
    """
    _check_inputs(logratios, labels)
    losses = torch.where(labels, F.softplus(-logratios), F.softplus(logratios))
    return LossOutput(losses, _logratio_stats(logratios, labels))


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
    _check_inputs(logratios, labels)
    z0 = torch.as_tensor(kl_ref_point, dtype=logratios.dtype, device=logratios.device).detach()
    # 1 - sigmoid(u) = sigmoid(-u), which stays exact when sigmoid(u) rounds to 1
    preferred = desirable_weight * torch.sigmoid(-beta * (logratios - z0))
    non_preferred = undesirable_weight * torch.sigmoid(-beta * (z0 - logratios))
    losses = torch.where(labels, preferred, non_preferred)
    stats = _logratio_stats(logratios, labels)
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
    _check_inputs(logratios, labels)
    delta_t = torch.as_tensor(delta, dtype=logratios.dtype, device=logratios.device).detach()
    margin = beta * logratios - delta_t
    losses = torch.where(labels, F.softplus(-margin), F.softplus(margin))
    stats = _logratio_stats(logratios, labels)
    stats["delta"] = delta_t
    return LossOutput(losses, stats)


def dpo_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float = 0.1
) -> LossOutput:
    """Direct preference optimisation on pairs (docs/losses.md, DPO)::

        l = softplus(-beta * (r_w - r_l)) = -log sigmoid(beta * (r_w - r_l))
    """
    if chosen_logratios.shape != rejected_logratios.shape:
        raise ValueError(
            f"chosen {tuple(chosen_logratios.shape)} and rejected {tuple(rejected_logratios.shape)} differ"
        )
    margin = beta * (chosen_logratios - rejected_logratios)
    losses = F.softplus(-margin)
    chosen, rejected = chosen_logratios.detach(), rejected_logratios.detach()
    stats = {
        "logratio_preferred": chosen.mean(),
        "logratio_non_preferred": rejected.mean(),
        "logratio_max": torch.maximum(chosen.max(), rejected.max()),
        "reward_accuracy": (margin.detach() > 0).to(chosen.dtype).mean(),
    }
    return LossOutput(losses, stats)


LOSSES: dict[str, LossSpec] = {
    "rdro": LossSpec(rdro_loss),
    "ddro": LossSpec(ddro_loss),
    "kto": LossSpec(kto_loss, needs_kl=True),
    "bco": LossSpec(bco_loss, stateful=True),
    "dpo": LossSpec(dpo_loss, needs_pairs=True),
}
