"""Loss functions against hand-worked numbers, independent formulas and the math of docs/losses.md."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rdro_cli.losses.density_ratio import ddro_loss, rdro_loss, resolve_alpha
from rdro_cli.losses.kto_bco import bco_loss, bco_update_delta, kto_loss, kto_ref_point
from rdro_cli.losses.pairwise import dpo_loss
from rdro_cli.losses.registry import LOSSES

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


# ================================================================ issue 14: pro, kldo, bpo, pmle

from rdro_cli.losses.kldo import kldo_loss, kldo_update_ema  # noqa: E402
from rdro_cli.losses.pairwise import BPO_DIVERGENCES, bpo_loss, pmle_loss  # noqa: E402
from rdro_cli.losses.pro import pro_loss  # noqa: E402


def _grad(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    fn(*leaves).backward()
    return [leaf.grad for leaf in leaves]


# ---------------------------------------------------------------- PRO


def test_pro_hand_worked():
    # r = 0: the optimizer term vanishes, the regulariser is (alpha beta / 2) 2 log 2 = 0.25 log 2
    out = pro_loss(t(0.0, 0.0), b(True, False), beta=0.1, alpha=2.5, weighting="batch")
    close(out.losses, [0.25 * LOG2, 0.25 * LOG2])
    # r = 10, u = 1: -+ 0.1 * 0.5 * 10 = -+0.5, regulariser 0.125 (softplus(1) + softplus(-1))
    reg = 0.125 * (math.log(1 + math.e) + math.log(1 + 1 / math.e))
    out = pro_loss(t(10.0, 10.0), b(True, False), beta=0.1, alpha=2.5, weighting="batch")
    close(out.losses, [-0.5 + reg, 0.5 + reg])
    # balanced at pi = 1/4: preferred rows x 2, non-preferred x 2/3
    out = pro_loss(t(10.0, 10.0), b(True, False), beta=0.1, alpha=2.5, preferred_fraction=0.25)
    close(out.losses, [2 * (-0.5 + reg), (2 / 3) * (0.5 + reg)])


@pytest.mark.parametrize("seed", [0, 1])
def test_pro_matches_plain_formula_and_its_gradient(seed):
    r, labels, r_t, labels_t = _random_batch(seed)
    beta, alpha, pi = 0.1, 2.5, float(labels.mean())
    s = np.where(labels, 0.5, -0.5)
    u = beta * r
    # the paper's form with r_H = 0: -beta s r - (alpha beta / 2)[log sigma(u) + log sigma(-u)]
    plain = -beta * s * r - 0.5 * alpha * beta * (np.log(_sigmoid(u)) + np.log(_sigmoid(-u)))
    weights = np.where(labels, 1 / (2 * pi), 1 / (2 * (1 - pi)))
    out = pro_loss(r_t, labels_t, beta=beta, alpha=alpha, preferred_fraction=pi)
    np.testing.assert_allclose(out.losses.numpy(), weights * plain, atol=1e-6)
    # d l / d r = -beta s + (alpha beta^2 / 2) tanh(u / 2)
    (grad,) = _grad(lambda x: pro_loss(x, labels_t, beta=beta, alpha=alpha, weighting="batch").losses.sum(), r_t)
    np.testing.assert_allclose(grad.numpy(), -beta * s + 0.5 * alpha * beta**2 * np.tanh(u / 2), atol=1e-9)


def test_pro_gradient_signs_and_bad_arguments():
    (grad,) = _grad(lambda x: pro_loss(x, b(True, False), weighting="batch").losses.sum(), t(0.0, 0.0))
    assert grad[0] < 0 < grad[1]  # descent raises a preferred row's log-ratio, lowers a non-preferred one
    with pytest.raises(ValueError, match="preferred_fraction"):
        pro_loss(t(0.0), b(True))
    with pytest.raises(ValueError, match="weighting"):
        pro_loss(t(0.0), b(True), weighting="mean")
    with pytest.raises(ValueError, match="alpha and beta"):
        pro_loss(t(0.0), b(True), alpha=0.0, weighting="batch")


# ---------------------------------------------------------------- KLDO


def test_kldo_hand_worked_value_and_gradients():
    # beta = 0.1: u = 1, 2 (preferred), 0, log 3 (non-preferred); B = 4, N+ = N- = 2
    r = t(10.0, 20.0, 0.0, 10 * math.log(3))
    labels = b(True, True, False, False)
    for estimator, ema in (("biased", None), ("ma", 4.0)):
        out = kldo_loss(r, labels, beta=0.1, estimator=estimator, ema=ema)
        close(out.losses, [-2.0, -4.0, 2 * LOG2, 2 * LOG2])  # (4/2)(-u) and (4/2) log mean exp
        close(out.losses.mean(), -1.5 + LOG2)  # -mean(u+) + log mean(exp u-) = -1.5 + log((1 + 3) / 2)
        close(out.stats["kldo_log_mean_exp"], LOG2)
    # gradient of the mean: -beta / N+ on preferred rows; beta exp(u) / (N- m) on non-preferred rows
    (biased,) = _grad(lambda x: kldo_loss(x, labels, estimator="biased").losses.mean(), r)
    close(biased, [-0.05, -0.05, 0.1 * 1 / (2 * 2), 0.1 * 3 / (2 * 2)])
    (ma,) = _grad(lambda x: kldo_loss(x, labels, estimator="ma", ema=4.0).losses.mean(), r)
    close(ma, [-0.05, -0.05, 0.1 * 1 / (2 * 4), 0.1 * 3 / (2 * 4)])
    assert biased[0] < 0 < biased[2]  # gradient sign per row kind


def test_kldo_ema_follows_the_authors_rule():
    # m = 0 means "not started": the first batch mean is taken as it is
    m = kldo_update_ema(0.0, torch.log(t(1.0, 3.0)), rate=0.1)
    assert m == pytest.approx(2.0, abs=1e-12)
    m = kldo_update_ema(m, torch.log(t(5.0, 7.0)), rate=0.1)
    assert m == pytest.approx(0.1 * 6.0 + 0.9 * 2.0, abs=1e-12)
    assert kldo_update_ema(m, torch.empty(0), rate=0.1) == m  # no non-preferred row: unchanged
    # weights are counts: weight 2 on a row = the row twice
    assert kldo_update_ema(0.0, torch.log(t(1.0, 4.0)), weights=t(2.0, 1.0)) == pytest.approx(2.0, abs=1e-12)
    assert isinstance(kldo_update_ema(0.0, torch.zeros(2, requires_grad=True)), float)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kldo_matches_plain_formula(seed):
    r, labels, r_t, labels_t = _random_batch(seed)
    beta = 0.1
    u = beta * r
    plain = -u[labels].mean() + np.log(np.exp(u[~labels]).mean())
    out = kldo_loss(r_t, labels_t, beta=beta, estimator="biased")
    assert out.losses.mean().item() == pytest.approx(plain, abs=1e-6)
    # biased = the exact gradient of the plain objective
    direct = lambda x: -(beta * x[labels_t]).mean() + torch.logsumexp(beta * x[~labels_t], 0) - math.log(  # noqa: E731
        int((~labels_t).sum()))
    (expected,) = _grad(direct, r_t)
    (got,) = _grad(lambda x: kldo_loss(x, labels_t, beta=beta, estimator="biased").losses.mean(), r_t)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-9)
    # ma: same value, the log-mean-exp gradient's denominator replaced by m
    m = 1.7
    (got,) = _grad(lambda x: kldo_loss(x, labels_t, beta=beta, estimator="ma", ema=m).losses.mean(), r_t)
    want = np.where(labels, -beta / labels.sum(), beta * np.exp(u) / ((~labels).sum() * m))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9)
    assert kldo_loss(r_t, labels_t, estimator="ma", ema=m).losses.mean().item() == pytest.approx(plain, abs=1e-6)


def test_kldo_batch_statistics_and_weights():
    r, labels, r_t, labels_t = _random_batch(3, size=40)
    full = kldo_loss(r_t, labels_t, estimator="biased").losses
    # a process holding rows 0..9 of the batch, given the whole batch's statistics, gets the same rows' losses
    part = kldo_loss(r_t[:10], labels_t[:10], estimator="biased", batch_logratios=r_t, batch_labels=labels_t)
    close(part.losses, full[:10], tol=1e-12)
    # weights are counts: doubling every row changes nothing
    doubled = kldo_loss(r_t, labels_t, estimator="biased", batch_weights=torch.full_like(r_t, 2.0)).losses
    close(doubled, full, tol=1e-12)
    # a batch without non-preferred rows: just -mean(u+), no ema needed
    only = kldo_loss(t(10.0, 30.0), b(True, True), estimator="ma", ema=None)
    close(only.losses.mean(), -2.0)
    with pytest.raises(ValueError, match="ema > 0"):
        kldo_loss(t(1.0, 2.0), b(True, False), estimator="ma", ema=0.0)
    with pytest.raises(ValueError, match="estimator"):
        kldo_loss(t(1.0), b(True), estimator="mine")


# ---------------------------------------------------------------- BPO


def test_bpo_lr_through_the_general_form_equals_dpo():
    gen = torch.Generator().manual_seed(7)
    rw = 20 * torch.randn(500, generator=gen, dtype=torch.float64)
    rl = 20 * torch.randn(500, generator=gen, dtype=torch.float64)
    for beta in (0.1, 0.5):
        close(bpo_loss(rw, rl, beta=beta, divergence="lr").losses, dpo_loss(rw, rl, beta=beta).losses, tol=1e-6)
        gb = _grad(lambda a, c, beta=beta: bpo_loss(a, c, beta=beta).losses.sum(), rw, rl)
        gd = _grad(lambda a, c, beta=beta: dpo_loss(a, c, beta=beta).losses.sum(), rw, rl)
        for x, y in zip(gb, gd, strict=True):
            close(x, y, tol=1e-6)


def _h(divergence, lam):
    """h and h' as plain functions of R (numpy), straight from the generators' definitions."""
    if divergence == "lr":
        return (lambda R: R * np.log(R) - (1 + R) * np.log(1 + R)), (lambda R: np.log(R) - np.log(1 + R))
    if divergence == "kliep":
        return (lambda R: R * np.log(R) - R), np.log
    if divergence == "lsif":
        return (lambda R: 0.5 * (R - 1) ** 2), (lambda R: R - 1)
    return (lambda R: (R ** (1 + lam) - R) / lam), (lambda R: ((1 + lam) * R**lam - 1) / lam)


@pytest.mark.parametrize("divergence", BPO_DIVERGENCES)
def test_bpo_matches_the_bregman_form_computed_plainly(divergence):
    rng = np.random.default_rng(3)
    rw, rl = rng.normal(0, 10, 300), rng.normal(0, 10, 300)
    beta, lam = 0.1, 0.7
    R = np.exp(-beta * (rw - rl))
    h, dh = _h(divergence, lam)
    plain = 0.5 * (dh(R) * R - h(R) - dh(1 / R))
    if divergence == "sba":
        plain = plain / (2 * (1 + lam))
    got = bpo_loss(torch.tensor(rw), torch.tensor(rl), beta=beta, divergence=divergence, lam=lam).losses
    np.testing.assert_allclose(got.numpy(), plain, atol=1e-6)


def test_bpo_hand_worked():
    zero = t(0.0)
    # R = 1: lr log 2; kliep (1 + 0) / 2; lsif and ba 0
    close(bpo_loss(zero, zero, divergence="lr").losses, [LOG2])
    close(bpo_loss(zero, zero, divergence="kliep").losses, [0.5])
    close(bpo_loss(zero, zero, divergence="lsif").losses, [0.0])
    close(bpo_loss(zero, zero, divergence="ba", lam=0.5).losses, [0.0])
    # R = e (beta (r_w - r_l) = -1): kliep (e + 1) / 2, lsif (e^2 / 2 - 1/2 - (1/e - 1)) / 2
    e = math.e
    close(bpo_loss(t(0.0), t(10.0), divergence="kliep").losses, [(e + 1) / 2])
    close(bpo_loss(t(0.0), t(10.0), divergence="lsif").losses, [(e**2 / 2 - 0.5 - (1 / e - 1)) / 2])
    # ba at lam = 1: e^2 - (2 / e - 1), halved
    close(bpo_loss(t(0.0), t(10.0), divergence="ba", lam=1.0).losses, [(e**2 - (2 / e - 1)) / 2])


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0, 3.0])
def test_sba_gradient_at_ratio_one_is_dpos(lam):
    zero = t(0.0)
    dpo = _grad(lambda a, c: dpo_loss(a, c).losses.sum(), zero, zero)
    sba = _grad(lambda a, c: bpo_loss(a, c, divergence="sba", lam=lam).losses.sum(), zero, zero)
    ba = _grad(lambda a, c: bpo_loss(a, c, divergence="ba", lam=lam).losses.sum(), zero, zero)
    close(sba[0], dpo[0])
    close(sba[1], dpo[1])
    close(ba[0], 2 * (1 + lam) * dpo[0])  # unscaled BA: 2 (1 + lam) times steeper


@pytest.mark.parametrize("divergence", [*BPO_DIVERGENCES, "dpo", "pmle"])
def test_pair_losses_push_chosen_up_and_rejected_down(divergence):
    rng = np.random.default_rng(5)
    rw, rl = torch.tensor(rng.normal(0, 5, 50)), torch.tensor(rng.normal(0, 5, 50))
    if divergence == "dpo":
        fn = lambda a, c: dpo_loss(a, c).losses.sum()  # noqa: E731
    elif divergence == "pmle":
        fn = lambda a, c: pmle_loss(a, c, gamma=0.05).losses.sum()  # noqa: E731
    else:
        fn = lambda a, c: bpo_loss(a, c, divergence=divergence, lam=0.5).losses.sum()  # noqa: E731
    g_chosen, g_rejected = _grad(fn, rw, rl)
    assert bool((g_chosen < 0).all()) and bool((g_rejected > 0).all())
    close(g_chosen, -g_rejected)  # a function of r_w - r_l only


@pytest.mark.parametrize("divergence", BPO_DIVERGENCES)
def test_bpo_population_optimum_is_dpos(divergence):
    # a pair (a, b) shown as a > b with probability 0.7 and as b > a with 0.3: every instance's expected
    # loss is stationary where sigmoid(beta (r_a - r_b)) = 0.7, i.e. beta (r_a - r_b) = log(7 / 3)
    beta = 0.1
    star = torch.tensor([math.log(7 / 3) / beta], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    risk = (0.7 * bpo_loss(star, zero, beta=beta, divergence=divergence, lam=0.5).losses
            + 0.3 * bpo_loss(zero, star, beta=beta, divergence=divergence, lam=0.5).losses).sum()
    (grad,) = torch.autograd.grad(risk, star)
    assert abs(grad.item()) < 1e-12
    # and it is a minimum: moving either way raises the risk
    for step in (-1.0, 1.0):
        moved = star.detach() + step
        other = (0.7 * bpo_loss(moved, zero, beta=beta, divergence=divergence, lam=0.5).losses
                 + 0.3 * bpo_loss(zero, moved, beta=beta, divergence=divergence, lam=0.5).losses).sum()
        assert other > risk


def test_bpo_ratio_clamp_and_bad_arguments():
    # beyond the clamp (R < 1e-6, beta (r_w - r_l) > 13.8) the loss is constant: finite value, zero gradient
    big = t(1000.0).requires_grad_()
    out = bpo_loss(big, t(0.0), divergence="lsif")
    out.losses.sum().backward()
    assert math.isfinite(out.losses.item()) and big.grad.item() == 0.0
    with pytest.raises(ValueError, match="divergence"):
        bpo_loss(t(0.0), t(0.0), divergence="hellinger")
    with pytest.raises(ValueError, match="lam"):
        bpo_loss(t(0.0), t(0.0), divergence="ba", lam=0.0)
    with pytest.raises(ValueError, match="differ"):
        bpo_loss(t(0.0, 1.0), t(0.0))


# ---------------------------------------------------------------- preference MLE


def test_pmle_hand_worked_and_plain_formula():
    # gamma (s_w - s_l) = 5e-3 * 200 = 1
    out = pmle_loss(t(-100.0, -50.0), t(-300.0, -50.0), gamma=5e-3)
    close(out.losses, [math.log(1 + math.exp(-1.0)), LOG2])
    close(out.stats["reward_accuracy"], 0.5)
    rng = np.random.default_rng(0)
    sw, sl = rng.normal(-50, 30, 100), rng.normal(-50, 30, 100)
    np.testing.assert_allclose(pmle_loss(torch.tensor(sw), torch.tensor(sl)).losses.numpy(),
                               -np.log(_sigmoid(5e-3 * (sw - sl))), atol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        pmle_loss(t(0.0), t(0.0), gamma=0.0)


def test_new_losses_keep_float32():
    r = torch.randn(8)
    labels = torch.arange(8) % 2 == 0
    for out in (pro_loss(r, labels, preferred_fraction=0.5), kldo_loss(r, labels, estimator="ma", ema=1.0),
                bpo_loss(r, r.flip(0), divergence="sba", lam=0.5), pmle_loss(r, r.flip(0))):
        assert out.losses.dtype == torch.float32 and out.losses.shape == (8,)


# ---------------------------------------------------------------- recipe keys


def test_new_recipe_keys_are_validated():
    from rdro_cli.recipe import RecipeError, load_recipe

    cfg = load_recipe(None, ["loss.name=bpo", "loss.bpo_divergence=sba", "loss.bpo_lam=0.5",
                             "loss.kldo_estimator=biased", "loss.kldo_rate=1", "loss.pro_alpha=7.5",
                             "loss.pro_weighting=batch", "loss.pmle_gamma=0.01", "loss.bpo_ratio_min=1e-8"])
    assert (cfg.loss.bpo_divergence, cfg.loss.bpo_lam, cfg.loss.kldo_estimator, cfg.loss.kldo_rate) == \
        ("sba", 0.5, "biased", 1.0)
    defaults = load_recipe(None, []).loss
    assert (defaults.pro_alpha, defaults.pro_weighting, defaults.kldo_estimator, defaults.kldo_rate,
            defaults.bpo_divergence, defaults.pmle_gamma, defaults.beta) == (2.5, "balanced", "ma", 0.1, "lr",
                                                                              5e-3, 0.1)
    bad = {"loss.bpo_divergence=hellinger": "is not one of", "loss.kldo_estimator=mine": "is not one of",
           "loss.kldo_rate=0": "must be in (0, 1]", "loss.kldo_rate=1.5": "must be in (0, 1]",
           "loss.pro_alpha=-1": "must be > 0", "loss.bpo_lam=0": "must be > 0",
           "loss.bpo_ratio_min=1": "must be in (0, 1)", "loss.pmle_gamma=0": "must be > 0",
           "loss.pro_alpha=true": "must be a number", "loss.bpo_lambda=1": "did you mean loss.bpo_lam",
           "loss.name=simpo": "is not one of"}
    for item, message in bad.items():
        with pytest.raises(RecipeError) as err:
            load_recipe(None, [item])
        assert message in str(err.value) and "\n" not in str(err.value), (item, str(err.value))


# ---------------------------------------------------------------- data parallelism (batch-level losses)


def _global_batch(seed=11, size=16):
    gen = torch.Generator().manual_seed(seed)
    r = 8 * torch.randn(size, generator=gen, dtype=torch.float64)
    labels = torch.rand(size, generator=gen) < 0.45
    kl = 3 * torch.randn(size, generator=gen, dtype=torch.float64)
    return r, labels, kl


def _batch_level_losses(name, r, labels, gathered_r, gathered_labels, gathered_kl):
    """One process's per-example losses as train._micro_step computes them: state and batch statistics
    from the gathered global batch, losses for this process's own rows."""
    if name == "kldo-ma":
        ema = kldo_update_ema(0.5, 0.1 * gathered_r[~gathered_labels], rate=0.1)
        return kldo_loss(r, labels, estimator="ma", ema=ema, batch_logratios=gathered_r,
                         batch_labels=gathered_labels).losses
    if name == "kldo-biased":
        return kldo_loss(r, labels, estimator="biased", batch_logratios=gathered_r, batch_labels=gathered_labels).losses
    if name == "kto":
        return kto_loss(r, labels, kl_ref_point=kto_ref_point(gathered_kl)).losses
    delta, _ = bco_update_delta(0.3, 10, 0.1 * gathered_r)
    return bco_loss(r, labels, delta=delta).losses


