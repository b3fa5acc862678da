"""Every method on a real model, side by side (issue 15): the demo's setting through the real CLI stages.

SmolLM2-135M-Instruct (the demo cache, `scripts/demo_model.py`), the shipped `demo` feedback and the LoRA
recipe of `recipes/smollm2-135m-demo.toml`, trained with every method by `rdro train` and scored by
`rdro eval`. One `prepare` + one `logprobs` artifact serve every binary-feedback method (the logprobs run
with `loss.name=kto`, so KTO's mismatched-pair reference log-probs are in it; the others ignore them). The
pair methods need paired rows, hence their own `prepare` (paired shape) and their own `logprobs` artifact
(pmle reads none): pairs are built from the same rows, one preferred with one non-preferred answer of the
same prompt, seeded, each row used at most once (min(k, 5 - k) pairs for a prompt with k of 5 answers
right); the paired test split is built the same way from the shipped test rows.

Per (method, seed, learning rate) one run directory `<workdir>/runs/<method>/lr<lr>-seed<s>/` with `train/`,
`eval/` and `result.json` (written last: a run with it is skipped, so the benchmark resumes; an interrupted
`train` continues from its last checkpoint with `--resume`). Every run is evaluated the same way, adapter
loaded on the base model: held-out exact match on the first `--eval-limit` of the 400 held-out prompts
(greedy, as scripts/demo.sh evaluates them) and preference AUC on the unpaired test split (240 rows, against
the unpaired logprobs artifact, so pair methods are scored on the same rows as the rest). From
`metrics.jsonl`: largest and final logged max log-ratio, largest gradient norm (before clipping) and the
fraction of steps whose norm exceeded `train.max_grad_norm` (clipped). pmle is reference-free: its logged
"log-ratio" is not one, so its training log-ratio columns are empty; the test-split max log-ratio
(`eval/logratios.safetensors`, every method, pmle included) is reported next to them.

Per method over seeds at the base learning rate: mean ± sd (sample sd), and a 95% bootstrap interval on
the accuracy difference to `rdro` (the demo's method, batch weighting): prompts resampled (the same
prompts for both methods, so the difference is paired) and seeds resampled within each method.

    .venv/bin/python benchmarks/compare_methods.py                 # the full benchmark (see the budget below)
    .venv/bin/python benchmarks/compare_methods.py --seeds 1 --no-high-lr   # a partial run: one seed each
    .venv/bin/python benchmarks/compare_methods.py --report-only   # aggregate what has finished, no training
    .venv/bin/python benchmarks/compare_methods.py --quick         # smoke run on SmolLM2 (a few minutes)
    .venv/bin/python benchmarks/compare_methods.py --quick --model DIR   # the same on any checkpoint (CI: a tiny one)

Budget (benchmarks/README.md, "compare_methods.py"): the defaults were chosen from a pilot on this 2-core
machine so that 11 methods x (3 seeds + 1 at 5x the learning rate) = 44 runs fit in about 2.5 hours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

RECIPE = ROOT / "recipes" / "smollm2-135m-demo.toml"
DATA = ROOT / "rdro_cli" / "data"
HELDOUT = DATA / "demo_heldout.jsonl"
README = ROOT / "benchmarks" / "README.md"
PNG_NAME = "compare_methods.png"
BEGIN, END = "<!-- compare_methods:begin -->", "<!-- compare_methods:end -->"
REFERENCE_METHOD = "rdro"
PAIR_SEED = 0

# label -> (loss.name, extra --set values, which data). Every method keeps the recipe's defaults
# (docs/losses.md): beta 0.1, PRO alpha 2.5, KLDO moving average rate 0.1, BPO lambda 1, pmle gamma 5e-3.
# bpo-lr is not run: it is DPO exactly (benchmarks/README.md, issue 14: equal to every printed digit).
METHODS = {
    "rdro": ("rdro", ["loss.weighting=batch"], "unpaired"),
    "rdro-balanced": ("rdro", ["loss.weighting=balanced"], "unpaired"),
    "ddro": ("ddro", [], "unpaired"),
    "kto": ("kto", [], "unpaired"),
    "bco": ("bco", [], "unpaired"),
    "pro": ("pro", [], "unpaired"),
    "kldo": ("kldo", [], "unpaired"),
    "dpo": ("dpo", [], "paired"),
    **{f"bpo-{d}": ("bpo", [f"loss.bpo_divergence={d}"], "paired") for d in ("kliep", "lsif", "ba", "sba")},
    "pmle": ("pmle", [], "paired"),
}
# bpo-ba and bpo-sba are left out of the default list for the time budget: on the known-truth task they track
# bpo-lsif to 3 digits (benchmarks/README.md, issue 14); `--methods ... bpo-ba bpo-sba` runs them.
DEFAULT_METHODS = ("rdro", "rdro-balanced", "ddro", "kto", "bco", "pro", "kldo", "dpo", "bpo-kliep", "bpo-lsif",
                   "pmle")
QUICK_METHODS = ("rdro", "dpo", "pmle")  # one unpaired, one pair method with and one without a reference

# Chosen from the pilot (benchmarks/README.md): demo lr and batch, 25 steps instead of 150, 100 of 400
# held-out prompts. See the budget arithmetic there.
DEFAULTS = dict(steps=25, eval_limit=100, seeds=3, high_lr_factor=5.0)
# --quick leaves the high-lr runs out (CI time) unless --high-lr-factor is given
QUICK = dict(steps=2, eval_limit=8, seeds=1, high_lr_factor=None, data_limit=40)


# ------------------------------------------------------------------------------------ the CLI


def cli(*args) -> tuple[int, str]:
    """One `rdro` command in-process (the Typer app itself); (exit code, stdout + stderr)."""
    from typer.testing import CliRunner

    from rdro_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output  # stdout and stderr interleaved (click >= 8.2)


def cli_ok(*args) -> str:
    code, output = cli(*args)
    if code != 0:
        raise RuntimeError(f"rdro {args[0]} failed ({code}):\n{output[-3000:]}")
    return output


def with_sets(args: list, sets: list[str]) -> list:
    for item in sets:
        args += ["--set", item]
    return args


# ------------------------------------------------------------------------------------ data


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _prompt_key(row: dict) -> str:
    return json.dumps(row["prompt"], sort_keys=True)


def make_pairs(rows: list[dict], seed: int) -> list[dict]:
    """(prompt, chosen, rejected) rows: per prompt, preferred and non-preferred answers shuffled (seeded) and
    zipped, so each row is used at most once and a prompt with k right answers of n gives min(k, n - k) pairs.
    Prompts keep their order of first appearance."""
    rng = random.Random(seed)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_prompt_key(row), []).append(row)
    pairs = []
    for group in groups.values():
        chosen = [r["completion"] for r in group if r["label"]]
        rejected = [r["completion"] for r in group if not r["label"]]
        rng.shuffle(chosen)
        rng.shuffle(rejected)
        pairs += [{"prompt": group[0]["prompt"], "chosen": c, "rejected": r} for c, r in zip(chosen, rejected, strict=False)]
    return pairs


def write_pair_source(path: Path, seed: int) -> dict:
    """The paired dataset file prepare reads ({"train": [...], "test": [...]}) and its counts."""
    train, test = read_jsonl(DATA / "demo_train.jsonl"), read_jsonl(DATA / "demo_test.jsonl")
    source = {"train": make_pairs(train, seed), "test": make_pairs(test, seed)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(source), encoding="utf-8")
    return {"train_rows": len(train), "train_prompts": len({_prompt_key(r) for r in train}),
            "train_pairs": len(source["train"]), "test_rows": len(test), "test_pairs": len(source["test"])}


# ------------------------------------------------------------------------------------ settings


def base_sets(model: str, data_limit: int = 0) -> list[str]:
    sets = [f"model.name={json.dumps(model)}", f"eval.exact_match_file={json.dumps(str(HELDOUT))}"]
    return sets + ([f"data.limit={data_limit}"] if data_limit else [])


def run_sets(*, lr: float, seed: int, steps: int, eval_limit: int) -> list[str]:
    save_every = max(1, steps // 3)  # a checkpoint to resume from; LoRA adapters are small
    return [f"train.learning_rate={lr}", f"train.seed={seed}", f"train.max_steps={steps}",
            f"train.save_every={save_every}", "train.keep_checkpoints=1", "train.log_every=1",
            f"eval.limit={eval_limit}"]


def recipe_values() -> dict:
    from rdro_cli.recipe import load_recipe

    cfg = load_recipe(RECIPE)
    return {"learning_rate": cfg.train.learning_rate, "batch_size": cfg.train.batch_size,
            "max_grad_norm": cfg.train.max_grad_norm, "lora_r": cfg.lora.r, "lr_scheduler": cfg.train.lr_scheduler,
            "warmup_ratio": cfg.train.warmup_ratio, "max_new_tokens": cfg.eval.max_new_tokens}


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ shared artifacts


def prepare_shared(workdir: Path, model: str, methods: list[str], data_limit: int, log) -> dict:
    """prepare + logprobs per data kind (re-used by every run) and the base model's eval; returns paths, counts.

    The unpaired artifact always exists (every run's preference eval reads it); KTO's mismatched-pair
    log-probs are added only when kto runs, and the paired logprobs only when a pair method reads them."""
    kinds = {METHODS[m][2] for m in methods} | {"unpaired"}
    needs_kl = any(METHODS[m][0] == "kto" for m in methods)
    needs_pair_ref = any(METHODS[m][2] == "paired" and METHODS[m][0] != "pmle" for m in methods)
    shared = workdir / "shared"
    sets = base_sets(model, data_limit)
    info: dict = {"paths": {}}
    for kind in ("unpaired", "paired"):
        if kind not in kinds:
            continue
        started = time.perf_counter()
        directory = shared / kind
        if kind == "paired":
            info["pairs"] = write_pair_source(directory / "pairs.json", PAIR_SEED)
            dataset = directory / "pairs.json"
        else:
            dataset = "demo"
        cli_ok(*with_sets(["prepare", "--recipe", RECIPE, "--dataset", dataset, "--out", directory / "data"], sets))
        # kto's mismatched-pair reference log-probs ride along in the unpaired artifact; the others ignore them
        if kind == "unpaired" or needs_pair_ref:
            extra = ["loss.name=kto"] if kind == "unpaired" and needs_kl else \
                ["loss.name=dpo"] if kind == "paired" else []
            cli_ok(*with_sets(["logprobs", "--recipe", RECIPE, "--data", directory / "data", "--out",
                               directory / "logprobs"], sets + extra))
        manifest = json.loads((directory / "data" / "manifest.json").read_text())
        info["paths"][kind] = {"data": str(directory / "data"), "logprobs": str(directory / "logprobs")}
        info[f"{kind}_counts"] = manifest["counts"]
        log(f"shared {kind}: {manifest['counts']['train']['rows']} train rows "
            f"({manifest['counts']['train']['pairs']} pairs), {time.perf_counter() - started:.0f} s")
    return info


def eval_base(workdir: Path, model: str, eval_limit: int, data_limit: int, before: dict | None = None) -> dict:
    """The reference model itself on the same evals: the "before" accuracy. `before`: what an earlier run of
    the benchmark recorded, whose time is kept when the eval is up to date (not run again)."""
    out = workdir / "shared" / "eval-base"
    unpaired = workdir / "shared" / "unpaired"
    started = time.perf_counter()
    output = cli_ok(*with_sets(["eval", "--recipe", RECIPE, "--model", model, "--data", unpaired / "data",
                                "--logprobs", unpaired / "logprobs", "--out", out],
                               base_sets(model, data_limit) + [f"eval.limit={eval_limit}"]))
    seconds = round(time.perf_counter() - started, 1)
    if "is up to date" in output and before and before.get("seconds"):
        seconds = before["seconds"]
    tasks = json.loads((out / "eval.json").read_text())["tasks"]
    return {"accuracy": tasks["exact_match"]["accuracy"], "examples": tasks["exact_match"]["examples"],
            "auc": tasks["preference"]["auc"], "seconds": seconds}


# ------------------------------------------------------------------------------------ one run


def run_dir(workdir: Path, method: str, lr: float, seed: int) -> Path:
    return workdir / "runs" / method / f"lr{lr:g}-seed{seed}"


def read_metrics(path: Path) -> list[dict]:
    from rdro_cli.reporting.runs import read_metrics as report_read_metrics

    return report_read_metrics(path) if path.is_file() else []


def training_summary(rows: list[dict], *, max_grad_norm: float, has_ref: bool) -> dict:
    """Stability figures from metrics.jsonl rows: max / final logged max log-ratio, max gradient norm (the norm
    clip_grad_norm_ measures before clipping) and the fraction of steps whose norm exceeded the clipping norm."""
    norms = [r["grad_norm"] for r in rows if isinstance(r.get("grad_norm"), (int, float))]
    ratios = [r["logratio_max"] for r in rows if isinstance(r.get("logratio_max"), (int, float))]
    return {
        "steps": len(rows),
        "max_logratio": max(ratios) if ratios and has_ref else None,
        "final_logratio": ratios[-1] if ratios and has_ref else None,
        "max_grad_norm": max(norms) if norms else None,
        "frac_clipped": (sum(n > max_grad_norm for n in norms) / len(norms)) if norms and max_grad_norm else None,
    }


def eval_summary(eval_dir: Path) -> dict:
    from safetensors.numpy import load_file

    tasks = json.loads((eval_dir / "eval.json").read_text())["tasks"]
    records = read_jsonl(eval_dir / "exact_match.jsonl")
    logratios = load_file(str(eval_dir / "logratios.safetensors"))["logratios"]
    return {"accuracy": tasks["exact_match"]["accuracy"], "correct": [bool(r["correct"]) for r in records],
            "auc": tasks["preference"]["auc"], "test_max_logratio": float(logratios.max())}


def run_one(workdir: Path, shared: dict, method: str, *, lr: float, seed: int, steps: int, eval_limit: int,
            model: str, data_limit: int, key: str, max_grad_norm: float, log) -> dict:
    """train + eval of one (method, seed, lr); result.json written last. A training run stopped by a
    non-finite loss or gradient (exit 2) is recorded as diverged, with no eval."""
    out = run_dir(workdir, method, lr, seed)
    result_path = out / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("settings_key") != key:
            raise SystemExit(f"error: {result_path} was made with other settings; use another --workdir")
        log(f"  {method:<14} lr {lr:g} seed {seed}: done before, skipped")
        return result
    loss, extra, kind = METHODS[method]
    sets = base_sets(model, data_limit) + run_sets(lr=lr, seed=seed, steps=steps, eval_limit=eval_limit) + extra
    data = shared["paths"][kind]
    unpaired = shared["paths"]["unpaired"]
    train_args = ["train", "--recipe", RECIPE, "--loss", loss, "--data", data["data"], "--out", out / "train",
                  "--resume"]
    if loss != "pmle":  # reference-free: reads no logprobs artifact
        train_args += ["--logprobs", data["logprobs"]]
    trained_before = (out / "train" / "manifest.json").is_file()  # stopped between train and eval
    started = time.perf_counter()
    code, output = cli(*with_sets(train_args, sets))
    if code == 2 and "was written by a run with other settings" in output:
        # a run interrupted before the shared artifacts were remade: its checkpoints are of no use now
        log(f"  {method:<14} lr {lr:g} seed {seed}: its checkpoints predate the shared artifacts; starting over")
        started = time.perf_counter()
        code, output = cli(*with_sets([a if a != "--resume" else "--force" for a in train_args], sets))
    train_seconds = time.perf_counter() - started
    if trained_before and code == 0:  # train only found its finished run: its own record of the time
        train_seconds = json.loads((out / "train" / "manifest.json").read_text()).get("wall_seconds", train_seconds)
    rows = read_metrics(out / "train" / "metrics.jsonl")
    result = {"method": method, "loss": loss, "kind": kind, "seed": seed, "lr": lr, "settings_key": key,
              "train_seconds": round(train_seconds, 1),
              **training_summary(rows, max_grad_norm=max_grad_norm, has_ref=loss != "pmle")}
    if code == 2 and "non-finite" in output:
        result |= {"status": "diverged", "error": output.strip().splitlines()[-1][:300], "eval_seconds": 0.0,
                   "accuracy": None, "correct": None, "auc": None, "test_max_logratio": None}
    elif code != 0:
        raise RuntimeError(f"rdro train failed for {method} lr {lr:g} seed {seed} ({code}):\n{output[-3000:]}")
    else:
        started = time.perf_counter()
        cli_ok(*with_sets(["eval", "--recipe", RECIPE, "--model", out / "train" / "final", "--data",
                           unpaired["data"], "--logprobs", unpaired["logprobs"], "--out", out / "eval"], sets))
        result |= {"status": "ok", "eval_seconds": round(time.perf_counter() - started, 1), **eval_summary(out / "eval")}
    result["wall_seconds"] = round(result["train_seconds"] + result["eval_seconds"], 1)
    tmp = result_path.with_name("result.json.tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, result_path)
    acc = "-" if result["accuracy"] is None else f"{result['accuracy']:.3f}"
    log(f"  {method:<14} lr {lr:g} seed {seed}: {result['status']}, accuracy {acc}, "
        f"max grad norm {_num(result['max_grad_norm'])}, train {train_seconds:.0f} s, "
        f"eval {result['eval_seconds']:.0f} s")
    return result


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


# ------------------------------------------------------------------------------------ statistics


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def bootstrap_difference(method_runs: list[list[bool]], reference_runs: list[list[bool]], *, draws: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """(observed difference, 2.5%, 97.5% quantiles) of mean accuracy, method minus reference.

    Each draw resamples the prompts (the same indices for both methods: paired) and, independently per method,
    the seeds; the statistic is the mean over the resampled seeds of the accuracy on the resampled prompts.
    """
    import numpy as np

    a, b = np.asarray(method_runs, dtype=np.float64), np.asarray(reference_runs, dtype=np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"runs scored on different prompt counts ({a.shape[1]} vs {b.shape[1]})")
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    observed = float(a.mean() - b.mean())
    diffs = np.empty(draws)
    for k in range(draws):
        prompts = rng.integers(0, n, n)
        sa, sb = rng.integers(0, len(a), len(a)), rng.integers(0, len(b), len(b))
        diffs[k] = a[sa][:, prompts].mean() - b[sb][:, prompts].mean()
    low, high = np.quantile(diffs, [0.025, 0.975])
    return observed, float(low), float(high)


def aggregate(results: list[dict], *, base_lr: float, high_lr: float | None) -> dict:
    """Per method: mean ± sd over the base-lr seeds, the bootstrap interval against rdro, the high-lr run."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    base = {m: [r for r in results if r["method"] == m and math.isclose(r["lr"], base_lr)] for m in methods}
    reference = [r["correct"] for r in base.get(REFERENCE_METHOD, []) if r["correct"] is not None]
    summary = {}
    for method in methods:
        runs = base[method]
        row = {"seeds": len(runs), "diverged": sum(r["status"] == "diverged" for r in runs)}
        for key in ("accuracy", "auc", "max_logratio", "final_logratio", "test_max_logratio", "max_grad_norm",
                    "frac_clipped", "wall_seconds"):
            row[key], row[f"{key}_sd"] = mean_sd([r[key] for r in runs])
        scored = [r["correct"] for r in runs if r["correct"] is not None]
        if method != REFERENCE_METHOD and scored and reference:
            row["diff_to_rdro"], row["diff_low"], row["diff_high"] = bootstrap_difference(scored, reference)
        high = [r for r in results if r["method"] == method and high_lr and math.isclose(r["lr"], high_lr)]
        if high:
            h = high[0]
            row["high_lr"] = {k: h[k] for k in ("status", "accuracy", "auc", "max_logratio", "final_logratio",
                                                 "test_max_logratio", "max_grad_norm", "frac_clipped", "seed")}
        summary[method] = row
    return summary


# ------------------------------------------------------------------------------------ table and figure


def _pm(mean, sd, digits: int = 3) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _g(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def format_tables(summary: dict, base: dict | None) -> str:
    """Two markdown tables: the base-lr comparison, then the stability test at the high lr."""
    lines = ["| method | seeds | exact match | Δ vs rdro [95% CI] | pref. AUC | max log-ratio | final log-ratio "
             "| test max log-ratio | max grad norm | clipped | wall s/run |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    if base:
        lines.append(f"| base model (before) | - | {base['accuracy']:.3f} | | {base['auc']:.3f} | | | | | | |")
    for method, r in summary.items():
        diff = "(reference)" if method == REFERENCE_METHOD else (
            f"{r['diff_to_rdro']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]" if "diff_to_rdro" in r else "-")
        seeds = f"{r['seeds']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        lines.append(f"| {method} | {seeds} | {_pm(r['accuracy'], r['accuracy_sd'])} | {diff} "
                     f"| {_pm(r['auc'], r['auc_sd'])} | {_pm(r['max_logratio'], r['max_logratio_sd'], 2)} "
                     f"| {_pm(r['final_logratio'], r['final_logratio_sd'], 2)} "
                     f"| {_pm(r['test_max_logratio'], r['test_max_logratio_sd'], 2)} "
                     f"| {_pm(r['max_grad_norm'], r['max_grad_norm_sd'], 2)} "
                     f"| {_pm(r['frac_clipped'], r['frac_clipped_sd'], 2)} | {_pm(r['wall_seconds'], None, 0)} |")
    high = [(m, r["high_lr"]) for m, r in summary.items() if "high_lr" in r]
    if high:
        lines += ["", "| method (5× lr) | status | exact match | pref. AUC | max log-ratio | final log-ratio "
                  "| test max log-ratio | max grad norm | clipped |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for method, h in high:
            lines.append(f"| {method} | {h['status']} | {_g(h['accuracy'])} | {_g(h['auc'])} | {_g(h['max_logratio'])} "
                         f"| {_g(h['final_logratio'])} | {_g(h['test_max_logratio'])} | {_g(h['max_grad_norm'])} "
                         f"| {_g(h['frac_clipped'], 2)} |")
    return "\n".join(lines)


def plot(summary: dict, results: list[dict], workdir: Path, *, base_lr: float, high_lr: float | None,
         base: dict | None, path: Path, title: str) -> Path:
    """Accuracy bars (mean, sd error bars, one dot per seed) and the high-lr max log-ratio and gradient-norm
    curves overlaid, drawn with rdro report's helpers (Agg canvas, smoothing, atomic save)."""
    from rdro_cli.reporting import numbers, plots

    figure_cls, canvas_cls = plots.load_matplotlib()
    figure = figure_cls(figsize=(13, 4.6))
    bars, ratio_ax, norm_ax = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1, 1]})
    methods = list(summary)
    # the default cycle (tab10) first, then colours outside it: tab:olive and the like *are* C8 and so on
    colours = {m: (f"C{i}" if i < 10 else ["black", "navy", "gold", "lime", "magenta"][(i - 10) % 5])
               for i, m in enumerate(methods)}
    means = [summary[m]["accuracy"] or 0.0 for m in methods]
    errors = [summary[m]["accuracy_sd"] or 0.0 for m in methods]
    ys = list(range(len(methods)))
    bars.barh(ys, means, xerr=errors, color=[colours[m] for m in methods], alpha=0.85, capsize=3)
    for y, method in zip(ys, methods, strict=True):
        seeds = [r["accuracy"] for r in results if r["method"] == method and math.isclose(r["lr"], base_lr)
                 and r["accuracy"] is not None]
        bars.plot(seeds, [y] * len(seeds), "k.", markersize=4)
        high = summary[method].get("high_lr")
        if high and high["accuracy"] is not None:
            bars.plot([high["accuracy"]], [y], marker="x", color="k", markersize=6)
    if base:
        bars.axvline(base["accuracy"], color="0.4", linestyle="--", linewidth=1)
    bars.set_yticks(ys, methods, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlim(0, 1)
    bars.set_xlabel("held-out exact match (bars: mean ± sd; dots: seeds; x: 5× lr; dashed: before)", fontsize=8)
    bars.grid(axis="x", alpha=0.3)
    for method in methods:
        high = [r for r in results if r["method"] == method and high_lr and math.isclose(r["lr"], high_lr)]
        if not high:
            continue
        rows = read_metrics(run_dir(workdir, method, high[0]["lr"], high[0]["seed"]) / "train" / "metrics.jsonl")
        for ax, key in ((ratio_ax, "logratio_max"), (norm_ax, "grad_norm")):
            if key == "logratio_max" and METHODS[method][0] == "pmle":
                continue  # reference-free: its logged value is s_pol, not a log-ratio
            xs, vals = numbers.series(rows, key)
            if xs:
                ax.plot(xs, vals, color=colours[method], linewidth=0.7, alpha=0.25)
                ax.plot(xs, numbers.ema(vals, numbers.smoothing_weight(len(vals))), color=colours[method],
                        linewidth=1.6, label=method)
    ratio_ax.set_title(f"max log-ratio at lr {_g(high_lr)}", fontsize=10)
    norm_ax.set_title(f"gradient norm (before clipping) at lr {_g(high_lr)}", fontsize=10)
    norm_ax.set_yscale("log")
    for ax in (ratio_ax, norm_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, ncol=2)
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    plots._save(figure, canvas_cls, path)
    return path


def machine() -> str:
    import torch
    import transformers
    from bench_env import cpu_name

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{cpu_name()}, load average {load} at the end, Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def write_readme(readme: Path, block: str) -> None:
    """Replace the text between the BEGIN/END markers of benchmarks/README.md (they must exist)."""
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {readme} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}", encoding="utf-8")


