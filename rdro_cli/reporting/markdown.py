"""report.md: the runs and their recipes (each loss's columns from its registry entry), the final training
metrics, the eval numbers before and after, and the figures.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rdro_cli.losses.registry import LOSSES
from rdro_cli.reporting.numbers import bound, finite, flatten_numbers, fmt
from rdro_cli.reporting.plots import ACCURACY, HISTOGRAM, TRAINING_PANELS
from rdro_cli.reporting.runs import BASELINE_DIR, EvalResult, RunData
from rdro_cli.store.durable import write_text_atomic

FINAL_COLUMNS = ("epoch", "loss", "logratio_preferred", "logratio_non_preferred", "logratio_max",
                 "frac_at_bound", "bound", "kl_ref_point", "delta", "grad_norm", "lr", "tokens_per_s")


def _cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _section(config: dict, name: str) -> dict:
    body = config.get(name)
    return body if isinstance(body, dict) else {}


def _recipe_row(run: RunData) -> list[Any]:
    loss, train = _section(run.config, "loss"), _section(run.config, "train")
    alpha = loss.get("alpha", "")
    used = run.manifest.get("alpha")  # train records the alpha "auto" resolved to
    if not finite(used):
        _, bounds = bound(run)  # bound = log(1/alpha)
        used = math.exp(-bounds[-1]) if bounds else None
    if alpha == "auto" and finite(used):
        alpha = f"auto (= {used:.4g})"
    name = loss.get("name", "")
    # a column shows a value only for a loss that reads that key (its registry entry says which); a run
    # whose recipe names no loss shows whatever it has
    keys = LOSSES[name].recipe_keys if name in LOSSES else ("alpha", "weighting", "beta") if name == "" else ()
    beta = loss.get("beta", "") if "beta" in keys else "–"
    weighting = loss.get("weighting", "") if "weighting" in keys else "–"
    if "alpha" not in keys:
        alpha = "–"
    batch = ""
    if train.get("batch_size"):
        batch = f"{train['batch_size']} × {train.get('gradient_accumulation_steps', 1)}"
    steps = train.get("max_steps") or (f"{train['epochs']} epoch(s)" if train.get("epochs") else "")
    last = run.rows[-1].get("step", len(run.rows))
    lora = _section(run.config, "lora")
    return [run.label, str(run.path) + (" (training in progress)" if run.in_progress else ""), name or "?",
            alpha, weighting, beta, train.get("learning_rate", ""), batch, steps, last,
            _section(run.config, "model").get("name", "") + (" + LoRA" if lora.get("enabled") else ""),
            _section(run.config, "data").get("dataset", "")]


def _eval_rows(runs: list[RunData]) -> tuple[list[str], list[list[Any]]]:
    columns: list[tuple[str, EvalResult]] = []
    seen_baselines: set[Path] = set()
    for run in runs:
        if run.evaluation is not None:
            columns.append((run.label, run.evaluation))
        if run.baseline is not None and run.baseline.directory.resolve() not in seen_baselines:
            seen_baselines.add(run.baseline.directory.resolve())
            columns.append((f"{run.label} before" if len(runs) > 1 else "before", run.baseline))
    keys: list[tuple[str, str]] = []
    values: list[dict[tuple[str, str], float]] = []
    for _, result in columns:
        flat = {}
        for task, body in result.tasks.items():
            for path, value in flatten_numbers(body):
                flat[(task, ".".join(path))] = value
        keys += [k for k in flat if k not in keys]
        values.append(flat)
    header = ["task", "metric"] + [label for label, _ in columns]
    return header, [[task, metric] + [v.get((task, metric)) for v in values] for task, metric in keys]


def write_markdown(runs: list[RunData], images: dict[str, str], out: Path, baseline: Path | None) -> Path:
    lines = ["# rdro report", "",
             "Made by `rdro report` from the artifacts on disk (no model was loaded). Runs: "
             + ", ".join(f"`{run.label}`" for run in runs) + ".", "",
             "## Runs and recipes", ""]
    lines += _table(["run", "directory", "loss", "alpha", "weighting", "beta", "learning rate",
                     "batch × accumulation", "max steps / epochs", "steps logged", "model", "dataset"],
                    [_recipe_row(run) for run in runs])
    columns = [c for c in FINAL_COLUMNS if any(finite(run.rows[-1].get(c)) for run in runs)]
    lines += ["", "## Final training metrics (last logged step)", ""]
    lines += _table(["run", "step"] + columns,
                    [[run.label, run.rows[-1].get("step", len(run.rows))] + [run.rows[-1].get(c) for c in columns]
                     for run in runs])
    lines += ["", "## Evaluation", ""]
    header, rows = _eval_rows(runs)
    if rows:
        lines += _table(header, rows)
    else:
        lines.append("No evaluation found: run `rdro eval` (writes `<run>/eval/eval.json`).")
    where = f"`{baseline}` (given as `--baseline`)" if baseline else f"`<run>/{BASELINE_DIR}/eval.json`"
    lines += ["", f"\"before\" columns and hatched bars: an eval of the model before training, read from {where}; "
              f"write one with `rdro eval --model <base model> --out <run>/{BASELINE_DIR}`, "
              "or pass any eval directory as `rdro report --baseline DIR`.", ""]
    curves = [(stem, title) for stem, title, _, _ in TRAINING_PANELS if stem in images]
    if curves:
        lines += ["## Training curves", "",
                  "Bold lines: debiased exponential moving average of the logged values (faint lines "
                  "and dots); its weight grows with the run's length. x axis: optimizer step.", ""]
        for stem, title in curves:
            lines += [f"### {title}", "", f"![{title}]({images[stem]})", ""]
    if HISTOGRAM in images or ACCURACY in images:
        lines += ["## Evaluation plots", ""]
        if HISTOGRAM in images:
            lines += ["### Test-split log-ratio by class", "",
                      f"![Test-split log-ratio histograms]({images[HISTOGRAM]})", ""]
        if ACCURACY in images:
            lines += ["### Accuracies and AUC per task", "", f"![Per-task accuracies]({images[ACCURACY]})", ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