BATCH_LEVEL = ("kldo-ma", "kldo-biased", "kto", "bco")


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        r, labels, kl = _global_batch()
        mine = slice(rank * len(r) // world, (rank + 1) * len(r) // world)
        results = {}
        for name in BATCH_LEVEL:
            local = r[mine].clone().requires_grad_()
            # what accelerator.gather does: every process gets the whole global batch, detached
            parts = [torch.empty_like(r[mine]) for _ in range(world)]
            dist.all_gather(parts, local.detach())
            label_parts = [torch.empty_like(labels[mine]) for _ in range(world)]
            dist.all_gather(label_parts, labels[mine])
            kl_parts = [torch.empty_like(kl[mine]) for _ in range(world)]
            dist.all_gather(kl_parts, kl[mine])
            losses = _batch_level_losses(name, local, labels[mine], torch.cat(parts), torch.cat(label_parts),
                                         torch.cat(kl_parts))
            # train's reduction: each process backwards sum * processes / B and DDP averages the gradients
            (losses.sum() * world / len(r)).backward()
            total = losses.detach().sum().reshape(1)
            dist.all_reduce(total)
            results[name] = {"grad": (local.grad / world).tolist(), "loss": total.item() / len(r)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_batch_level_losses_two_processes_equal_one_with_twice_the_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    r, labels, kl = _global_batch()
    for name in BATCH_LEVEL:
        one = r.clone().requires_grad_()
        losses = _batch_level_losses(name, one, labels, r, labels, kl)
        losses.mean().backward()
        two_grad = torch.tensor(ranks[0][name]["grad"] + ranks[1][name]["grad"], dtype=torch.float64)
        assert torch.allclose(two_grad, one.grad, atol=1e-5, rtol=0), name
        assert ranks[0][name]["loss"] == pytest.approx(losses.mean().item(), abs=1e-5), name
        assert ranks[1][name]["loss"] == ranks[0][name]["loss"]
        assert one.grad.abs().sum() > 0
