"""The consistency study (benchmarks/consistency.py, issue 7) once through the real CLI with a tiny transformer.

The tabular study fits free logits; here the same task goes through `rdro prepare -> logprobs -> train`
with a tiny Llama, full fine-tuning, at one n, and the trained models are scored exactly by enumeration.

In RDRO's setting the reference policy must be the model that produced the samples, so:

1. A word-level tokenizer (`<pad> <eos> <unk>`, prompt tokens `x0..x3`, task tokens `t0..t5`, no chat
   template: prepare concatenates prompt + completion + eos) and a tiny Llama from config.
2. The tiny Llama is first fitted by maximum likelihood (exact, over all 4 x 258 sequences) to the
   tabular, tilted pi_ref of consistency.py, so that it ends every sequence with `<eos>` within 3 tokens.
   From then on pi_ref := that transformer's own distribution over the 258 completions of each prompt
   (each followed by `<eos>`), renormalised; the mass it puts elsewhere is reported ("leftover").
3. h is consistency.py's rule. The transformer's acceptance rate E_{pi_ref}[h | x] is close to, not
   exactly, alpha = 0.4 per prompt, so h is calibrated per prompt by the smallest monotone change that
   keeps it in [0, 1] and keeps its 0s (if the rate is too high) or its 1s (if too low):
   h' = h alpha / a_x, or h' = 1 - (1 - h)(1 - alpha) / (1 - a_x). Then pi_ref is exactly the alpha-mixture
   of p+ = pi_ref h' / alpha and p- = pi_ref (1 - h') / (1 - alpha) for every prompt.
4. n rows: prompt uniform, y by ancestral sampling from the transformer (rows that leave the enumerable
   set are redrawn, i.e. sampling from the renormalised pi_ref), z ~ Bernoulli(h'). Written as an unpaired
   JSON (`prompt`, `completion`, `label`), and for DPO as pairs (`prompt`, `chosen`, `rejected`) built
   from the same rows (one preferred with one non-preferred row of the same prompt, each used once),
   with a small separately drawn test split so prepare holds out nothing from the n training rows.
5. `rdro prepare`, `rdro logprobs` (reference = the tiny transformer) and `rdro train` run in-process
   for rdro (batch and balanced weighting), ddro, kto, bco, dpo, pro, kldo, the five bpo instances and
   pmle (reference-free: it reads no logprobs), all with the same optimiser settings.
6. Each `<run>/train/final` is scored exactly: TV between its renormalised distribution and p+ (mean over
   prompts), its leftover mass, the largest training-row log-ratio logged during training
   (metrics.jsonl `logratio_max`) and at the end (by enumeration).

Next to it, the tabular fits of consistency.py on the SAME task (pi_ref = the transformer) and the SAME
rows (and the CLI's mismatched pairs for KTO): the estimate each loss aims at with this data, and with
unlimited data (n = inf); and, unless --no-study, consistency.run_study on its own task at the same n.

    .venv/bin/python benchmarks/consistency_cli.py             # n = 4000, about 3.5 minutes on 2 shared cores
    .venv/bin/python benchmarks/consistency_cli.py --quick     # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout


def _load_consistency():
    name = "rdro_consistency_benchmark_for_cli"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "consistency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


consistency = _load_consistency()

PROMPTS, VOCAB, MAX_LEN = 4, 6, 3
SPECIAL = ["<pad>", "<eos>", "<unk>"]
PROMPT_WORDS = [f"x{k}" for k in range(PROMPTS)]
TASK_WORDS = [f"t{i}" for i in range(VOCAB)]
# (label, loss.name, extra --set values, which data)
RUNS = {
    "rdro-balanced": ("rdro", ["loss.weighting=balanced"], "unpaired"),
    "rdro-batch": ("rdro", ["loss.weighting=batch"], "unpaired"),
    "ddro": ("ddro", [], "unpaired"),
    "kto": ("kto", [], "unpaired"),
    "bco": ("bco", [], "unpaired"),
    "dpo": ("dpo", [], "paired"),
    # issue 14
    "pro": ("pro", [f"loss.pro_alpha={consistency.PRO_ALPHA}"], "unpaired"),
    "kldo": ("kldo", [f"loss.kldo_rate={consistency.KLDO_RATE}"], "unpaired"),
    **{f"bpo-{d}": ("bpo", [f"loss.bpo_divergence={d}", f"loss.bpo_lam={consistency.BPO_LAM}"], "paired")
       for d in consistency.BPO_DIVERGENCES},
    "pmle": ("pmle", [f"loss.pmle_gamma={consistency.PMLE_GAMMA}"], "paired"),  # reads no logprobs
}


# ------------------------------------------------------------------------------------ tokenizer and model


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL + PROMPT_WORDS + TASK_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, tokenizer, *, hidden: int, layers: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def prompt_text(k: int) -> str:
    return f"{PROMPT_WORDS[k]} "  # prepare concatenates prompt + completion + eos_token


def completion_text(completion: tuple[int, ...]) -> str:
    return " ".join(TASK_WORDS[t] for t in completion)


def enumeration_ids(tokenizer, prompts, completion_index, completions) -> list[list[int]]:
    ids = {word: tokenizer.convert_tokens_to_ids(word) for word in PROMPT_WORDS + TASK_WORDS}
    return [[ids[PROMPT_WORDS[k]], *(ids[TASK_WORDS[t]] for t in completions[c]), tokenizer.eos_token_id]
            for k, c in zip(prompts.tolist(), completion_index.tolist(), strict=True)]


def enumeration(tokenizer, completions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (prompt, completion + eos) sequence, prompt-major, collated as the CLI collates rows."""
    from rdro_cli.lm import batching

    grid = torch.arange(len(completions))
    rows = enumeration_ids(tokenizer, torch.arange(PROMPTS).repeat_interleave(len(grid)), grid.repeat(PROMPTS),
                           completions)
    return batching.collate(rows, [1] * len(rows), tokenizer.pad_token_id)


