"""Pair losses: DPO, the BPO family and preference maximum likelihood (docs/losses.md).

Each takes the chosen and rejected rows' log-ratios ``r_w, r_l`` (``r = s_pol - s_ref``; for the
reference-free ``pmle`` the training loop passes ``s_pol`` itself) and returns one loss per pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rdro_cli.losses.types import LossOutput

BPO_DIVERGENCES = ("lr", "kliep", "lsif", "ba", "sba")


def _check_pairs(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ")


def _pair_stats(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "logratio_preferred": chosen.mean(),
        "logratio_non_preferred": rejected.mean(),
        "logratio_max": torch.maximum(chosen.max(), rejected.max()),
        "reward_accuracy": (margin.detach() > 0).to(chosen.dtype).mean(),
    }


def dpo_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float = 0.1
) -> LossOutput:
    """Direct preference optimisation on pairs (docs/losses.md, DPO)::

        l = softplus(-beta * (r_w - r_l)) = -log sigmoid(beta * (r_w - r_l))
    """
    _check_pairs(chosen_logratios, rejected_logratios)
    margin = beta * (chosen_logratios - rejected_logratios)
    return LossOutput(F.softplus(-margin), _pair_stats(chosen_logratios, rejected_logratios, margin))


# A Bregman generator h, given as two functions of rho = log R:
#   a(rho) = h'(R) R - h(R)   and   b(rho) = h'(R)
# For the ratio R = q(swapped pair) / q(pair) the Bregman ratio-matching risk is
#   E_pairs[a(log R)] - E_swapped pairs[b(log R_swapped)],  and  log R_swapped = -log R,
# so each observed pair contributes a(rho) - b(-rho); we halve it (below) so that "lr" is DPO exactly.
def _generator(divergence: str, lam: float) -> tuple[Callable, Callable]:
    if divergence == "lr":  # h(R) = R log R - (1 + R) log(1 + R): logistic regression
        return F.softplus, lambda rho: -F.softplus(-rho)
    if divergence == "kliep":  # h(R) = R log R - R: (unnormalised) KL
        return torch.exp, lambda rho: rho
    if divergence == "lsif":  # h(R) = (R - 1)^2 / 2: least squares
        return (lambda rho: 0.5 * torch.exp(2 * rho) - 0.5), (lambda rho: torch.exp(rho) - 1.0)
    if divergence in ("ba", "sba"):  # h(R) = (R^(1+lam) - R) / lam: Basu's power divergence
        return ((lambda rho: torch.exp((1.0 + lam) * rho)),
                (lambda rho: ((1.0 + lam) * torch.exp(lam * rho) - 1.0) / lam))
    raise ValueError(f"divergence must be one of {', '.join(BPO_DIVERGENCES)}, got {divergence!r}")


def bpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float = 0.1,
    divergence: str = "lr",
    lam: float = 1.0,
    ratio_min: float = 1e-6,
) -> LossOutput:
    """Bregman preference optimisation (Kim, Bae, Na and Moon, arXiv 2505.19601, NeurIPS 2025)::

        R = exp(-beta ((s_pol(y_w) - s_pol(y_l)) - (s_ref(y_w) - s_ref(y_l)))) = exp(-beta (r_w - r_l))
        l = 1/2 [ h'(R) R - h(R) - h'(1/R) ]                 with R clamped to >= ratio_min

    the Bregman ratio-matching risk of generator ``h`` with each pair standing for itself and its
    swap. Instances (``divergence``): ``lr`` (logistic; ``l = softplus(-beta (r_w - r_l))``, DPO
    exactly), ``kliep``, ``lsif``, ``ba`` (Basu's power divergence with ``lam``) and ``sba`` = ``ba`` /
    (2 (1 + lam)), scaled so its gradient at ``R = 1`` equals DPO's (``-beta/2`` per unit of ``r_w``).
    Every instance is minimised in the population at the same ratio as DPO,
    ``sigmoid(beta (r_a - r_b)) = P(a preferred to b)``.

    Derived here from the Bregman form, not transcribed: the paper's Table 2, Algorithm 1 and code
    listing could not be read offline, so the halving, the SBA scale and the clamp value (``ratio_min``)
    are this implementation's choices, not confirmed against the paper (docs/losses.md).
    """
    _check_pairs(chosen_logratios, rejected_logratios)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if divergence in ("ba", "sba") and not lam > 0:
        raise ValueError(f"lam must be > 0 for {divergence}, got {lam}")
    if not 0.0 < ratio_min < 1.0:
        raise ValueError(f"ratio_min must be in (0, 1), got {ratio_min}")
    margin = beta * (chosen_logratios - rejected_logratios)
    log_ratio = (-margin).clamp(min=math.log(ratio_min))
    a, b = _generator(divergence, lam)
    losses = 0.5 * (a(log_ratio) - b(-log_ratio))
    if divergence == "sba":
        losses = losses / (2.0 * (1.0 + lam))
    return LossOutput(losses, _pair_stats(chosen_logratios, rejected_logratios, margin))


def pmle_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, gamma: float = 5e-3) -> LossOutput:
    """Preference maximum likelihood (Yun et al., "Alignment as Distribution Learning", arXiv 2506.01523)::

        l = -log sigmoid(gamma (s_pol(y_w) - s_pol(y_l))) = softplus(-gamma (s_w - s_l))

    reference-free: the inputs are the policy's completion log-prob sums, no reference log-probs.
    ``gamma = 5e-3`` is the issue's reading of the paper's UltraFeedback setting (which also sets the
    KL-to-reference coefficient to 0). The paper's KL-to-reference regulariser needs completions sampled
    from the policy during training, which this offline pipeline never draws, so it is not implemented.
    Population optimum: ``pi(a) / pi(b) = (P(a > b) / P(b > a))^(1 / gamma)``.
    """
    _check_pairs(chosen_logps, rejected_logps)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    margin = gamma * (chosen_logps - rejected_logps)
    return LossOutput(F.softplus(-margin), _pair_stats(chosen_logps, rejected_logps, margin))
