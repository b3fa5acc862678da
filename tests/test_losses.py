"""Loss functions against hand-worked numbers, independent formulas and the math of DESIGN.md 1."""

import math

import numpy as np
import pytest
import torch

from rdro_cli.losses import (
    LOSSES,
    bco_loss,
    bco_update_delta,
    ddro_loss,
    dpo_loss,
    kto_loss,
    kto_ref_point,
    rdro_loss,
    resolve_alpha,
)

LOG2 = math.log(2.0)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def b(*values):
    return torch.tensor(values, dtype=torch.bool)


def close(actual, expected, tol=1e-12):
    assert torch.allclose(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=0), (
        actual,
        expected,
    )


# ---------------------------------------------------------------- hand-worked values


def test_rdro_hand_worked():
    # r = 0: softplus(0) = log 2 on both sides
    out = rdro_loss(t(0.0, 0.0), b(True, False), alpha=0.3)
    close(out.losses, [1.3 * LOG2, 0.7 * LOG2])
    # r = log 4 = log(1/alpha) at alpha = 1/4: softplus(-log 4) = log(5/4), softplus(log 4) = log 5
    out = rdro_loss(t(math.log(4), math.log(4)), b(True, False), alpha=0.25)
    close(out.losses, [math.log(5 / 4) + 0.25 * math.log(5), 0.75 * math.log(5)])
    # r = log 3, alpha = 1/2
    out = rdro_loss(t(math.log(3), math.log(3)), b(True, False), alpha=0.5)
    close(out.losses, [math.log(4 / 3) + 0.5 * math.log(4), 0.5 * math.log(4)])
    # r = -log 3, alpha = 0.1: softplus(log 3) = log 4, softplus(-log 3) = log(4/3)
    out = rdro_loss(t(-math.log(3), -math.log(3)), b(True, False), alpha=0.1)
    close(out.losses, [math.log(4) + 0.1 * math.log(4 / 3), 0.9 * math.log(4 / 3)])


def test_rdro_balanced_hand_worked():
    # pi = 0.2: preferred rows weigh 1/(2*0.2) = 2.5, non-preferred 1/(2*0.8) = 0.625
    out = rdro_loss(t(0.0, 0.0, 0.0), b(True, False, False), alpha=0.3, weighting="balanced",
                    preferred_fraction=0.2)
    close(out.losses, [2.5 * 1.3 * LOG2, 0.625 * 0.7 * LOG2, 0.625 * 0.7 * LOG2])


def test_rdro_stats():
    alpha = 0.25
    bound = math.log(4)
    r = t(bound, bound - 0.5 * 1e-3, bound - 0.1, 5.0, -1.0)
    labels = b(True, True, True, False, False)
    stats = rdro_loss(r, labels, alpha=alpha).stats
    close(stats["bound"].double(), bound)
    close(stats["frac_at_bound"].double(), 2 / 3)
    close(stats["logratio_max"], 5.0)
    close(stats["logratio_preferred"], (3 * bound - 0.5e-3 - 0.1) / 3)
    close(stats["logratio_non_preferred"], 2.0)
    assert all(not v.requires_grad for v in stats.values())


def test_rdro_large_logratios_are_finite():
    r = t(-1000.0, 1000.0, -1000.0, 1000.0).requires_grad_()
    out = rdro_loss(r, b(True, True, False, False), alpha=0.4)
    close(out.losses, [1000.0, 400.0, 0.0, 600.0], tol=1e-9)
    out.losses.sum().backward()
    close(r.grad, [-1.0, 0.4, 0.0, 0.6], tol=1e-9)


def test_ddro_hand_worked():
    out = ddro_loss(t(math.log(3), math.log(3), 0.0), b(True, False, True))
    close(out.losses, [math.log(4 / 3), math.log(4), LOG2])


def test_kto_hand_worked():
    # beta (r - z0) = 0.5: 1 - sigmoid(0.5) = 1 / (1 + e^0.5), 1 - sigmoid(-0.5) = e^0.5 / (1 + e^0.5)
    e = math.exp(0.5)
    out = kto_loss(t(2.0, 2.0, 1.0), b(True, False, True), kl_ref_point=1.0, beta=0.5,
                   desirable_weight=2.0, undesirable_weight=0.5)
    close(out.losses, [2.0 / (1 + e), 0.5 * e / (1 + e), 2.0 * 0.5])
    close(out.stats["kl_ref_point"], 1.0)