def sequence_logps(model, batch) -> torch.Tensor:
    """[prompts, completions] log pi(y, eos | x) with the CLI's own completion log-prob code."""
    from rdro_cli.lm import completion_head

    return completion_head.completion_logps(model, *batch).double().reshape(PROMPTS, -1)


def fit_reference(model, batch, target_logp: torch.Tensor, *, steps: int, lr: float) -> float:
    """Exact maximum likelihood of the tabular pi_ref (cross-entropy over all sequences); returns KL."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    target = target_logp.exp()
    entropy = -(target * target_logp).sum(-1).mean().item()
    model.train()
    for _ in range(steps):
        loss = -(target * sequence_logps(model, batch)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item() - entropy


def calibrate(h: torch.Tensor, reference: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per prompt, h' = sigmoid(logit(h) + c) with c chosen by bisection so that E_ref[h'] = alpha exactly.

    Keeps every 0 and 1 of h (so p- = 0 and p+ = 0 stay where they were) and the order of its values.
    """
    inner = (h > 0) & (h < 1)
    logit = torch.logit(h.clamp(1e-12, 1 - 1e-12))
    rows = []
    for k in range(h.shape[0]):
        low, high = -30.0, 30.0
        for _ in range(100):
            mid = 0.5 * (low + high)
            shifted = torch.where(inner[k], torch.sigmoid(logit[k] + mid), h[k])
            low, high = (mid, high) if (reference[k] * shifted).sum() < alpha else (low, mid)
        rows.append(torch.where(inner[k], torch.sigmoid(logit[k] + 0.5 * (low + high)), h[k]))
    return torch.stack(rows)


@torch.no_grad()
def ancestral_sample(model, tokenizer, prompts: torch.Tensor, index: dict, gen: torch.Generator):
    """One completion per prompt by ancestral sampling; rows outside the enumerable set are redrawn.

    Returns (completion indices, number of redraws).
    """
    task_ids = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in TASK_WORDS])
    prompt_ids = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in PROMPT_WORDS])
    eos = tokenizer.eos_token_id
    result = torch.full((len(prompts),), -1, dtype=torch.long)
    redraws = 0
    todo = torch.arange(len(prompts))
    while len(todo):
        seq = prompt_ids[prompts[todo]].unsqueeze(1)
        alive = torch.ones(len(todo), dtype=torch.bool)
        done = torch.zeros(len(todo), dtype=torch.bool)
        for step in range(MAX_LEN + 1):
            logits = model(input_ids=seq).logits[:, -1].float()
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
            is_task = torch.isin(token, task_ids) & (step < MAX_LEN)
            ends = (token == eos) & (step > 0)
            done |= alive & ends
            alive &= is_task
            seq = torch.cat([seq, token.unsqueeze(1)], 1)
        position = {int(t): i for i, t in enumerate(task_ids)}
        for row in done.nonzero().squeeze(1).tolist():
            tokens = seq[row, 1:].tolist()
            tokens = tokens[: tokens.index(eos)]
            result[todo[row]] = index[tuple(position[t] for t in tokens)]
        redraws += int((~done).sum())
        todo = todo[~done]
    return result, redraws


