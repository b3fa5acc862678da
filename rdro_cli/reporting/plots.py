"""report's figures: training curves (several runs overlaid), test-split log-ratio histograms and per-task
accuracy bars, drawn through matplotlib's Agg canvas directly (no pyplot, so no global backend state) and
saved atomically. matplotlib is an optional extra (`rdro-cli[report]`), imported only when a report is drawn.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from rdro_cli.errors import UserError
from rdro_cli.evaluation import scoring
from rdro_cli.reporting.numbers import accuracy_metrics, bound, ema, recorded_auc, series, smoothing_weight
from rdro_cli.reporting.runs import RunData

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


def load_matplotlib():
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
            xs, ys = series(run.rows, key)
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
            bx, by = bound(run)
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
        auc = recorded_auc(run.evaluation)
        panels.append((run, logratios, labels, auc if auc is not None else scoring.auc(logratios, labels)))
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


def all_stems() -> list[str]:
    return [stem for stem, _, _, _ in TRAINING_PANELS] + [HISTOGRAM, ACCURACY]
