"""`rdro report`: training curves, evaluation plots and a one-page report.md, from artifacts on disk.

Reads only what the other stages wrote -- `<run>/train/metrics.jsonl` (also while training still runs),
the train manifest (else `train/final/recipe.toml`) for the recipe, `<run>/eval/eval.json` and
`<run>/eval/logratios.safetensors` -- and never loads a model. Several runs overlay their curves in
one figure per quantity, so rdro vs ddro vs kto on the same data compare at a glance.

Before/after convention: the "before" numbers of a run are an eval of the model before training,
`<run>/eval-base/eval.json` (write it with `rdro eval --model <base> --out <run>/eval-base`), or the
eval directory given as `--baseline DIR`, which then serves every run.

matplotlib is an optional extra (`rdro-cli[report]`), imported only here and drawn through the Agg
canvas directly (no pyplot, so no global backend state).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdro_cli import integrity, metrics, outputs
from rdro_cli.artifacts import read_manifest, write_text_atomic
from rdro_cli.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

METRICS = "metrics.jsonl"
BASELINE_DIR = "eval-base"
DPI = 110
MISSING_MATPLOTLIB = "rdro report needs matplotlib: pip install 'rdro-cli[report]'"

# One PNG per training quantity: file stem, title, y label, metrics.jsonl fields drawn in it.
# A panel is drawn when any run logged a finite value of one of its fields.
TRAINING_PANELS = (
    ("loss", "Training loss", "loss", ("loss",)),
    ("learning_rate", "Learning rate", "lr", ("lr",)),
    ("grad_norm", "Gradient norm", "grad norm", ("grad_norm",)),
    ("logratio", "Mean log-ratio log πθ/πref per class", "log-ratio",
     ("logratio_preferred", "logratio_non_preferred")),
    ("logratio_max", "Max log-ratio (dotted: RDRO bound log(1/α))", "log-ratio", ("logratio_max",)),
    ("frac_at_bound", "Fraction of preferred rows at the RDRO bound", "fraction", ("frac_at_bound",)),
    ("kl_ref_point", "KTO reference point z0", "z0", ("kl_ref_point",)),
    ("delta", "BCO running mean δ", "δ", ("delta",)),
    ("tokens_per_s", "Throughput", "tokens / s", ("tokens_per_s",)),
)
FIELD_NAMES = {"logratio_preferred": "preferred", "logratio_non_preferred": "non-preferred"}
HISTOGRAM = "logratio_hist"
ACCURACY = "eval_accuracy"
FINAL_COLUMNS = ("epoch", "loss", "logratio_preferred", "logratio_non_preferred", "logratio_max",
                 "frac_at_bound", "bound", "kl_ref_point", "delta", "grad_norm", "lr", "tokens_per_s")


@dataclass
class EvalResult:
    directory: Path
    tasks: dict


@dataclass
class RunData:
    path: Path
    label: str
    rows: list[dict]
    metrics_path: Path
    config: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    evaluation: EvalResult | None = None
    baseline: EvalResult | None = None

    @property
    def in_progress(self) -> bool:
        return not self.manifest  # train writes its manifest last


# ---------------------------------------------------------------- reading artifacts


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows sorted by step. A resumed run logs again the steps after its checkpoint:
    the newest row of a step wins. A cut-off last line (training still writing) is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    by_step: dict[Any, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                continue
            raise UserError(f"{path}:{number}: not a JSON line; the metrics file is damaged "
                            f"(re-run `rdro train --force`)") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object per line")
        by_step[row.get("step", number)] = row
    return [by_step[step] for step in sorted(by_step, key=lambda s: (not isinstance(s, (int, float)), s))]


def _metrics_path(run: Path) -> Path:
    if not run.is_dir():
        raise UserError(f"{run}: run directory does not exist; pass an existing --run DIR "
                        f"(or the --recipe whose output.dir holds the run)")
    if (run / "train" / METRICS).is_file():
        return run / "train" / METRICS
    raise UserError(f"{run}: no train/{METRICS}; run `rdro train` first")


def _require_intact(directory: Path, names: tuple[str, ...], stage: str) -> None:
    """The files the report reads from a finished stage are the bytes that stage wrote (its manifest's
    digests); a report drawn from damaged files would show numbers nobody measured."""
    problem = integrity.artifact_problem(directory, only=names)
    if problem:
        raise UserError(f"{problem}; re-run `rdro {stage}` with --force (`rdro verify` checks a whole run)")


def _read_eval(directory: Path) -> EvalResult | None:
    path = directory / "eval.json"
    if not path.is_file():
        return None
    _require_intact(directory, ("eval.json", "logratios.safetensors"), "eval")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path}: not valid JSON; re-run `rdro eval --force`") from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    return EvalResult(directory, tasks if isinstance(tasks, dict) else {})


def _run_config(run: Path, metrics_path: Path, manifest: dict, cfg) -> dict:
    """The resolved recipe the run was trained with: train manifest, else final/recipe.toml, else the
    recipe given to this command when it names this run."""
    if isinstance(manifest.get("config"), dict):
        return manifest["config"]
    recipe_file = metrics_path.parent / "final" / "recipe.toml"
    if recipe_file.is_file():
        try:
            return tomllib.loads(recipe_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    if cfg is not None and run.resolve() == cfg.run_dir.resolve():
        return cfg.to_dict()
    return {}


def _labels(paths: list[Path], configs: list[dict]) -> list[str]:
    """Run dir name + loss name; the parent dir joins the name when two runs share a name."""
    names = [p.resolve().name for p in paths]
    labels = []
    for path, name, config in zip(paths, names, configs, strict=True):
        if names.count(name) > 1:
            name = f"{path.resolve().parent.name}/{name}"
        loss = config.get("loss", {}).get("name") if isinstance(config.get("loss"), dict) else None
        labels.append(f"{name} ({loss})" if loss else name)
    return labels


def load_runs(cfg, runs: list[Path], baseline: Path | None) -> list[RunData]:
    shared_baseline = None
    if baseline is not None:
        shared_baseline = _read_eval(Path(baseline))
        if shared_baseline is None:
            raise UserError(f"{baseline}: no eval.json; pass the --out directory of an `rdro eval` run "
                            f"as --baseline")
    metrics_paths = [_metrics_path(Path(run)) for run in runs]
    manifests = [read_manifest(mp.parent) or {} for mp in metrics_paths]
    configs = [_run_config(Path(run), mp, manifest, cfg)
               for run, mp, manifest in zip(runs, metrics_paths, manifests, strict=True)]
    loaded = []
    for run, metrics_path, manifest, config, label in zip(runs, metrics_paths, manifests, configs,
                                                          _labels(runs, configs), strict=True):
        run = Path(run)
        _require_intact(metrics_path.parent, (METRICS,), "train")
        rows = read_metrics(metrics_path)
        if not rows:
            raise UserError(f"{metrics_path}: no training steps logged yet")
        loaded.append(RunData(run, label, rows, metrics_path, config, manifest, _read_eval(run / "eval"),
                              shared_baseline or _read_eval(run / BASELINE_DIR)))
    return loaded


# ---------------------------------------------------------------- numbers


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(row.get("step", i + 1), row.get(key)) for i, row in enumerate(rows)]
    points = [(x, y) for x, y in points if _finite(x) and _finite(y)]
    return [p[0] for p in points], [float(p[1]) for p in points]


def smoothing_weight(n: int) -> float:
    """EMA weight growing with the run's length: light for a handful of steps, ~0.95 for thousands."""
    return min(0.95, max(0.3, 1.0 - 8.0 / max(n, 1)))


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (the first points are not pulled towards zero)."""
    smoothed, average, norm = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        smoothed.append(average / norm)
    return smoothed


def _flatten(body: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], float]]:
    """Numeric leaves of a nested eval.json task as (key path, value); strings and lists are skipped."""
    if isinstance(body, dict):
        return [leaf for key, value in body.items() for leaf in _flatten(value, prefix + (str(key),))]
    return [(prefix, body)] if _finite(body) else []


def _is_reference(words: tuple[str, ...]) -> bool:
    return any(w in ("ref", "reference") or w.startswith("ref_") or w.endswith("_ref") for w in words)


_GENERIC = {"accuracy", "acc", "tasks", "per_task", "score"}


def accuracy_metrics(tasks: dict) -> dict[str, float]:
    """The bar-chart numbers of an eval: accuracies and AUCs in [0, 1], one label per number.

    Tolerant of the exact layout: `preference.auc`, `exact_match.accuracy`, `bbh.<task>` or
    `bbh.tasks.<task>.accuracy`, `bbh.mean` all qualify; the reference model's numbers do not.
    """
    bars: dict[str, float] = {}
    for task, body in tasks.items():
        if task == "generate":
            continue
        for path, value in _flatten(body):
            words = tuple(p.lower() for p in path)
            if not 0 <= value <= 1 or _is_reference(words):
                continue
            last = words[-1] if words else ""
            named = "acc" in last or "auc" in last
            # bbh / exact_match may store a bare float per subtask; counts there are ints, not scores
            if not named and not (task in ("bbh", "exact_match") and isinstance(value, float)):
                continue
            rest = [p for p in path if p.lower() not in _GENERIC]
            bars[f"{task}: {'/'.join(rest)}" if rest else task] = float(value)
    return bars


def _auc(result: EvalResult | None) -> float | None:
    if result is None:
        return None
    for path, value in _flatten(result.tasks.get("preference", {})):
        if path and "auc" in path[-1].lower() and not _is_reference(tuple(p.lower() for p in path)):
            return float(value)
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4g}"


# ---------------------------------------------------------------- plots


def _matplotlib():
    """Figure and the Agg canvas; a one-line UserError when the optional extra is missing."""
    try:
        import matplotlib  # noqa: F401  (imported first so a missing package is reported as such)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(MISSING_MATPLOTLIB) from None
    return Figure, FigureCanvasAgg


def _save(figure, canvas_cls, path: Path) -> None:
    canvas_cls(figure)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    figure.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)


def _bound(run: RunData) -> tuple[list[float], list[float]]:
    return _series(run.rows, "bound")


def plot_training(mpl, runs: list[RunData], stem: str, title: str, ylabel: str, fields: tuple[str, ...],
                  path: Path) -> bool:
    """Raw values faint, smoothed values bold; colour per run, line style per field (or colour per field
    for a single run). Returns False when no run logged any of the fields."""
    figure_cls, canvas_cls = mpl
    figure = figure_cls(figsize=(7.5, 4.2))
    ax = figure.add_subplot()
    styles = ("-", "--", ":")
    drawn = False
    for i, run in enumerate(runs):
        for j, key in enumerate(fields):
            xs, ys = _series(run.rows, key)
            if not xs:
                continue
            drawn = True
            color = f"C{j}" if len(runs) == 1 and len(fields) > 1 else f"C{i}"
            style = styles[j % len(styles)]
            if len(fields) > 1:
                label = FIELD_NAMES.get(key, key) if len(runs) == 1 else f"{run.label}: {FIELD_NAMES.get(key, key)}"
            else:
                label = run.label
            ax.plot(xs, ys, color=color, linestyle=style, linewidth=1, alpha=0.3,
                    marker="o" if len(xs) <= 30 else None, markersize=2.5)
            ax.plot(xs, ema(ys, smoothing_weight(len(ys))), color=color, linestyle=style, linewidth=2,
                    label=label)
        if stem == "logratio_max":
            bx, by = _bound(run)
            if by and max(by) - min(by) < 1e-9:
                ax.axhline(by[0], color=f"C{i}", linestyle=":", linewidth=1.5,
                           label=f"{run.label}: log(1/α) = {by[0]:.3f}")
            elif by:
                ax.plot(bx, by, color=f"C{i}", linestyle=":", linewidth=1.5, label=f"{run.label}: log(1/α)")
    if not drawn:
        return False
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if stem == "learning_rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if stem == "frac_at_bound":
        ax.set_ylim(-0.02, 1.02)
    if stem == "logratio":
        ax.axhline(0, color="grey", linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(figure, canvas_cls, path)
    return True


def plot_histograms(mpl, runs: list[RunData], path: Path) -> bool:
    """Test-split log-ratios of preferred vs non-preferred rows, one panel per run, AUC in the title."""
    import numpy as np
    from safetensors.numpy import load_file

    panels = []
    for run in runs:
        stored = run.evaluation.directory / "logratios.safetensors" if run.evaluation else None
        if stored is None or not stored.is_file():
            continue
        tensors = load_file(str(stored))
        if "logratios" not in tensors or "labels" not in tensors:
            continue
        logratios = tensors["logratios"].astype(np.float64).reshape(-1)
        labels = tensors["labels"].reshape(-1) != 0
        auc = _auc(run.evaluation)
        panels.append((run, logratios, labels, auc if auc is not None else metrics.auc(logratios, labels)))
    if not panels:
        return False
    figure_cls, canvas_cls = mpl
    figure = figure_cls(figsize=(7.5, 1.0 + 2.6 * len(panels)))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    values = np.concatenate([p[1] for p in panels])
    values = values[np.isfinite(values)]
    bins = np.histogram_bin_edges(values, bins=int(min(50, max(10, math.sqrt(len(values)))))) \
        if len(values) else 10
    for ax, (run, logratios, labels, auc) in zip(axes, panels, strict=True):
        for mask, name, color in ((labels, "preferred", "C0"), (~labels, "non-preferred", "C3")):
            data = logratios[mask & np.isfinite(logratios)]
            ax.hist(data, bins=bins, color=color, alpha=0.55, label=f"{name} (n={len(data)})")
            if len(data):
                ax.axvline(float(np.mean(data)), color=color, linestyle="--", linewidth=1.2)
        ax.axvline(0, color="grey", linewidth=0.8)
        auc_text = f"AUC {auc:.3f}" if auc is not None else "AUC n/a"
        ax.set_title(f"{run.label}: test log-ratio, {auc_text}")
        ax.set_ylabel("rows")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("log πθ(y|x) − log πref(y|x)   (dashed: class means)")
    _save(figure, canvas_cls, path)
    return True


def _bar_series(runs: list[RunData]) -> list[tuple[str, dict[str, float], str, bool]]:
    """(label, bars, colour, is_before) per run eval and per distinct baseline eval."""
    series = []
    for i, run in enumerate(runs):
        if run.evaluation is not None:
            series.append((run.label, accuracy_metrics(run.evaluation.tasks), f"C{i}", False))
    baselines: dict[Path, list[int]] = {}
    for i, run in enumerate(runs):
        if run.baseline is not None:
            baselines.setdefault(run.baseline.directory.resolve(), []).append(i)
    for owners in baselines.values():
        base = runs[owners[0]].baseline
        if len(owners) == 1 and len(runs) > 1:
            label, color = f"{runs[owners[0]].label} before", f"C{owners[0]}"
        else:
            label, color = f"before ({base.directory.name})", "0.45"
        series.append((label, accuracy_metrics(base.tasks), color, True))
    return [s for s in series if s[1]]


def plot_accuracies(mpl, runs: list[RunData], path: Path) -> bool:
    """Horizontal grouped bars: one group per task metric, one bar per run; "before" bars hatched."""
    series = _bar_series(runs)
    if not series:
        return False
    names: list[str] = []
    for _, bars, _, _ in series:
        names += [n for n in bars if n not in names]
    figure_cls, canvas_cls = mpl
    figure = figure_cls(figsize=(7.5, 1.4 + 0.32 * len(names) * max(1.0, len(series) / 2)))
    ax = figure.add_subplot()
    height = 0.8 / len(series)
    annotate = len(names) * len(series) <= 40
    for k, (label, bars, color, before) in enumerate(series):
        ys = [i - 0.4 + height * (k + 0.5) for i, name in enumerate(names) if name in bars]
        xs = [bars[name] for name in names if name in bars]
        drawn = ax.barh(ys, xs, height=height * 0.95, color=color, alpha=0.45 if before else 0.9,
                        hatch="//" if before else None, edgecolor="white" if not before else color, label=label)
        if annotate:
            ax.bar_label(drawn, fmt="%.3f", fontsize=7, padding=2)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("accuracy / AUC")
    ax.set_title("Evaluation" + (" before / after training" if any(s[3] for s in series) else ""))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(figure, canvas_cls, path)
    return True


# ---------------------------------------------------------------- report.md


def _cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|")


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
    if not _finite(used):
        _, bounds = _bound(run)  # bound = log(1/alpha)
        used = math.exp(-bounds[-1]) if bounds else None
    if alpha == "auto" and _finite(used):
        alpha = f"auto (= {used:.4g})"
    name = loss.get("name", "")
    beta = loss.get("beta", "") if name in ("kto", "bco", "dpo") else "–"
    weighting = loss.get("weighting", "") if name in ("rdro", "") else "–"
    if name not in ("rdro", ""):
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
            for path, value in _flatten(body):
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
    columns = [c for c in FINAL_COLUMNS if any(_finite(run.rows[-1].get(c)) for run in runs)]
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


# ---------------------------------------------------------------- stage entry


def _all_stems() -> list[str]:
    return [stem for stem, _, _, _ in TRAINING_PANELS] + [HISTOGRAM, ACCURACY]


def run(cfg, *, runs: list[Path] | None = None, out: Path | None = None, baseline: Path | None = None) -> Path:
    """Writes `<out>/*.png` and `<out>/report.md` (out defaults to `<first run>/report`); returns report.md."""
    mpl = _matplotlib()
    run_dirs = [Path(r) for r in runs] if runs else [cfg.run_dir]
    loaded = load_runs(cfg, run_dirs, Path(baseline) if baseline else None)
    out = Path(out) if out else run_dirs[0] / "report"
    inputs = [d / name for d in run_dirs for name in ("data", "logprobs", "train", "merged", "eval", BASELINE_DIR)]
    outputs.claim(out, "report", inputs=[*inputs, *([baseline] if baseline else [])])
    outputs.mark_stage(out, "report")
    images: dict[str, str] = {}
    for stem, title, ylabel, fields in TRAINING_PANELS:
        if plot_training(mpl, loaded, stem, title, ylabel, fields, out / f"{stem}.png"):
            images[stem] = f"{stem}.png"
    if plot_histograms(mpl, loaded, out / f"{HISTOGRAM}.png"):
        images[HISTOGRAM] = f"{HISTOGRAM}.png"
    if plot_accuracies(mpl, loaded, out / f"{ACCURACY}.png"):
        images[ACCURACY] = f"{ACCURACY}.png"
    for stem in _all_stems():  # a plot an earlier report drew but this one could not must not linger
        if stem not in images:
            (out / f"{stem}.png").unlink(missing_ok=True)
    return write_markdown(loaded, images, out, Path(baseline) if baseline else None)