# ------------------------------------------------------------------------------------ data


def make_pairs(prompt: torch.Tensor, label: torch.Tensor, gen: torch.Generator) -> list[tuple[int, int]]:
    """(preferred row, non-preferred row) of the same prompt, at random, each row used once (as draw_sample)."""
    pairs = []
    for k in range(PROMPTS):
        mine = (prompt == k).nonzero().squeeze(1)
        chosen = mine[label[mine]]
        rejected = mine[~label[mine]]
        chosen = chosen[torch.randperm(len(chosen), generator=gen)]
        rejected = rejected[torch.randperm(len(rejected), generator=gen)]
        pairs += list(zip(chosen.tolist(), rejected.tolist(), strict=False))
    return pairs


def unpaired_rows(prompt, completion, label, completions) -> list[dict]:
    return [{"prompt": prompt_text(k), "completion": completion_text(completions[c]), "label": bool(z)}
            for k, c, z in zip(prompt.tolist(), completion.tolist(), label.tolist(), strict=True)]


def paired_rows(prompt, completion, pairs, completions) -> list[dict]:
    return [{"prompt": prompt_text(int(prompt[i])), "chosen": completion_text(completions[int(completion[i])]),
             "rejected": completion_text(completions[int(completion[j])])} for i, j in pairs]


def tabular_data(prompt, completion, label, kl_partner, pairs) -> consistency.Data:
    """The same rows (and the CLI's mismatched pairs) as consistency.Data for the tabular fits."""
    rows, weight = consistency._unique_rows(prompt, completion, label)
    kl_rows, kl_weight = consistency._unique_rows(prompt, completion[kl_partner])
    chosen = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    rejected = torch.tensor([j for _, j in pairs], dtype=torch.long)
    pair_rows, pair_weight = consistency._unique_rows(prompt[chosen], completion[chosen], completion[rejected])
    return consistency.Data((rows[0], rows[1], rows[2].bool()), weight, kl_rows, kl_weight, pair_rows, pair_weight)


# ------------------------------------------------------------------------------------ the CLI


def cli(*args) -> str:
    from typer.testing import CliRunner

    from rdro_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"rdro {args[0]} failed ({result.exit_code}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def with_sets(args: list, sets: list[str]) -> list:
    for item in sets:
        args += ["--set", item]
    return args


def score_model(model_dir: Path, study: Study) -> dict:
    """Exact TV to p+ of a model's renormalised distribution, its leftover mass, its final max row log-ratio,
    and the pi_ref mass of completions whose log-ratio ends above log(1/alpha) (RDRO's optimum has none)."""
    from rdro_cli.lm import loading

    model = loading.load_model(model_dir, dtype="float32")
    with torch.no_grad():
        logp = sequence_logps(model, study.batch)
    mass = logp.exp().sum(-1)
    policy = logp.exp() / mass[:, None]
    bound = math.log(1 / study.info["preferred_fraction"]) + 0.05
    ref_sequence = study.task.ref_logp + study.ref_log_mass[:, None]  # what logprobs computed: not renormalised
    return {"tv": 0.5 * (policy - study.task.p_plus).abs().sum(-1).mean().item(),
            "mass_p_minus_zero": (policy * (study.task.h == 1.0)).sum(-1).mean().item(),
            "leftover_mass": (1 - mass).mean().item(),
            "final_max_logratio": (logp - ref_sequence)[study.prompt, study.completion].max().item(),
            "ref_mass_above_bound": (study.task.ref_logp.exp() * (logp - ref_sequence > bound)).sum(-1).mean().item()}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ the study