def test_kto_ref_point_clamps_and_detaches():
    kl = t(-3.0, 1.0).requires_grad_()
    z0 = kto_ref_point(kl)
    assert z0.item() == 0.0 and not z0.requires_grad
    kl = t(1.0, 2.0).requires_grad_()
    z0 = kto_ref_point(kl)
    assert z0.item() == 1.5 and not z0.requires_grad
    # the reference point carries no gradient into the loss
    r = t(0.3, -0.2).requires_grad_()
    kto_loss(r, b(True, False), kl_ref_point=kto_ref_point(r)).losses.sum().backward()
    expected = torch.autograd.grad(
        kto_loss(r, b(True, False), kl_ref_point=0.05).losses.sum(), r
    )[0]
    close(r.grad, expected)


def test_bco_hand_worked():
    # u - delta = 0.5 * 2 - 0.25 = 0.75
    out = bco_loss(t(2.0, 2.0), b(True, False), delta=0.25, beta=0.5)
    close(out.losses, [math.log(1 + math.exp(-0.75)), math.log(1 + math.exp(0.75))])
    close(out.stats["delta"], 0.25)


def test_bco_delta_is_running_mean_of_all_u():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(size, generator=gen, dtype=torch.float64) * 3 for size in (5, 1, 17, 8)]
    delta, count = 0.0, 0
    for i, u in enumerate(batches):
        delta, count = bco_update_delta(delta, count, u)
        seen = torch.cat(batches[: i + 1])
        assert count == seen.numel() and isinstance(count, int)
        assert delta == pytest.approx(seen.mean().item(), abs=1e-12)
    # an empty batch leaves the state alone
    assert bco_update_delta(delta, count, torch.empty(0)) == (delta, count)
    # the update never builds a graph back into the policy
    u = torch.ones(3, requires_grad=True)
    assert isinstance(bco_update_delta(0.0, 0, u)[0], float)


def test_dpo_hand_worked_and_symmetric():
    out = dpo_loss(t(3.0, 1.0), t(-7.0, 1.0), beta=0.1)
    close(out.losses, [math.log(1 + math.exp(-1.0)), LOG2])
    close(out.stats["reward_accuracy"], 0.5)
    # swapping chosen and rejected turns softplus(-m) into softplus(m); they differ by exactly m
    gen = torch.Generator().manual_seed(1)
    rw, rl = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
    forward, backward = dpo_loss(rw, rl, beta=0.3).losses, dpo_loss(rl, rw, beta=0.3).losses
    close(backward - forward, 0.3 * (rw - rl), tol=1e-12)
    # and it depends only on the difference
    close(dpo_loss(rw + 5.0, rl + 5.0, beta=0.3).losses, forward, tol=1e-12)


# ---------------------------------------------------------------- independent formulas


def _random_batch(seed, size=200):
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, 4.0, size)
    labels = rng.random(size) < 0.4
    return r, labels, torch.tensor(r), torch.tensor(labels)