# ------------------------------------------------------------------------------------ the benchmark


def plan(methods: list[str], seeds: int, base_lr: float, high_lr: float | None) -> list[tuple[str, float, int]]:
    """(method, lr, seed) in the order run: seed 0 of every method, then the high lr, then the other seeds, so a
    partial run already compares every method once and has the stability test."""
    order = [(m, base_lr, 0) for m in methods]
    if high_lr:
        order += [(m, high_lr, 0) for m in methods]
    order += [(m, base_lr, s) for s in range(1, seeds) for m in methods]
    return order


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per method (default {DEFAULTS['seeds']})")
    parser.add_argument("--steps", type=int, default=None, help=f"train.max_steps (default {DEFAULTS['steps']})")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help=f"held-out prompts scored per run (default {DEFAULTS['eval_limit']} of 400)")
    parser.add_argument("--high-lr-factor", type=float, default=None, help="the stability test's lr multiple (5)")
    parser.add_argument("--no-high-lr", action="store_true", help="skip the high learning-rate runs")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "compare", help="runs live here (resumable)")
    parser.add_argument("--model", default=None, help="the demo checkpoint (default: scripts/demo_model.py's cache)")
    parser.add_argument("--readme", type=Path, default=None, help=f"write the table here (default {README}; "
                                                                  f"none with --quick)")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="aggregate finished runs; train nothing")
    parser.add_argument("--label", default="", help="a word for the README heading, e.g. 'partial'")
    parser.add_argument("--quick", action="store_true",
                        help="rdro, dpo, pmle, 1 seed, no high-lr run, 2 steps on 40 rows, 8 held-out prompts: a smoke run")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    methods = args.methods or list(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    if REFERENCE_METHOD not in methods:
        methods.insert(0, REFERENCE_METHOD)
    seeds = args.seeds or preset["seeds"]
    steps = args.steps or preset["steps"]
    eval_limit = args.eval_limit or preset["eval_limit"]
    data_limit = preset.get("data_limit", 0)
    factor = args.high_lr_factor or preset["high_lr_factor"]
    if not factor:
        args.no_high_lr = True
    readme = None if args.no_readme else (args.readme or (None if args.quick else README))
    wall_start = time.perf_counter()

    def log(message: str) -> None:
        print(message, flush=True)

    from demo_model import ensure_model

    model = str(args.model or ensure_model())
    recipe = recipe_values()
    base_lr = recipe["learning_rate"]
    high_lr = None if args.no_high_lr else base_lr * factor
    settings = {"steps": steps, "eval_limit": eval_limit, "data_limit": data_limit, "model": model,
                "recipe": recipe, "pair_seed": PAIR_SEED}
    key = settings_key(settings)
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"compare_methods: {len(methods)} methods, {seeds} seed(s) at lr {base_lr:g}"
        + (f" + 1 at {high_lr:g}" if high_lr else "") + f", {steps} steps of batch {recipe['batch_size']}, "
        f"{eval_limit} held-out prompts; runs in {workdir}")

    timings = {}
    started = time.perf_counter()
    if args.report_only:
        shared = {"paths": {}}
        info_path = workdir / "shared" / "info.json"
        if info_path.is_file():
            shared = json.loads(info_path.read_text())
    else:
        info_path = workdir / "shared" / "info.json"
        before = json.loads(info_path.read_text()).get("base_eval") if info_path.is_file() else None
        shared = prepare_shared(workdir, model, methods, data_limit, log)
        shared["base_eval"] = eval_base(workdir, model, eval_limit, data_limit, before)
        (workdir / "shared" / "info.json").write_text(json.dumps(shared, indent=2) + "\n")
        log(f"base model: exact match {shared['base_eval']['accuracy']:.3f} on {shared['base_eval']['examples']} "
            f"prompts, eval {shared['base_eval']['seconds']:.0f} s")
    timings["shared_s"] = round(time.perf_counter() - started, 1)

    results = []
    for method, lr, seed in plan(methods, seeds, base_lr, high_lr):
        path = run_dir(workdir, method, lr, seed) / "result.json"
        if args.report_only:
            if path.is_file() and json.loads(path.read_text()).get("settings_key") == key:
                results.append(json.loads(path.read_text()))
            continue
        results.append(run_one(workdir, shared, method, lr=lr, seed=seed, steps=steps, eval_limit=eval_limit,
                               model=model, data_limit=data_limit, key=key, max_grad_norm=recipe["max_grad_norm"],
                               log=log))
    timings["runs_s"] = round(sum(r["wall_seconds"] for r in results), 1)
    if not results:
        raise SystemExit(f"error: no finished runs in {workdir}")

    summary = aggregate(results, base_lr=base_lr, high_lr=high_lr)
    base = shared.get("base_eval")
    complete = len(results) == len(plan(methods, seeds, base_lr, high_lr))
    label = args.label or ("quick" if args.quick else "full" if complete else "partial")
    model_name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    title = (f"compare_methods ({label}): {model_name} + LoRA, demo data, {steps} steps of batch "
             f"{recipe['batch_size']}, lr {base_lr:g} (x: {_g(high_lr)}), {eval_limit} held-out prompts")
    png = plot(summary, results, workdir, base_lr=base_lr, high_lr=high_lr, base=base,
               path=(readme.parent if readme else workdir) / PNG_NAME, title=title)
    table = format_tables(summary, base)
    pairs = shared.get("pairs", {})
    counts = (f"{pairs['train_pairs']} training pairs from {pairs['train_rows']} rows of {pairs['train_prompts']} "
              f"prompts, {pairs['test_pairs']} test pairs") if pairs else "no pair methods"
    timings["total_s"] = round(time.perf_counter() - wall_start, 1)
    header = (f"{label.capitalize()} run, {len(results)} of {len(plan(methods, seeds, base_lr, high_lr))} planned "
              f"runs finished; {machine()}; {title}; {counts}; sum of run wall times {timings['runs_s']:.0f} s.")
    print()
    print(header)
    print(table)
    if readme:
        write_readme(readme, f"{header}\n\n{table}\n\n![compare_methods]({PNG_NAME})")
        log(f"written: {readme}, {png}")
    else:
        log(f"figure: {png}")
    print(json.dumps({"label": label, "complete": complete, "methods": methods, "seeds": seeds, "steps": steps,
                      "eval_limit": eval_limit, "base_lr": base_lr, "high_lr": high_lr, "base_eval": base,
                      "pairs": pairs, "summary": summary, "runs": len(results), "png": str(png),
                      "timings": timings,
                      "results": [{k: v for k, v in r.items() if k != "correct"} for r in results]}))


if __name__ == "__main__":
    main()
