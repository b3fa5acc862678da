"""PRO-B, proximalized preference optimisation on binary feedback (docs/losses.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rdro_cli.losses.common import check_inputs, logratio_stats, weighted
from rdro_cli.losses.types import LossOutput


def pro_loss(
    logratios: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 2.5,
    weighting: str = "balanced",
    preferred_fraction: float | None = None,
) -> LossOutput:
    """PRO for binary feedback ("PRO-B"; Guo, Li and Chen, arXiv 2505.23316, NeurIPS 2025), per row::

        l(r) = -beta * s * r + (alpha * beta / 2) * (softplus(beta r) + softplus(-beta r))
        s = +1/2 (preferred), -1/2 (non-preferred)

    which is ``-beta s r - (alpha beta / 2) [log sigmoid(beta r - r_H) + log sigmoid(r_H - beta r)]``
    at the hyper-response reward ``r_H = 0``. The first term is the paper's optimizer term written
    with ``r`` instead of ``s_pol`` (same gradient: ``s_ref`` is a constant); the second is the
    hyper-response approximation of the full regularizer. Gradient in ``r``::

        -beta s + (alpha beta^2 / 2) tanh(beta r / 2)

    ``weighting="balanced"`` weighs preferred rows by ``1 / (2 pi)`` and non-preferred rows by
    ``1 / (2 (1 - pi))`` (``pi = preferred_fraction``), so both classes count equally however
    imbalanced the split; ``"batch"`` keeps the plain mean. The term forms and defaults follow the
    issue's reading of the paper; its appendix (where PRO-B is written out, with equation numbers)
    could not be read offline, and neither could its exact class-reweighting rule (docs/losses.md).
    """
    check_inputs(logratios, labels)
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
    u = beta * logratios
    sign = torch.where(labels, 0.5, -0.5).to(logratios.dtype)
    regulariser = 0.5 * alpha * beta * (F.softplus(u) + F.softplus(-u))
    losses = -beta * sign * logratios + regulariser
    losses = weighted(losses, labels, weighting, preferred_fraction)
    return LossOutput(losses, logratio_stats(logratios, labels))