def _log1pexp(x):
    return np.log(1.0 + np.exp(x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_plain_formulas(seed):
    r, labels, r_t, labels_t = _random_batch(seed)
    alpha, pi = 0.39, labels.mean()

    rdro_plain = np.where(labels, _log1pexp(-r) + alpha * _log1pexp(r), (1 - alpha) * _log1pexp(r))
    np.testing.assert_allclose(rdro_loss(r_t, labels_t, alpha=alpha).losses.numpy(), rdro_plain, atol=1e-6)
    # (1 + alpha) softplus(r) - r is the same function written differently
    np.testing.assert_allclose(rdro_plain[labels], (1 + alpha) * _log1pexp(r[labels]) - r[labels], atol=1e-6)
    weights = np.where(labels, 1 / (2 * pi), 1 / (2 * (1 - pi)))
    balanced = rdro_loss(r_t, labels_t, alpha=alpha, weighting="balanced", preferred_fraction=float(pi))
    np.testing.assert_allclose(balanced.losses.numpy(), weights * rdro_plain, atol=1e-6)

    ddro_plain = np.where(labels, _log1pexp(-r), _log1pexp(r))
    np.testing.assert_allclose(ddro_loss(r_t, labels_t).losses.numpy(), ddro_plain, atol=1e-6)

    z0, beta = 0.7, 0.1
    kto_plain = np.where(labels, 1.5 * (1 - _sigmoid(beta * (r - z0))), 0.8 * (1 - _sigmoid(beta * (z0 - r))))
    kto = kto_loss(r_t, labels_t, kl_ref_point=z0, beta=beta, desirable_weight=1.5, undesirable_weight=0.8)
    np.testing.assert_allclose(kto.losses.numpy(), kto_plain, atol=1e-6)

    delta = -0.2
    bco_plain = np.where(labels, -np.log(_sigmoid(beta * r - delta)), -np.log(1 - _sigmoid(beta * r - delta)))
    np.testing.assert_allclose(bco_loss(r_t, labels_t, delta=delta, beta=beta).losses.numpy(), bco_plain, atol=1e-6)

    rl = np.random.default_rng(seed + 100).normal(0.0, 4.0, r.size)
    dpo_plain = -np.log(_sigmoid(beta * (r - rl)))
    np.testing.assert_allclose(dpo_loss(r_t, torch.tensor(rl), beta=beta).losses.numpy(), dpo_plain, atol=1e-6)


def test_kto_ref_point_matches_plain_formula():
    values = np.random.default_rng(3).normal(0.5, 2.0, 64)
    assert kto_ref_point(torch.tensor(values)).item() == pytest.approx(max(0.0, values.mean()), abs=1e-12)


# ---------------------------------------------------------------- RDRO's gradient bounds


@pytest.mark.parametrize("alpha", [0.05, 0.39, 0.5, 0.9])
def test_rdro_gradients_are_bounded(alpha):
    grid = torch.cat([torch.linspace(-50.0, 50.0, 2001, dtype=torch.float64), t(-50.0, 50.0, 0.0)])
    for label, low, high in ((True, -1.0, alpha), (False, 0.0, 1.0 - alpha)):
        r = grid.clone().requires_grad_()
        labels = torch.full_like(grid, label, dtype=torch.bool)
        rdro_loss(r, labels, alpha=alpha).losses.sum().backward()
        assert torch.isfinite(r.grad).all()
        assert r.grad.min() >= low - 1e-12 and r.grad.max() <= high + 1e-12
        # and the bounds are tight at the ends of the range
        assert r.grad.min() == pytest.approx(low, abs=1e-9) and r.grad.max() == pytest.approx(high, abs=1e-9)


def test_rdro_preferred_gradient_vanishes_at_the_bound():
    alpha = 0.39
    r = t(math.log(1 / alpha)).requires_grad_()
    rdro_loss(r, b(True), alpha=alpha).losses.sum().backward()
    assert abs(r.grad.item()) < 1e-12


# ---------------------------------------------------------------- weighting: what each optimum is


def _population_optimum(p_plus, p_minus, pi, alpha, weighting):
    """Minimise the expected loss over free per-outcome log-ratios when a fraction pi of rows is preferred."""
    outcomes = len(p_plus)
    mass = torch.cat([pi * p_plus, (1 - pi) * p_minus])  # probability of each (outcome, label) row
    labels = torch.cat([torch.ones(outcomes, dtype=torch.bool), torch.zeros(outcomes, dtype=torch.bool)])
    r = torch.zeros(outcomes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([r], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        losses = rdro_loss(torch.cat([r, r]), labels, alpha=alpha, weighting=weighting,
                           preferred_fraction=pi).losses
        objective = (mass * losses).sum()
        objective.backward()
        return objective

    optimizer.step(closure)
    return r.detach()


def test_balanced_weighting_recovers_relative_density_ratio():
    p_plus = t(0.30, 0.25, 0.20, 0.15, 0.10, 0.00)
    p_minus = t(0.05, 0.10, 0.15, 0.20, 0.20, 0.30)
    alpha = pi = 0.39
    ratio = p_plus / (alpha * p_plus + (1 - alpha) * p_minus)
    reference = alpha * p_plus + (1 - alpha) * p_minus  # pi_ref is the alpha-mixture

    balanced = _population_optimum(p_plus, p_minus, pi, alpha, "balanced")
    # outcome 6 has p+ = 0: its optimum is r = -inf, so compare the ratio, not the log
    close(balanced.exp(), ratio, tol=1e-6)
    policy = reference * balanced.exp()
    assert policy.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert 0.5 * (policy - p_plus).abs().sum().item() < 1e-6

    batch = _population_optimum(p_plus, p_minus, pi, alpha, "batch")
    batch_ratio = pi * p_plus / (alpha * pi * p_plus + (1 - alpha) * (1 - pi) * p_minus)
    close(batch.exp(), batch_ratio, tol=1e-6)
    assert (batch.exp() - ratio).abs().max().item() > 0.1
    batch_policy = reference * batch.exp()
    assert batch_policy.sum().item() < 0.95  # not a distribution
    renormalised = batch_policy / batch_policy.sum()
    assert 0.5 * (renormalised - p_plus).abs().sum().item() > 0.02


def test_batch_weighting_is_consistent_at_one_half():
    p_plus = t(0.5, 0.3, 0.2)
    p_minus = t(0.1, 0.3, 0.6)
    alpha = 0.3
    ratio = p_plus / (alpha * p_plus + (1 - alpha) * p_minus)
    close(_population_optimum(p_plus, p_minus, 0.5, alpha, "batch").exp(), ratio, tol=1e-6)


# ---------------------------------------------------------------- alpha, validation, registry


def test_resolve_alpha():
    assert resolve_alpha("auto", 0.39) == 0.39
    assert resolve_alpha(0.25, None) == 0.25
    assert resolve_alpha(0.25, 0.9) == 0.25
    for alpha, fraction in (("auto", None), ("auto", 0.0), ("auto", 1.0), ("auto", 1.5), ("half", 0.4),
                            (0.0, None), (1.0, None), (-0.1, None)):
        with pytest.raises(ValueError):
            resolve_alpha(alpha, fraction)


def test_rdro_rejects_bad_arguments():
    r, labels = t(0.0, 1.0), b(True, False)
    for fraction in (None, 0.0, 1.0):
        with pytest.raises(ValueError, match="preferred_fraction"):
            rdro_loss(r, labels, alpha=0.4, weighting="balanced", preferred_fraction=fraction)
    with pytest.raises(ValueError, match="weighting"):
        rdro_loss(r, labels, alpha=0.4, weighting="mean")
    with pytest.raises(ValueError, match="alpha"):
        rdro_loss(r, labels, alpha=1.0)
    with pytest.raises(TypeError, match="bool"):
        rdro_loss(r, torch.tensor([1, 0]), alpha=0.4)


def test_empty_class_stats_are_nan():
    stats = ddro_loss(t(0.5, 1.0), b(True, True)).stats
    assert math.isnan(stats["logratio_non_preferred"].item())
    assert stats["logratio_preferred"].item() == 0.75


def test_registry():
    assert set(LOSSES) == {"rdro", "ddro", "kto", "bco", "dpo", "pro", "kldo", "bpo", "pmle"}
    assert LOSSES["rdro"].fn is rdro_loss and LOSSES["dpo"].fn is dpo_loss
    assert [name for name, spec in LOSSES.items() if spec.needs_pairs] == ["dpo", "bpo", "pmle"]
    assert [name for name, spec in LOSSES.items() if spec.needs_kl] == ["kto"]
    assert [name for name, spec in LOSSES.items() if spec.stateful] == ["bco", "kldo"]
    assert {name: spec.state for name, spec in LOSSES.items() if spec.state} == {"bco": "bco_delta",
                                                                                 "kldo": "kldo_ema"}
    assert [name for name, spec in LOSSES.items() if not spec.needs_ref] == ["pmle"]
    assert [name for name, spec in LOSSES.items() if spec.batch_level] == ["kto", "bco", "kldo"]
    # every loss name a recipe accepts is registered, and the other way round
    from rdro_cli.recipe import LOSS_NAMES

    assert set(LOSS_NAMES) == set(LOSSES)


def test_float32_inputs_keep_their_dtype():
    r = torch.randn(8)
    labels = torch.arange(8) % 2 == 0
    for out in (
        rdro_loss(r, labels, alpha=0.4, weighting="balanced", preferred_fraction=0.5),
        ddro_loss(r, labels),
        kto_loss(r, labels, kl_ref_point=kto_ref_point(r)),
        bco_loss(r, labels, delta=0.1),
        dpo_loss(r, r.flip(0)),
    ):
        assert out.losses.dtype == torch.float32 and out.losses.shape == (8,)