@dataclass
class Study:
    """Everything the training runs and the scoring share: the exact task, the rows, the prepared runs."""

    task: consistency.Task  # pi_ref = the transformer (renormalised), h calibrated, p+ exact
    ref_log_mass: torch.Tensor  # [prompts] log of pi_ref's mass on the 258 completions + eos
    batch: tuple  # the enumerated sequences, collated
    model_dir: Path
    prompt: torch.Tensor
    completion: torch.Tensor
    label: torch.Tensor
    pairs: list
    kl_partner: torch.Tensor  # prepare's fixed mismatched pairs (KTO)
    runs: dict  # "unpaired" / "paired" -> run dir with data/ and logprobs/
    info: dict


def setup(n: int, workdir: Path, *, kinds=("unpaired", "paired"), hidden: int = 48, layers: int = 2,
          ref_steps: int = 400, ref_lr: float = 0.01, seed: int = 0, log=print) -> Study:
    """Steps 1-4 up to training: tiny transformer = pi_ref, exact p+, samples, prepare and logprobs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and the machine is shared
    tab = consistency.make_task(prompts=PROMPTS, vocab=VOCAB, max_len=MAX_LEN)
    completions = tab.completions
    index = {c: i for i, c in enumerate(completions)}

    # the tiny transformer, fitted to the tabular pi_ref, is pi_ref from now on
    model_dir = workdir / "model"
    tokenizer = build_tokenizer(model_dir)
    model = build_model(model_dir, tokenizer, hidden=hidden, layers=layers, seed=seed)
    batch = enumeration(tokenizer, completions)
    kl_to_tabular = fit_reference(model, batch, tab.ref_logp, steps=ref_steps, lr=ref_lr)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    with torch.no_grad():
        seq_logp = sequence_logps(model, batch)
    log_mass = torch.logsumexp(seq_logp, -1)
    ref_logp = seq_logp - log_mass[:, None]
    reference = ref_logp.exp()
    alpha = tab.alpha
    rate_before = (reference * tab.h).sum(-1)
    h = calibrate(tab.h, reference, alpha)
    task = consistency.Task(completions, ref_logp, h, reference * h / alpha, alpha)
    info = {
        "hidden": hidden, "layers": layers, "parameters": sum(p.numel() for p in model.parameters()),
        "mle_steps": ref_steps, "kl_tabular_to_transformer": kl_to_tabular,
        "leftover_mass": (1 - log_mass.exp()).mean().item(),
        "acceptance_rate_before_calibration": rate_before.tolist(),
        "max_h_change": (h - tab.h).abs().max().item(),
        "tv_reference_to_p_plus": 0.5 * (reference - task.p_plus).abs().sum(-1).mean().item(),
        "p_plus_mass_where_p_minus_is_0": (task.p_plus * (h == 1.0)).sum(-1).mean().item(),
    }
    log(f"pi_ref: tiny Llama ({info['parameters']} parameters, hidden {hidden}, {layers} layers) after "
        f"{ref_steps} MLE steps to the tabular pi_ref (KL {kl_to_tabular:.4f}); its mass outside the "
        f"258 completions + eos: {info['leftover_mass']:.2e}")
    log(f"acceptance rate per prompt before calibrating h: {[round(a, 4) for a in rate_before.tolist()]}; "
        f"largest change of h: {info['max_h_change']:.4f}; TV(pi_ref, p+) = {info['tv_reference_to_p_plus']:.4f}; "
        f"p+ mass where p- = 0: {info['p_plus_mass_where_p_minus_is_0']:.3f}")

    # samples from the transformer, labels from h
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(PROMPTS, (n,), generator=gen)
    completion, redraws = ancestral_sample(model, tokenizer, prompt, index, gen)
    label = torch.rand(n, generator=gen, dtype=torch.float64) < h[prompt, completion]
    pairs = make_pairs(prompt, label, gen)
    n_test = max(40, n // 20)
    test_prompt = torch.randint(PROMPTS, (n_test,), generator=gen)
    test_completion, _ = ancestral_sample(model, tokenizer, test_prompt, index, gen)
    test_label = torch.rand(n_test, generator=gen, dtype=torch.float64) < h[test_prompt, test_completion]
    test_pairs = make_pairs(test_prompt, test_label, gen)
    sources = {
        "unpaired": {"train": unpaired_rows(prompt, completion, label, completions),
                     "test": unpaired_rows(test_prompt, test_completion, test_label, completions)},
        "paired": {"train": paired_rows(prompt, completion, pairs, completions),
                   "test": paired_rows(test_prompt, test_completion, test_pairs, completions)},
    }
    info |= {"rows": n, "redraws": redraws, "pairs": len(pairs), "preferred_fraction": label.double().mean().item()}
    log(f"data: n = {n} rows by ancestral sampling ({redraws} redrawn for leaving the enumerable set), "
        f"preferred fraction {info['preferred_fraction']:.4f}, {len(pairs)} DPO pairs")

    # prepare -> logprobs, in-process
    import datasets

    runs = {}
    for kind in kinds:
        run_dir = workdir / kind
        run_dir.mkdir(parents=True, exist_ok=True)
        source = run_dir / f"{kind}.json"  # {"train": [...], "test": [...]}: prepare holds nothing out
        source.write_text(json.dumps(sources[kind]))
        cli("prepare", "--dataset", source, "--model", model_dir, "--out", run_dir / "data")
        # the unpaired run also gets KTO's mismatched-pair reference log-probs; rdro/ddro/bco ignore them
        cli(*with_sets(["logprobs", "--data", run_dir / "data", "--model", model_dir, "--out", run_dir / "logprobs"],
                       ["loss.name=kto"] if kind == "unpaired" else []))
        runs[kind] = run_dir
    if "unpaired" in runs:
        split = datasets.load_from_disk(str(runs["unpaired"] / "data"))["train"]
        if split["input_ids"] != enumeration_ids(tokenizer, prompt, completion, completions):
            raise RuntimeError(f"prepare changed the training rows ({len(split)} rows for n = {n})")
        kl_partner = torch.tensor(split["kl_partner"], dtype=torch.long)
        # the CLI's reference log-probs are this transformer's, as enumerated here
        from safetensors.torch import load_file

        logged = load_file(str(runs["unpaired"] / "logprobs" / "train.safetensors"))["ref_logps"].double()
        info["max_abs_logprobs_vs_enumeration"] = (logged - seq_logp[prompt, completion]).abs().max().item()
        if info["max_abs_logprobs_vs_enumeration"] > 1e-3:
            raise RuntimeError(f"rdro logprobs disagrees with the enumeration by "
                               f"{info['max_abs_logprobs_vs_enumeration']:.2e}")
    else:
        kl_partner = torch.roll(torch.arange(n), 1)
    return Study(task, log_mass, batch, model_dir, prompt, completion, label, pairs, kl_partner, runs, info)


def train_sets(*, lr: float, batch_size: int, epochs: int, warmup_ratio: float, seed: int) -> list[str]:
    return ["model.dtype=float32", f"train.learning_rate={lr}", f"train.batch_size={batch_size}",
            f"train.epochs={epochs}", f"train.warmup_ratio={warmup_ratio}", "train.log_every=1",
            f"train.seed={seed}"]


def train_method(study: Study, method: str, sets: list[str], out: Path) -> dict:
    """`rdro train` for one method, then the exact score of its final model."""
    loss, extra, kind = RUNS[method]
    run_dir = study.runs[kind]
    started = time.perf_counter()
    cli(*with_sets(["train", "--model", study.model_dir, "--data", run_dir / "data", "--logprobs",
                    run_dir / "logprobs", "--out", out, "--loss", loss, "--force"], sets + extra))
    seconds = time.perf_counter() - started
    metrics = read_metrics(out / "metrics.jsonl")
    manifest = json.loads((out / "manifest.json").read_text())
    # a reference-free loss logs s_pol, not a log-ratio: no logged maximum to report for it
    logged_max = max(m["logratio_max"] for m in metrics) if loss != "pmle" else float("nan")
    return {**score_model(out / "final", study), "max_logratio": logged_max,
            "steps": len(metrics), "train_seconds": round(seconds, 1), "alpha": manifest.get("alpha")}


def tabular_fits(study: Study, methods, iters: int) -> tuple[dict, dict]:
    """consistency.fit on the same task: on the same rows, and on the population (n = inf)."""
    data = tabular_data(study.prompt, study.completion, study.label, study.kl_partner, study.pairs)
    population = consistency.population(study.task)
    same = {m: _tabular_metrics(consistency.fit(study.task, data, m, iters, 0.02)) for m in methods}
    inf = {m: _tabular_metrics(consistency.fit(study.task, population, m, iters, 0.02)) for m in methods}
    return same, inf


def run(n: int = 4000, *, workdir: Path, methods=tuple(RUNS), hidden: int = 48, layers: int = 2,
        ref_steps: int = 400, lr: float = 5e-4, batch_size: int = 64, epochs: int = 20,
        warmup_ratio: float = 0.05, seed: int = 0, tabular_iters: int = 3000, study_seeds: int = 1,
        tabular: bool = True, log=print) -> dict:
    """The whole pipeline; returns the results dict (the JSON line)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now

    kinds = tuple(k for k in ("unpaired", "paired") if any(RUNS[m][2] == k for m in methods))
    study = setup(n, workdir, kinds=kinds, hidden=hidden, layers=layers, ref_steps=ref_steps, seed=seed, log=log)
    lap("setup")
    sets = train_sets(lr=lr, batch_size=batch_size, epochs=epochs, warmup_ratio=warmup_ratio, seed=seed)
    cli_results = {}
    for method in methods:
        result = cli_results[method] = train_method(study, method, sets, workdir / f"train-{method}")
        log(f"  cli {method:<14} TV {result['tv']:.4f}  max log-ratio {result['max_logratio']:.3f}  "
            f"({result['steps']} steps, {result['train_seconds']:.0f} s)")
    lap("train")

    tabular_same, tabular_inf, study_results = {}, {}, None
    if tabular:
        tabular_same, tabular_inf = tabular_fits(study, methods, tabular_iters)
        lap("tabular")
        if study_seeds:
            own = consistency.run_study(ns=(n,), seeds=study_seeds, iters=tabular_iters, methods=methods,
                                        include_population=False)
            study_results = {m: {"tv": v[str(n)]["tv"], "max_logratio": v[str(n)]["max_logratio"]}
                             for m, v in own["results"].items()} | {"task": own["task"]}
            lap("study")

    alpha = study.task.alpha
    preferred_fraction = study.info["preferred_fraction"]
    bound = math.log(1 / preferred_fraction)
    return {
        "n": n, "alpha": alpha, "preferred_fraction": preferred_fraction, "bound_log_1_over_alpha": bound,
        "reference": study.info,
        "settings": {"lr": lr, "batch_size": batch_size, "epochs": epochs, "warmup_ratio": warmup_ratio,
                     "schedule": "cosine", "optimizer": "adamw", "max_grad_norm": 1.0, "beta": consistency.BETA,
                     "tabular_iters": tabular_iters, "study_seeds": study_seeds if tabular else 0, "seed": seed},
        "cli": cli_results,
        "tabular_same_rows": tabular_same,
        "tabular_population": tabular_inf,
        "tabular_study": study_results,
        "ordering": ordering_summary(cli_results, tabular_same, bound),
        # the derivation's n -> inf limit on this task (pi_ref = the transformer), next to what was measured
        "predictions": {m: consistency.predicted_tv(study.task, m) for m in methods
                        if consistency.predicted_tv(study.task, m) is not None},
        "timings_s": timings,
    }


