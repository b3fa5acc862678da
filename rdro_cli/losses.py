"""Loss functions for learning from binary feedback (formulas and papers: docs/losses.md).

Every loss is a pure function of log-ratios ``r = s_pol - s_ref`` (summed completion-token
log-probs under the policy minus the same under the frozen reference) and boolean labels
(True = preferred). It returns per-example losses, already weighted, whose plain mean is the
objective, plus detached statistics to log. The training loop does the reduction.

Running state (BCO's mean delta, KLDO's moving average m) is owned by the caller and advanced with
:func:`bco_update_delta` / :func:`kldo_update_ema`; the registry declares it (``LossSpec.state``).
Pair losses (DPO's family: BPO, preference MLE) live in :mod:`rdro_cli.losses_pairs`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rdro_cli.loss_types import LossOutput, LossSpec

# rows within this distance of log(1/alpha) count as "at the bound" in the logged statistics
BOUND_TOLERANCE = 1e-3


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


def _class_weights(labels: torch.Tensor, preferred_fraction: float, like: torch.Tensor) -> torch.Tensor:
    """1 / (2 pi) on preferred rows, 1 / (2 (1 - pi)) on the others, in ``like``'s dtype (not float32)."""
    pos = torch.tensor(0.5 / preferred_fraction, dtype=like.dtype, device=like.device)
    neg = torch.tensor(0.5 / (1.0 - preferred_fraction), dtype=like.dtype, device=like.device)
    return torch.where(labels, pos, neg)


def _weighted(losses: torch.Tensor, labels: torch.Tensor, weighting: str,
              preferred_fraction: float | None) -> torch.Tensor:
    """`batch`: as they are; `balanced`: each class weighted to count half (its optimum ignores pi-hat)."""
    if weighting == "balanced":
        if preferred_fraction is None or not 0.0 < preferred_fraction < 1.0:
            raise ValueError(
                "weighting='balanced' needs preferred_fraction strictly between 0 and 1, "
                f"got {preferred_fraction}"
            )
        return losses * _class_weights(labels, preferred_fraction, losses)
    if weighting != "batch":
        raise ValueError(f"weighting must be 'batch' or 'balanced', got {weighting!r}")
    return losses


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
    losses = _weighted(losses, labels, weighting, preferred_fraction)

    bound = math.log(1.0 / alpha)
    at_bound = (logratios.detach() >= bound - BOUND_TOLERANCE) & labels
    stats = _logratio_stats(logratios, labels)
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
    _check_inputs(logratios, labels)
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
    u = beta * logratios
    sign = torch.where(labels, 0.5, -0.5).to(logratios.dtype)
    regulariser = 0.5 * alpha * beta * (F.softplus(u) + F.softplus(-u))
    losses = -beta * sign * logratios + regulariser
    losses = _weighted(losses, labels, weighting, preferred_fraction)
    return LossOutput(losses, _logratio_stats(logratios, labels))


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
    _check_inputs(logratios, labels)
    if estimator not in ("ma", "biased"):
        raise ValueError(f"estimator must be 'ma' or 'biased', got {estimator!r}")
    batch_r = (logratios if batch_logratios is None else batch_logratios).detach().to(logratios.dtype)
    batch_y = labels if batch_labels is None else batch_labels
    batch_w = torch.ones_like(batch_r) if batch_weights is None else batch_weights.to(logratios.dtype)
    total, n_pos, n_neg = batch_w.sum(), batch_w[batch_y].sum(), batch_w[~batch_y].sum()
    u = beta * logratios
    stats = _logratio_stats(logratios, labels)
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


# pair losses sit in their own module; imported here, after everything they import from this one
from rdro_cli.losses_pairs import bpo_loss, pmle_loss  # noqa: E402

LOSSES: dict[str, LossSpec] = {
    "rdro": LossSpec(rdro_loss),
    "ddro": LossSpec(ddro_loss),
    "kto": LossSpec(kto_loss, needs_kl=True, batch_level=True),
    "bco": LossSpec(bco_loss, state="bco_delta", batch_level=True),
    "dpo": LossSpec(dpo_loss, needs_pairs=True),
    "pro": LossSpec(pro_loss),
    "kldo": LossSpec(kldo_loss, state="kldo_ema", batch_level=True),
    "bpo": LossSpec(bpo_loss, needs_pairs=True),
    "pmle": LossSpec(pmle_loss, needs_pairs=True, needs_ref=False),
}
