"""Consistency and stability study on a task whose preferred distribution is known exactly (issue 7).

The task: a few prompts, every completion of 1 to 3 tokens over a 6-token vocabulary (258 per
prompt), a reference policy pi_ref, and an acceptance rule h(x, y) in [0, 1]. A training row is
y ~ pi_ref(.|x) with label z ~ Bernoulli(h(x, y)), so

    p+(y|x) = pi_ref h / alpha,   p-(y|x) = pi_ref (1 - h) / (1 - alpha),   pi_ref = alpha p+ + (1 - alpha) p-

with alpha = P(z = 1). pi_ref is tilted per prompt so every prompt has the same acceptance rate
alpha; otherwise the mixture identity would hold per prompt with a different alpha each.

h scores each token of y against the prompt's token a in a cyclic game over the vocabulary (token
t wins iff (t - a) mod 6 is 1 or 2, draws iff t = a) and averages win = 1, draw = 1/2, loss = 0.
It takes the values 0 and 1 on many completions (p- = 0 or p+ = 0 there), which no finite
Bradley-Terry / logistic reward expresses. Comparing a preferred with a non-preferred sample implies
the reward logit(h), so the policies the reward-model losses aim at, roughly pi_ref exp(reward / beta),
are not p+ = pi_ref h / alpha.

Each loss from ``rdro_cli.losses`` fits a tabular policy (free logits per prompt and completion,
log-softmax per prompt, initialised at pi_ref so r = 0) by full-batch Adam; we report the exact
total-variation distance to p+ (by enumeration, mean over prompts), the largest log-ratio of any
training row reached during optimisation, and the largest gradient norm. Each loss is also fitted
once on the population itself (column n=inf: every row weighted by its probability), which shows
where it heads with unlimited data. A reference row fits maximum likelihood on the preferred rows
alone ("sft+"), the plain consistent estimator of p+ that ignores pi_ref and the rejected rows.

Issue 14 adds PRO, KLDO, the BPO family and preference MLE (pair losses on the DPO pairs), each with the
population optimum derived on paper (``predicted_tv``; docs/losses.md) printed next to its measured TV.
The pair losses' population fits (213,744 weighted pairs) dominate the cost.

    .venv/bin/python benchmarks/consistency.py            # full study (15 methods): long, see docs/losses.md
    .venv/bin/python benchmarks/consistency.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# run as a script from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rdro_cli.losses.density_ratio import ddro_loss, rdro_loss, resolve_alpha
from rdro_cli.losses.kldo import kldo_loss, kldo_update_ema
from rdro_cli.losses.kto_bco import bco_loss, bco_update_delta, kto_loss, kto_ref_point
from rdro_cli.losses.pairwise import BPO_DIVERGENCES, bpo_loss, dpo_loss, pmle_loss  # noqa: E402
from rdro_cli.losses.pro import pro_loss

NEW_METHODS = ("pro", "kldo", *(f"bpo-{d}" for d in BPO_DIVERGENCES), "pmle")  # issue 14
METHODS = ("rdro-balanced", "rdro-batch", "ddro", "kto", "bco", "dpo", *NEW_METHODS, "sft+")
PAIR_METHODS = ("dpo", *(f"bpo-{d}" for d in BPO_DIVERGENCES), "pmle")
DEFAULT_NS = (250, 1000, 4000, 16000)
BETA = 0.1  # KTO, BCO, DPO, PRO, KLDO and BPO at their usual default
PRO_ALPHA = 2.5  # PRO's regulariser weight (its default)
BPO_LAM = 1.0  # lambda of bpo-ba and bpo-sba
KLDO_RATE = 0.1  # KLDO's moving-average rate
PMLE_GAMMA = 5e-3  # preference MLE's gamma (its default)


@dataclass
class Task:
    completions: list[tuple[int, ...]]
    ref_logp: torch.Tensor  # [prompts, completions], log pi_ref(y|x)
    h: torch.Tensor  # [prompts, completions], P(z = 1 | x, y)
    p_plus: torch.Tensor  # [prompts, completions]
    alpha: float


def make_task(prompts: int = 4, vocab: int = 6, max_len: int = 3, alpha: float = 0.4, seed: int = 0) -> Task:
    completions = [c for length in range(1, max_len + 1) for c in itertools.product(range(vocab), repeat=length)]
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
    h_rows, ref_rows = [], []
    for prompt in range(prompts):
        target = prompt % vocab

        def score(token: int, target: int = target) -> float:
            step = (token - target) % vocab
            return 1.0 if step in (1, 2) else 0.5 if step == 0 else 0.0

        h = torch.tensor([sum(map(score, c)) / len(c) for c in completions], dtype=torch.float64)
        # a long-tailed reference that prefers short completions, like a real LM
        base = 1.5 * torch.randn(len(completions), generator=gen, dtype=torch.float64) - 0.8 * lengths
        ref_rows.append(_tilt_to_acceptance(base, h, alpha))
        h_rows.append(h)
    ref_logp, h = torch.stack(ref_rows), torch.stack(h_rows)
    p_plus = ref_logp.exp() * h / alpha
    return Task(completions, ref_logp, h, p_plus, alpha)


def _tilt_to_acceptance(base_logits: torch.Tensor, h: torch.Tensor, alpha: float) -> torch.Tensor:
    """log-softmax(base + t h) with t chosen by bisection so that E[h] = alpha exactly."""
    low, high = -50.0, 50.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if (torch.log_softmax(base_logits + mid * h, -1).exp() * h).sum() < alpha:
            low = mid
        else:
            high = mid
    return torch.log_softmax(base_logits + 0.5 * (low + high) * h, -1)


@dataclass
class Data:
    """Training data as weighted unique rows: counts for a sample, probabilities for the population."""

    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # prompt, completion, label (bool)
    weight: torch.Tensor
    kl_rows: tuple[torch.Tensor, torch.Tensor]  # prompt, completion of another prompt (KTO's mismatched pair)
    kl_weight: torch.Tensor
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # prompt, chosen, rejected (DPO)
    pair_weight: torch.Tensor


def _unique_rows(*columns: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    unique, counts = torch.unique(torch.stack([c.long() for c in columns]), dim=1, return_counts=True)
    return tuple(unique), counts.double()


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ((values * weight).sum() / weight.sum()).reshape(1)


def draw_sample(task: Task, n: int, seed: int) -> Data:
    """n rows y ~ pi_ref(.|x), z ~ Bernoulli(h); mismatched pairs and DPO pairs built from the same rows."""
    gen = torch.Generator().manual_seed(seed)
    prompts = task.ref_logp.shape[0]
    prompt = torch.randint(prompts, (n,), generator=gen)
    completion = torch.multinomial(task.ref_logp.exp()[prompt], 1, generator=gen).squeeze(1)
    label = torch.rand(n, generator=gen, dtype=torch.float64) < task.h[prompt, completion]

    kl_completion = torch.empty_like(completion)
    pair_prompt, pair_chosen, pair_rejected = [], [], []
    for k in range(prompts):
        mine = (prompt == k).nonzero().squeeze(1)
        others = (prompt != k).nonzero().squeeze(1)
        kl_completion[mine] = completion[others[torch.randint(len(others), (len(mine),), generator=gen)]]
        # DPO pairs one preferred with one non-preferred row of the same prompt, at random, each used once
        chosen = mine[label[mine]]
        rejected = mine[~label[mine]]
        chosen = chosen[torch.randperm(len(chosen), generator=gen)]
        rejected = rejected[torch.randperm(len(rejected), generator=gen)]
        pairs = min(len(chosen), len(rejected))
        pair_prompt.append(torch.full((pairs,), k))
        pair_chosen.append(completion[chosen[:pairs]])
        pair_rejected.append(completion[rejected[:pairs]])

    rows, weight = _unique_rows(prompt, completion, label)
    kl_rows, kl_weight = _unique_rows(prompt, kl_completion)
    pairs, pair_weight = _unique_rows(torch.cat(pair_prompt), torch.cat(pair_chosen), torch.cat(pair_rejected))
    return Data((rows[0], rows[1], rows[2].bool()), weight, kl_rows, kl_weight, pairs, pair_weight)


def population(task: Task) -> Data:
    """The n -> infinity limit of draw_sample: every row weighted by its probability."""
    prompts, completions = task.ref_logp.shape
    reference = task.ref_logp.exp() / prompts  # joint over uniform prompts
    grid_prompt = torch.arange(prompts).repeat_interleave(completions)
    grid_completion = torch.arange(completions).repeat(prompts)
    weight = torch.cat([(reference * task.h).flatten(), (reference * (1 - task.h)).flatten()])
    label = torch.cat([torch.ones(prompts * completions, dtype=torch.bool),
                       torch.zeros(prompts * completions, dtype=torch.bool)])
    keep = weight > 0
    rows = (grid_prompt.repeat(2)[keep], grid_completion.repeat(2)[keep], label[keep])

    # the mismatched completion is drawn from pi_ref of a uniformly chosen other prompt
    other = (reference.sum(0, keepdim=True) - reference) * prompts / (prompts - 1)
    kl_weight = (other / prompts).flatten()

    p_minus = task.ref_logp.exp() * (1 - task.h) / (1 - task.alpha)
    pair_weight = (task.p_plus[:, :, None] * p_minus[:, None, :] / prompts).flatten()
    pair_prompt = torch.arange(prompts).repeat_interleave(completions * completions)
    chosen = torch.arange(completions).repeat_interleave(completions).repeat(prompts)
    rejected = torch.arange(completions).repeat(completions * prompts)
    keep_pair = pair_weight > 0
    return Data(rows, weight[keep], (grid_prompt, grid_completion), kl_weight,
                (pair_prompt[keep_pair], chosen[keep_pair], rejected[keep_pair]), pair_weight[keep_pair])


def fit(task: Task, data: Data, method: str, iters: int, lr: float) -> dict[str, float]:
    """Full-batch Adam on tabular logits; returns TV to p+, max training-row log-ratio, max grad norm.

    Rows are unique and weighted (by counts, or by probabilities for the population), so the weighted
    mean equals the plain mean over rows that the training loop takes, at a cost independent of n.
    """
    prompt, completion, label = data.rows
    weight = data.weight
    preferred_fraction = (weight[label].sum() / weight.sum()).item()
    alpha = resolve_alpha("auto", preferred_fraction)
    logits = task.ref_logp.clone().requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=lr)
    delta, steps, ema = 0.0, 0, 0.0
    max_logratio, max_grad_norm = -math.inf, 0.0

    for _ in range(iters):
        r_all = torch.log_softmax(logits, -1) - task.ref_logp
        r = r_all[prompt, completion]
        weights = weight
        if method == "rdro-balanced":
            out = rdro_loss(r, label, alpha=alpha, weighting="balanced", preferred_fraction=preferred_fraction)
        elif method == "rdro-batch":
            out = rdro_loss(r, label, alpha=alpha)
        elif method == "ddro":
            out = ddro_loss(r, label)
        elif method == "kto":
            # the global batch's mean over mismatched pairs, passed as a one-row batch
            kl = _weighted_mean(r_all[data.kl_rows], data.kl_weight)
            out = kto_loss(r, label, kl_ref_point=kto_ref_point(kl), beta=BETA)
        elif method == "bco":
            # every step sees the whole (equal-sized) batch, so the running mean of all u seen
            # equals the running mean of the per-step batch means
            delta, steps = bco_update_delta(delta, steps, _weighted_mean(BETA * r, weight))
            out = bco_loss(r, label, delta=delta, beta=BETA)
        elif method == "pro":
            out = pro_loss(r, label, beta=BETA, alpha=PRO_ALPHA, preferred_fraction=preferred_fraction)
        elif method == "kldo":
            # the whole (weighted) sample is the global batch; m advances once per step, as in train
            ema = kldo_update_ema(ema, BETA * r.detach()[~label], rate=KLDO_RATE, weights=weight[~label])
            out = kldo_loss(r, label, beta=BETA, estimator="ma", ema=ema, batch_weights=weight)
        elif method in PAIR_METHODS:
            pair_prompt, chosen, rejected = data.pairs
            r_chosen, r_rejected = r_all[pair_prompt, chosen], r_all[pair_prompt, rejected]
            if method == "dpo":
                out = dpo_loss(r_chosen, r_rejected, beta=BETA)
            elif method == "pmle":  # reference-free: the policy's own log-probs
                logp = torch.log_softmax(logits, -1)
                out = pmle_loss(logp[pair_prompt, chosen], logp[pair_prompt, rejected], gamma=PMLE_GAMMA)
            else:
                out = bpo_loss(r_chosen, r_rejected, beta=BETA, divergence=method.removeprefix("bpo-"), lam=BPO_LAM)
            r, weights = torch.cat([r_chosen, r_rejected]), data.pair_weight
        elif method == "sft+":
            out = None
        else:
            raise ValueError(f"unknown method {method!r}")
        if out is None:
            loss = -_weighted_mean((r + task.ref_logp[prompt, completion])[label], weight[label]).squeeze()
        else:
            loss = (out.losses * weights).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        max_logratio = max(max_logratio, r.detach().max().item())
        max_grad_norm = max(max_grad_norm, logits.grad.norm().item())
        optimizer.step()

    final_logp = torch.log_softmax(logits.detach(), -1)
    return {
        "tv": 0.5 * (final_logp.exp() - task.p_plus).abs().sum(-1).mean().item(),
        # where p- = 0 (h = 1): the set an unbounded ratio drives all mass to
        "mass_p_minus_zero": (final_logp.exp() * (task.h == 1.0)).sum(-1).mean().item(),
        "max_logratio": max_logratio,
        "final_max_logratio": (final_logp - task.ref_logp)[prompt, completion].max().item(),
        "max_grad_norm": max_grad_norm,
        "final_grad_norm": logits.grad.norm().item(),
        "alpha": alpha,
        "bound": math.log(1.0 / alpha),
        "excess_over_bound": max_logratio - math.log(1.0 / alpha),
    }


def pro_population_optimum(task: Task, *, beta: float = BETA, alpha: float = PRO_ALPHA) -> torch.Tensor:
    """The policy PRO (balanced) converges to with unlimited data, by solving its stationarity condition.

    Per prompt, with ``z = log pi - log pi_ref`` and the classes weighted equally (row weights p+ / 2 and
    p- / 2), the loss is ``sum_y p+(y)/2 (-beta z/2 + Reg(z)) + p-(y)/2 (beta z/2 + Reg(z))`` with
    ``Reg(z) = (alpha beta / 2)(softplus(beta z) + softplus(-beta z))``, ``Reg'(z) = (alpha beta^2/2) tanh(beta z/2)``.
    Free logits under a softmax are stationary where ``dL/dz(y) = G pi(y)`` for one constant G per prompt:

        A(y) + B(y) tanh(beta z / 2) + c pi_ref(y) e^z = 0,   A = -(beta/2)(p+ - p-),  B = (alpha beta^2/2)(p+ + p-)

    with ``c = -2G > 0``. The left side increases in z, so each y has one root, or none when
    ``A - B >= 0`` (then z = -inf: every y with p+ = 0, since alpha beta < 1); c is set by bisection so
    that pi sums to 1. Returns pi* [prompts, completions].
    """
    reference = task.ref_logp.exp()
    p_minus = reference * (1 - task.h) / (1 - task.alpha)
    a = -(beta / 2) * (task.p_plus - p_minus)
    b = (alpha * beta**2 / 2) * (task.p_plus + p_minus)
    alive = (a - b) < 0

    def policy(log_c: torch.Tensor) -> torch.Tensor:
        low = torch.full_like(a, -300.0)
        high = torch.full_like(a, 300.0)
        c = log_c.exp()[:, None]
        for _ in range(200):  # bisection on z for every y at once
            mid = 0.5 * (low + high)
            f = a + b * torch.tanh(beta * mid / 2) + c * reference * torch.exp(mid.clamp(max=300))
            low, high = torch.where(f < 0, mid, low), torch.where(f < 0, high, mid)
        z = 0.5 * (low + high)
        return torch.where(alive, reference * z.exp(), torch.zeros_like(reference))

    low = torch.full((a.shape[0],), -60.0, dtype=a.dtype)
    high = torch.full((a.shape[0],), 60.0, dtype=a.dtype)
    for _ in range(100):  # larger c, smaller z: bisection on log c for total mass 1
        mid = 0.5 * (low + high)
        mass = policy(mid).sum(-1)
        low, high = torch.where(mass > 1, mid, low), torch.where(mass > 1, high, mid)
    pi = policy(0.5 * (low + high))
    return pi / pi.sum(-1, keepdim=True)


def predicted_tv(task: Task, method: str) -> tuple[str, float, float] | None:
    """What the derivation (docs/losses.md, "population optimum") says TV(policy, p+) tends to as n -> inf,
    and the policy's mass on {h = 1} (where p- = 0) there.

    Returns ("=", tv, mass) for a finite optimum, (">=", tv, 1.0) for an optimum at infinity (a lower bound
    on TV that optimisation only approaches; the mass on {h = 1} grows towards 1), None where the study
    makes no prediction. M below is p+'s mass on {h = 1}.

    - rdro-balanced, sft+: p+ exactly ("=", 0).
    - dpo and every bpo instance: sigmoid(beta (r_a - r_b)) = P(a > b) = p+(a)p-(b) / (p+(a)p-(b) + p+(b)p-(a)),
      so pi ∝ pi_ref (p+/p-)^(1/beta), unbounded where p- = 0: all mass moves to {h = 1} and TV >= 1 - M.
    - kldo: the Donsker-Varadhan bound is maximal at beta r = log(p+/p-) + const: the same pi, TV >= 1 - M.
    - pmle (reference-free): pi ∝ (p+/p-)^(1/gamma): the same support, TV >= 1 - M.
    These four losses depend on the logits of a prompt only through their differences (pairs: r_a - r_b;
    kldo: invariant to adding a constant to every r), so the policy's normalisation cannot hold the
    {h = 1} logits back. Not so for ddro or bco: their unconstrained optima are unbounded too, but the
    normalised policy caps r <= -log pi_ref, and their constrained optimum is finite and not derived here.
    - pro: the root of its stationarity condition (pro_population_optimum), "=".
    - rdro-batch, ddro, kto, bco: no closed form here (None).
    """
    p_plus_mass = (task.p_plus * (task.h == 1.0)).sum(-1).mean().item()
    if method in ("rdro-balanced", "sft+"):
        return "=", 0.0, p_plus_mass
    if method in ("kldo", "pmle", *PAIR_METHODS):
        return ">=", 1.0 - p_plus_mass, 1.0
    if method == "pro":
        pi = pro_population_optimum(task)
        return "=", 0.5 * (pi - task.p_plus).abs().sum(-1).mean().item(), (pi * (task.h == 1.0)).sum(-1).mean().item()
    return None


def check_predictions(study: dict, tolerance: float = 0.05) -> dict[str, dict]:
    """The n = inf fit against each derivation; ``contradicts`` when it lands outside it.

    A finite optimum ("="): |TV - derived| <= tolerance. An optimum at infinity (">="): a finite run cannot
    reach it, so the check is its direction: the fit must have moved mass onto {h = 1} beyond p+'s own
    share there (by more than tolerance), i.e. away from p+ towards the derived limit.
    """
    p_plus_mass = study["task"]["p_plus_mass_where_p_minus_is_0"]
    checks = {}
    for method, per_column in study["results"].items():
        prediction = study["predictions"].get(method)
        if prediction is None or "inf" not in per_column:
            continue
        kind, value, mass = prediction
        measured, measured_mass = per_column["inf"]["tv"][0], per_column["inf"]["mass_p_minus_zero"][0]
        if kind == "=":
            bad = abs(measured - value) > tolerance
        else:
            bad = measured_mass < p_plus_mass + tolerance
        checks[method] = {"kind": kind, "predicted": value, "measured_inf": measured, "predicted_mass": mass,
                          "measured_mass_inf": measured_mass, "contradicts": bad}
    return checks


def run_study(ns=DEFAULT_NS, seeds: int = 5, iters: int = 3000, lr: float = 0.02,
              methods=METHODS, include_population: bool = True, progress: bool = False) -> dict:
    """Fit every method for every n and seed, and once on the population (key "inf").

    Returns results[method][str(n) or "inf"][metric] as lists over seeds, with the task and settings.
    """
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and the machine is shared
    task = make_task()
    reference = task.ref_logp.exp()
    columns = [str(n) for n in ns] + (["inf"] if include_population else [])
    results: dict = {m: {column: {} for column in columns} for m in methods}
    jobs = [(str(n), seed, lambda n=n, seed=seed: draw_sample(task, n, seed=1000 * seed + n))
            for n, seed in itertools.product(ns, range(seeds))]
    if include_population:
        jobs.append(("inf", 0, lambda: population(task)))
    for column, seed, make_data in jobs:
        data = make_data()
        start = time.perf_counter()
        for method in methods:
            for key, value in fit(task, data, method, iters, lr).items():
                results[method][column].setdefault(key, []).append(value)
        if progress:
            print(f"  n={column} seed={seed}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return {
        "task": {
            "prompts": task.ref_logp.shape[0],
            "completions_per_prompt": len(task.completions),
            "alpha": task.alpha,
            "bound_log_1_over_alpha": math.log(1 / task.alpha),
            "tv_reference_to_p_plus": 0.5 * (reference - task.p_plus).abs().sum(-1).mean().item(),
            "p_plus_mass_where_p_minus_is_0": (task.p_plus * (task.h == 1.0)).sum(-1).mean().item(),
        },
        "settings": {"ns": list(ns), "columns": columns, "seeds": seeds, "iters": iters, "lr": lr, "optimizer": "adam",
                     "beta": BETA, "alpha": "auto (empirical preferred fraction)", "pro_alpha": PRO_ALPHA,
                     "bpo_lam": BPO_LAM, "kldo_rate": KLDO_RATE, "pmle_gamma": PMLE_GAMMA},
        "predictions": {m: predicted_tv(task, m) for m in methods if predicted_tv(task, m) is not None},
        "results": results,
    }


def _summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def format_tables(study: dict) -> str:
    columns = study["settings"]["columns"]
    lines = []
    titles = {"tv": "TV(policy, p+)",
              "max_logratio": "max log-ratio of a training row during optimisation",
              "excess_over_bound": "max log-ratio during optimisation minus log(1/alpha), alpha = preferred fraction",
              "final_max_logratio": "max log-ratio of a training row at the end",
              "max_grad_norm": "largest gradient norm (w.r.t. the logits, of the mean loss)"}
    for metric, title in titles.items():
        lines.append(f"\n{title}  (mean ± std over {study['settings']['seeds']} seeds; n=inf: population, one fit)")
        header = f"{'method':<14}" + "".join(f"{'n=' + column:>22}" for column in columns)
        lines += [header, "-" * len(header)]
        for method, per_column in study["results"].items():
            lines.append(f"{method:<14}" + "".join(f"{_summary(per_column[c][metric]):>22}" for c in columns))
    lines += ["", format_predictions(study)]
    return "\n".join(lines)


def format_predictions(study: dict) -> str:
    """The derivation's n -> inf TV next to the measured TV at each n; flags a contradicted derivation."""
    columns = study["settings"]["columns"]
    checks = check_predictions(study) if "inf" in columns else {}
    lines = ["derived population optimum next to the measured fits: TV to p+, and the policy's mass on {h = 1} "
             f"(p- = 0; p+ puts {study['task']['p_plus_mass_where_p_minus_is_0']:.4f} there)",
             f"{'method':<14}{'derived TV':>11}" + "".join(f"{'n=' + c:>10}" for c in columns)
             + f"{'mass':>8}" + "".join(f"{'n=' + c:>10}" for c in columns) + "  check"]
    lines.append("-" * len(lines[-1]))
    for method, per_column in study["results"].items():
        prediction = study["predictions"].get(method)
        if prediction is None:
            continue
        kind, value, mass = prediction
        tvs = "".join(f"{statistics.mean(per_column[c]['tv']):>10.4f}" for c in columns)
        masses = "".join(f"{statistics.mean(per_column[c]['mass_p_minus_zero']):>10.4f}" for c in columns)
        check = checks.get(method)
        verdict = "" if check is None else ("CONTRADICTS the derivation" if check["contradicts"] else "ok")
        lines.append(f"{method:<14}{kind + format(value, '.4f'):>11}{tvs}{'->' + format(mass, '.2f'):>8}{masses}"
                     f"  {verdict}")
    lines.append("('>=': optimum at infinity; TV reaches the bound only with unlimited optimisation, so the "
                 "check is that mass moves onto {h = 1}, i.e. away from p+)")
    return "\n".join(lines)