def _tabular_metrics(result: dict) -> dict:
    return {k: result[k] for k in ("tv", "max_logratio", "final_max_logratio", "alpha", "mass_p_minus_zero")}


def ordering_summary(cli_results: dict, tabular_same: dict, bound: float) -> dict:
    methods = list(cli_results)
    cli_order = sorted(methods, key=lambda m: cli_results[m]["tv"])
    summary = {"cli_order_by_tv": cli_order}
    if tabular_same:
        tab_order = sorted(methods, key=lambda m: tabular_same[m]["tv"])
        concordant = discordant = 0
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                sign = (cli_results[a]["tv"] - cli_results[b]["tv"]) * (tabular_same[a]["tv"] - tabular_same[b]["tv"])
                concordant += sign > 0
                discordant += sign < 0
        pairs = concordant + discordant
        summary |= {"tabular_order_by_tv": tab_order, "same_order": cli_order == tab_order,
                    "kendall_tau": (concordant - discordant) / pairs if pairs else None}
    if "rdro-balanced" in cli_results:
        best = cli_results["rdro-balanced"]["tv"]
        summary["rdro_balanced_closest"] = cli_order[0] == "rdro-balanced"
        far = [m for m in ("kto", "bco", "dpo") if m in cli_results]
        if far:
            summary["kto_bco_dpo_further_than_rdro_balanced"] = all(cli_results[m]["tv"] > best for m in far)
        summary["rdro_balanced_within_bound"] = cli_results["rdro-balanced"]["max_logratio"] <= bound + 0.05
    if "ddro" in cli_results:
        summary["ddro_exceeds_bound"] = cli_results["ddro"]["max_logratio"] > bound
    return summary


