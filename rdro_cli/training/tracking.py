"""Experiment tracking for `train`: `train.report_to` through accelerate's trackers.

accelerate ships the integrations (TensorBoard, Weights & Biases, MLflow, trackio, Comet, Aim, ClearML,
DVCLive, SwanLab); this module only turns the recipe into `Accelerator(log_with=...)` arguments, refuses a
tracker whose package is missing (accelerate would drop it with a debug message, and the user would find
an empty dashboard after the run), and logs each metrics row under `train/<name>` at its optimizer step.

TensorBoard writes its event files to `<out>/tb` (as the hand-written writer before it did); the others
use their own configuration (`wandb login`, `MLFLOW_TRACKING_URI`, ...) under the project name `rdro`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rdro_cli.errors import UserError

if TYPE_CHECKING:
    from rdro_cli.recipe import Recipe


PROJECT = "rdro"
TENSORBOARD_DIR = "tb"
# pip distribution of each tracker whose name differs from its recipe name
PIP_NAMES = {"comet_ml": "comet-ml"}


def _available() -> set[str]:
    from accelerate.tracking import get_available_trackers

    return {str(getattr(t, "value", t)) for t in get_available_trackers()}


def accelerator_kwargs(cfg: Recipe, out: Path) -> dict:
    """`log_with` for `Accelerator(...)`, or nothing when `train.report_to` is empty."""
    names = list(dict.fromkeys(cfg.train.report_to))
    if not names:
        return {}
    missing = [n for n in names if n not in _available()]
    if missing:
        packages = " ".join(PIP_NAMES.get(n, n) for n in missing)
        raise UserError(f"train.report_to: {', '.join(missing)} needs its package: pip install {packages} "
                        f"(or remove it from train.report_to)")
    from accelerate.tracking import TensorBoardTracker

    # TensorBoard as a tracker object: accelerate would put it under <logging_dir>/<project>, we keep <out>/tb
    return {"log_with": [TensorBoardTracker(TENSORBOARD_DIR, str(out)) if n == "tensorboard" else n
                         for n in names]}


def hyperparameters(cfg: Recipe) -> dict[str, bool | int | float | str]:
    """The resolved recipe as flat `section.key` scalars (what every tracker's config table accepts)."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat


def start(accelerator, cfg: Recipe) -> None:
    """Opens the run in every tracker (all processes call it; accelerate writes on the main one)."""
    if cfg.train.report_to:
        accelerator.init_trackers(PROJECT, config=hyperparameters(cfg))


def log(accelerator, row: dict) -> None:
    """One metrics.jsonl row; `None` (a non-finite value or no grad norm) is left out, not logged as 0."""
    if accelerator.trackers:
        values = {f"train/{k}": v for k, v in row.items() if k != "step" and v is not None}
        accelerator.log(values, step=row["step"])


def finish(accelerator) -> None:
    """Flushes and closes every tracker; not `accelerator.end_training()`, which also ends the process group."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
