"""Reduced consistency study (benchmarks/consistency.py, issue 7): small n, one seed, RDRO balanced only."""

import importlib.util
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
