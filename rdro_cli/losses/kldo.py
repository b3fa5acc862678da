"""KLDO: the Donsker–Varadhan bound of KL(p+ || p-) over the global batch, and its moving average (docs/losses.md).
"""

from __future__ import annotations

import math

import torch

from rdro_cli.losses.common import check_inputs, logratio_stats
from rdro_cli.losses.types import LossOutput


def kldo_update_ema(ema: float, u_non_preferred: torch.Tensor, *, rate: float = 0.1,
                    weights: torch.Tensor | None = None) -> float:
    """Advance KLDO's moving average ``m`` of the batch mean of ``exp(u)`` over non-preferred rows.

    As the authors' code (rhaldarpurdue/KLDO, train/trainers.py, ``ema_loss``): ``m = mean`` when
    ``m == 0`` (the start, and after each epoch's reset), else ``m = rate * mean + (1 - rate) * m``;
    a batch without non-preferred rows leaves ``m`` as it is. ``u`` is ``beta * r`` of the global
    batch's non-preferred rows, detached; call this *before* :func:`kldo_loss`.
    """
    u = u_non_preferred.detach().double()
    if u.numel() == 0:
        return ema
    w = torch.ones_like(u) if weights is None else weights.detach().double()
    batch_mean = math.exp((torch.logsumexp(u + w.log(), 0) - w.sum().log()).item())
    return batch_mean if ema == 0 else rate * batch_mean + (1.0 - rate) * ema


def kldo_loss(
    logratios: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.1,
    estimator: str = "ma",
    ema: float | None = None,
    batch_logratios: torch.Tensor | None = None,
    batch_labels: torch.Tensor | None = None,
    batch_weights: torch.Tensor | None = None,
) -> LossOutput:
    """KLDO (Haldar et al., "LLM Safety Alignment is Divergence Estimation in Disguise"), the
    Donsker-Varadhan bound of KL(p+ || p-) with ``T = u = beta r``, over the global batch::

        L = -mean_{preferred} u + log mean_{non-preferred} exp(u)

    As per-example losses over the ``B`` rows of the global batch (``N+`` preferred, ``N-``
    non-preferred, ``LME`` = the detached log-mean-exp term; their plain mean over the global batch is
    ``L``)::

        l+ = -(B / N+) u
        l- = (B / N-) [ (exp(u) - sg(exp(u))) / sg(m) + LME ]

    so the value is ``L`` and the gradient of the second term is ``exp(u_i) / (N- m)``, as the authors'
    ``EMALoss``: ``estimator="ma"`` takes ``m`` = the moving average from :func:`kldo_update_ema`
    (passed as ``ema``, already updated with this batch); ``"biased"`` takes ``m`` = this batch's mean
    of ``exp(u)``, which is the exact gradient of the log-mean-exp. ``batch_*`` are the detached
    log-ratios / labels (/ weights) of the whole global batch (default: these rows); under data
    parallelism gather them across processes, each process passing only its own rows as the first two.
    """
    check_inputs(logratios, labels)
    if estimator not in ("ma", "biased"):
        raise ValueError(f"estimator must be 'ma' or 'biased', got {estimator!r}")
    batch_r = (logratios if batch_logratios is None else batch_logratios).detach().to(logratios.dtype)
    batch_y = labels if batch_labels is None else batch_labels
    batch_w = torch.ones_like(batch_r) if batch_weights is None else batch_weights.to(logratios.dtype)
    total, n_pos, n_neg = batch_w.sum(), batch_w[batch_y].sum(), batch_w[~batch_y].sum()
    u = beta * logratios
    stats = logratio_stats(logratios, labels)
    if bool(n_neg > 0):
        u_neg = beta * batch_r[~batch_y]
        log_mean_exp = torch.logsumexp(u_neg + batch_w[~batch_y].log(), 0) - n_neg.log()
    else:  # no non-preferred row anywhere in the batch: the term is absent, as in the authors' code
        log_mean_exp = torch.zeros((), dtype=logratios.dtype, device=logratios.device)
    if estimator == "ma":
        if ema is None or not ema > 0:
            if bool(n_neg > 0):
                raise ValueError(f"estimator='ma' needs the moving average ema > 0, got {ema}")
            ema = 1.0  # unused: no row takes the non-preferred branch
        log_m = torch.tensor(math.log(ema), dtype=logratios.dtype, device=logratios.device)
    else:
        log_m = log_mean_exp
    scaled = torch.exp(u - log_m)  # exp(u) / m without overflowing exp(u)
    non_preferred = (total / n_neg.clamp(min=1e-30)) * (scaled - scaled.detach() + log_mean_exp)
    preferred = -(total / n_pos.clamp(min=1e-30)) * u
    losses = torch.where(labels, preferred, non_preferred)
    stats["kldo_log_mean_exp"] = log_mean_exp.detach()
    stats["kldo_ema"] = log_m.detach().exp()
    return LossOutput(losses, stats)