def plot(study: dict, path: Path) -> None:
    """TV to p+, max training-row log-ratio and largest gradient norm against n, one line per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = study["settings"]["ns"]
    panels = [("tv", "total variation to p+"), ("max_logratio", "max log-ratio of a training row"),
              ("max_grad_norm", "largest gradient norm")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colours = plt.get_cmap("tab20").colors  # 15 methods: the default 10-colour cycle repeats
    for index, (method, per_column) in enumerate(study["results"].items()):
        colour = colours[index % len(colours)]
        style = "--" if method == "sft+" else ("-." if method in NEW_METHODS else "-")
        for ax, (metric, _) in zip(axes, panels, strict=True):
            means = [np.mean(per_column[str(n)][metric]) for n in ns]
            stds = [np.std(per_column[str(n)][metric]) for n in ns]
            ax.errorbar(ns, means, yerr=stds, marker="o", capsize=3, label=method, linestyle=style, color=colour)
            if "inf" in per_column:  # where each loss would end up with unlimited data
                ax.axhline(per_column["inf"][metric][0], color=colour, linestyle=":", linewidth=1)
    for ax, (metric, label) in zip(axes, panels, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log" if metric != "max_logratio" else "linear")
        ax.set_xlabel("training rows n")
        ax.set_ylabel(label)
    axes[1].axhline(study["task"]["bound_log_1_over_alpha"], color="black", linewidth=0.8)
    axes[0].set_title("Consistency on an enumerable task (dotted: n = infinity)")
    axes[2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_NS), help="training set sizes")
    parser.add_argument("--seeds", type=int, default=5, help="data seeds per n")
    parser.add_argument("--iters", type=int, default=3000, help="full-batch Adam steps per fit")
    parser.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    parser.add_argument("--quick", action="store_true", help="n = 250 4000, one seed, 1000 steps")
    parser.add_argument("--no-population", action="store_true", help="skip the n = infinity fits")
    parser.add_argument("--plot", default=str(Path(__file__).parent / "consistency_tv.png"),
                        help="PNG of TV against n ('' to skip)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.seeds, args.iters = [250, 4000], 1, 1000

    start = time.perf_counter()
    study = run_study(args.n, args.seeds, args.iters, args.lr, include_population=not args.no_population,
                      progress=True)
    task = study["task"]
    print(f"task: {task['prompts']} prompts x {task['completions_per_prompt']} completions, "
          f"alpha = {task['alpha']}, bound log(1/alpha) = {task['bound_log_1_over_alpha']:.3f}, "
          f"TV(pi_ref, p+) = {task['tv_reference_to_p_plus']:.3f}, "
          f"p+ mass where p- = 0: {task['p_plus_mass_where_p_minus_is_0']:.3f}")
    print(f"fits: full-batch Adam, lr {args.lr}, {args.iters} steps, alpha = empirical preferred fraction, "
          f"beta = {BETA} (kto, bco, dpo); sft+ = max likelihood on preferred rows only (reference)")
    print(format_tables(study))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.plot:
        try:
            plot(study, Path(args.plot))
            print(f"plot: {args.plot}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install 'rdro-cli[bench]')")
    print(json.dumps(study))


if __name__ == "__main__":
    main()