def format_table(results: dict) -> str:
    bound = results["bound_log_1_over_alpha"]
    same, inf, study = results["tabular_same_rows"], results["tabular_population"], results["tabular_study"]
    predictions = results.get("predictions", {})
    header = (f"{'loss':<14}{'CLI TV':>9}{'CLI maxlr':>11}{'CLI end lr':>11}{'>bound':>8}{'leftover':>10}"
              f"{'tab TV':>9}{'tab maxlr':>11}{'tab TV inf':>12}{'study TV':>10}{'log(1/a)':>10}"
              f"{'derived TV':>12}{'CLI mass':>10}")
    lines = [header, "-" * len(header)]
    for method, r in results["cli"].items():
        row = f"{method:<14}{r['tv']:>9.4f}{r['max_logratio']:>11.3f}{r['final_max_logratio']:>11.3f}" \
              f"{r['ref_mass_above_bound']:>8.3f}{r['leftover_mass']:>10.1e}"
        if method in same:
            row += f"{same[method]['tv']:>9.4f}{same[method]['max_logratio']:>11.3f}{inf[method]['tv']:>12.4f}"
        else:
            row += f"{'':>32}"
        if study and method in study:
            tvs = study[method]["tv"]
            row += f"{sum(tvs) / len(tvs):>10.4f}"
        else:
            row += f"{'':>10}"
        row += f"{bound:>10.3f}"
        if method in predictions:
            kind, value, _ = predictions[method]
            row += f"{kind + format(value, '.4f'):>12}"
        else:
            row += f"{'':>12}"
        lines.append(row + f"{r['mass_p_minus_zero']:>10.4f}")
    lines.append(f"{'pi_ref (init)':<14}{results['reference']['tv_reference_to_p_plus']:>9.4f}")
    lines.append("derived TV: the n -> inf limit derived in docs/losses.md ('>=': an optimum at infinity, approached "
                 "only with unlimited training); CLI mass: the trained policy's mass on {h = 1}, where p- = 0")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="training rows")
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--hidden", type=int, default=48)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ref-steps", type=int, default=400, help="MLE steps fitting the tabular pi_ref")
    parser.add_argument("--lr", type=float, default=5e-4, help="train.learning_rate for every loss")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tabular-iters", type=int, default=3000)
    parser.add_argument("--study-seeds", type=int, default=1, help="consistency.run_study seeds at the same n "
                                                                   "(0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="n = 1000, 5 epochs, no run_study: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.epochs, args.study_seeds, args.ref_steps, args.tabular_iters = 1000, 5, 0, 150, 1000

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rdro-consistency-cli-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = run(args.n, workdir=workdir, methods=tuple(args.methods), hidden=args.hidden, layers=args.layers,
                      ref_steps=args.ref_steps, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                      seed=args.seed, tabular_iters=args.tabular_iters, study_seeds=args.study_seeds)
    results["timings_s"]["total"] = round(time.perf_counter() - start, 1)
    print()
    print(f"n = {results['n']}, alpha = {results['alpha']} (auto: preferred fraction "
          f"{results['preferred_fraction']:.4f}), {results['settings']['epochs']} epochs of batch "
          f"{results['settings']['batch_size']}, lr {results['settings']['lr']} (AdamW, cosine), full fine-tuning")
    print("CLI: tiny Llama through rdro prepare/logprobs/train, scored exactly; maxlr = largest logged "
          "training-row log-ratio;\nend lr = largest training-row log-ratio of the final model; >bound = pi_ref mass "
          "of completions whose final log-ratio exceeds log(1/a) + 0.05;\ntab: tabular fit (consistency.fit) on the same task and rows; tab TV inf: on "
          "the population; study TV: consistency.run_study on its own task at the same n")
    print(format_table(results))
    order = results["ordering"]
    print(f"\nordering by TV, CLI:     {' < '.join(order['cli_order_by_tv'])}")
    if "tabular_order_by_tv" in order:
        print(f"ordering by TV, tabular: {' < '.join(order['tabular_order_by_tv'])}  "
              f"(Kendall tau {order['kendall_tau']:.2f})")
    print(f"timings (s): {results['timings_s']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
