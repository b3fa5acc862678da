"""Summarise a demo run: held-out exact-match accuracy before and after, preference AUC, stage times.

    python scripts/demo_summary.py RUN_DIR --wall-seconds S

Reads only artifacts on disk (`<run>/eval-base/eval.json`, `<run>/eval/eval.json`, each stage's
manifest) and writes the same numbers as one JSON object to `<run>/demo.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = {"prepare": "data", "logprobs": "logprobs", "train": "train", "merge": "merged",
          "eval_before": "eval-base", "eval_after": "eval"}


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def summarise(run: Path, wall_seconds: float) -> dict:
    before, after = _read(run / "eval-base" / "eval.json"), _read(run / "eval" / "eval.json")
    em_before = before.get("tasks", {}).get("exact_match", {})
    em_after = after.get("tasks", {}).get("exact_match", {})
    preference = after.get("tasks", {}).get("preference", {})
    train = _read(run / "train" / "manifest.json")
    summary = {
        "accuracy_before": em_before.get("accuracy"),
        "accuracy_after": em_after.get("accuracy"),
        "accuracy_gain_points": None if not (em_before and em_after)
        else round(100 * (em_after["accuracy"] - em_before["accuracy"]), 2),
        "held_out_prompts": em_after.get("examples"),
        "preference_auc": preference.get("auc"),
        "mean_logratio_preferred": preference.get("mean_logratio_preferred"),
        "mean_logratio_non_preferred": preference.get("mean_logratio_non_preferred"),
        "loss": train.get("loss"), "alpha": train.get("alpha"),
        "weighting": train.get("config", {}).get("loss", {}).get("weighting"),
        "train_steps": train.get("counts", {}).get("steps"),
        "wall_seconds": round(wall_seconds, 1),
        "stage_seconds": {name: _read(run / d / "manifest.json").get("wall_seconds") for name, d in STAGES.items()},
    }
    (run / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--wall-seconds", type=float, required=True)
    args = parser.parse_args()
    summary = summarise(args.run, args.wall_seconds)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rdro demo: {args.run}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    held_out = summary["held_out_prompts"]
    table.add_row(f"held-out exact match ({held_out} prompts)" if held_out else "held-out exact match (not run)",
                  fmt(summary["accuracy_before"]), fmt(summary["accuracy_after"]))
    table.add_row("preference AUC (test split)", "0.500", fmt(summary["preference_auc"]))
    console = Console()
    console.print(table)
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_seconds"].items() if v is not None)
    console.print(f"stages: {stages}; total {summary['wall_seconds']:.0f}s; written {args.run / 'demo.json'}")


if __name__ == "__main__":
    main()
