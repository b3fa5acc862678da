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

from pathlib import Path

from rdro_cli.reporting.markdown import write_markdown
from rdro_cli.reporting.plots import (
    ACCURACY,
    HISTOGRAM,
    TRAINING_PANELS,
    all_stems,
    load_matplotlib,
    plot_accuracies,
    plot_histograms,
    plot_training,
)
from rdro_cli.reporting.runs import BASELINE_DIR, load_runs
from rdro_cli.store import outputs


def run(cfg, *, runs: list[Path] | None = None, out: Path | None = None, baseline: Path | None = None) -> Path:
    """Writes `<out>/*.png` and `<out>/report.md` (out defaults to `<first run>/report`); returns report.md."""
    mpl = load_matplotlib()
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
    for stem in all_stems():  # a plot an earlier report drew but this one could not must not linger
        if stem not in images:
            (out / f"{stem}.png").unlink(missing_ok=True)
    return write_markdown(loaded, images, out, Path(baseline) if baseline else None)
