"""Reduced consistency study (benchmarks/consistency.py, issue 7): small n, one seed, RDRO balanced only."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "consistency.py"


@pytest.fixture(scope="module")
def consistency():
    spec = importlib.util.spec_from_file_location("rdro_consistency_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the file executes
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_task_is_an_alpha_mixture(consistency):
    task = consistency.make_task()
    reference = task.ref_logp.exp()
    p_minus = reference * (1 - task.h) / (1 - task.alpha)
    assert torch.allclose(task.p_plus.sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(p_minus.sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(task.alpha * task.p_plus + (1 - task.alpha) * p_minus, reference, atol=1e-12)
    # the rule has completions nobody rejects (p- = 0), where an unbounded ratio has nothing to stop it
    assert bool((task.h == 1.0).any()) and bool((task.h == 0.0).any())


def test_rdro_balanced_gets_closer_to_p_plus_and_respects_the_bound(consistency):
    ns = (250, 4000)
    study = consistency.run_study(ns=ns, seeds=1, iters=1000, methods=("rdro-balanced",),
                                 include_population=False)
    per_n = study["results"]["rdro-balanced"]
    small, large = per_n[str(ns[0])], per_n[str(ns[-1])]
    assert large["tv"][0] < small["tv"][0]
    for metrics in (small, large):
        # bound = log(1 / alpha) with alpha the sample's preferred fraction ("auto")
        assert metrics["max_logratio"][0] <= metrics["bound"][0] + 0.05


def test_pro_population_optimum_is_stationary(consistency):
    # the derived PRO optimum: the population loss's gradient w.r.t. the free logits vanishes there
    task = consistency.make_task()
    data = consistency.population(task)
    pi = consistency.pro_population_optimum(task)
    assert torch.allclose(pi.sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-9)
    assert bool((pi[task.h == 0.0] == 0).all())  # p+ = 0 there and PRO's regulariser cannot hold mass up

    def gradient(logits):
        logits = logits.clone().requires_grad_()
        prompt, completion, label = data.rows
        r = (torch.log_softmax(logits, -1) - task.ref_logp)[prompt, completion]
        out = consistency.pro_loss(r, label, beta=consistency.BETA, alpha=consistency.PRO_ALPHA,
                                   preferred_fraction=task.alpha)
        ((out.losses * data.weight).sum() / data.weight.sum()).backward()
        return logits.grad

    alive = pi > 0
    at_optimum = gradient(torch.log(pi.clamp(min=1e-300)))
    # where nobody prefers (h = 0) the loss keeps falling as the log-ratio goes to -inf (slope
    # (beta/2)(1 - alpha beta) p- > 0 in r): those logits keep sinking, mass 0, as p+'s there ...
    assert bool((at_optimum[~alive] > 0).all())
    # ... and on the others the gradient is that same push seen through the softmax (proportional to pi):
    # moving mass between completions with p+ > 0 does not lower the loss, so pi* is where the policy stops
    for k in range(4):
        ratio = at_optimum[k][alive[k]] / pi[k][alive[k]]
        assert bool((ratio < 0).all()) and (ratio.std() / ratio.mean().abs()).item() < 1e-6
    at_reference = gradient(task.ref_logp)
    ratio = at_reference[0][alive[0]] / task.ref_logp.exp()[0][alive[0]]
    assert (ratio.std() / ratio.mean().abs()).item() > 0.1  # which pi_ref is far from


def test_new_losses_reduced_study(consistency):
    study = consistency.run_study(ns=(250,), seeds=1, iters=200, methods=consistency.NEW_METHODS,
                                 include_population=False)
    assert set(study["results"]) == set(consistency.NEW_METHODS)
    for method, per_n in study["results"].items():
        metrics = {key: values[0] for key, values in per_n["250"].items()}
        assert 0.0 < metrics["tv"] < 1.0, method
        assert math.isfinite(metrics["max_logratio"]) and metrics["max_logratio"] > 0.0, method
        assert math.isfinite(metrics["max_grad_norm"]) and metrics["max_grad_norm"] > 0.0, method
        assert 0.0 <= metrics["mass_p_minus_zero"] <= 1.0, method
        # every new loss has a derivation to compare with
        kind, tv, mass = study["predictions"][method]
        assert kind in ("=", ">=") and 0.0 <= tv <= 1.0 and 0.0 <= mass <= 1.0
    # the pair losses and KLDO aim at an optimum at infinity; PRO's is finite
    assert study["predictions"]["pro"][0] == "=" and study["predictions"]["kldo"][0] == ">="
    # bpo-lr is DPO through the general form: the same fit to rounding
    dpo = consistency.run_study(ns=(250,), seeds=1, iters=200, methods=("dpo",), include_population=False)
    assert dpo["results"]["dpo"]["250"]["tv"][0] == pytest.approx(study["results"]["bpo-lr"]["250"]["tv"][0],
                                                                  abs=1e-6)
    table = consistency.format_predictions(study)
    assert all(method in table for method in consistency.NEW_METHODS)
