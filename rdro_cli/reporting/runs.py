"""What `rdro report` reads of a run: `<run>/train/metrics.jsonl` (also while training still runs), the train
manifest (else `train/final/recipe.toml`) for the recipe, `<run>/eval/eval.json` and the before-training eval
(`<run>/eval-base`, or `--baseline`). A finished run's files are checked against their manifest's digests
first. Never loads a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdro_cli.errors import UserError
from rdro_cli.store import integrity
from rdro_cli.store.manifests import read_manifest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

METRICS = "metrics.jsonl"
BASELINE_DIR = "eval-base"


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
