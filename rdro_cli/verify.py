"""verify: is every artifact of a run intact? One row per stage directory and per training checkpoint.

Each stage directory (`data/`, `logprobs/`, `train/`, `merged/`, `eval/`, ... : any child with a
manifest.json, or RUN_DIR itself when it is one) is checked as its consumers check it: the manifest's
own seal, then every file it lists against its size and digest (integrity.py). Training checkpoints are
checked against the digests in their state.json. Temporary siblings (`*.tmp-*`, `*.partial`, `*.old-*`)
are listed but not judged: stages never read them as finished work.

    ok           the manifest and every file it lists are intact
    DAMAGED      a file is missing, has another size or other bytes: re-run the stage named
    incomplete   a stage directory without its manifest (killed, or still running)
    unsealed     written before manifests carried digests: nothing to check against

Exit 0 only if every row is ok (temporaries aside), 1 otherwise.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from rdro_cli.errors import UserError
from rdro_cli.store import integrity

STAGE_DIRS = ("data", "logprobs", "train", "merged", "eval")  # a missing manifest here means "incomplete"
TEMPORARY = re.compile(r"\.(tmp-[^/]*|partial|old-\d+)$")
CHECKPOINT = re.compile(r"^step-\d{7}$")


class NotIntact(UserError):
    exit_code = 1


def _rerun(stage: str) -> str:
    return f"re-run `rdro {stage}` with --force"


def _check_stage(directory: Path) -> tuple[str, str, int, str]:
    """(stage, status, files, detail) of one stage directory."""
    problem = integrity.manifest_problem(directory)
    if problem:
        return "?", "DAMAGED", 0, problem
    path = directory / integrity.MANIFEST
    if not path.is_file():
        return "?", "incomplete", 0, "no manifest.json (killed, or still running)"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    stage = str(manifest.get("stage", "?"))
    files = manifest.get(integrity.FILES_KEY)
    if files is None:
        return stage, "unsealed", 0, "written before manifests carried digests; re-run it to seal it"
    problem = integrity.files_problem(directory, files)
    if problem:
        return stage, "DAMAGED", len(files), f"{problem}; {_rerun(stage)}"
    return stage, "ok", len(files), ""


def _check_checkpoints(train_dir: Path) -> list[tuple[str, Path, str, int, str]]:
    rows = []
    folder = train_dir / "checkpoints"
    if not folder.is_dir():
        return rows
    for checkpoint in sorted(folder.iterdir()):
        if TEMPORARY.search(checkpoint.name):
            rows.append(("checkpoint", checkpoint, "temporary", 0, "a checkpoint being written or left by a kill"))
            continue
        if not CHECKPOINT.match(checkpoint.name):
            continue
        if not (checkpoint / "state.json").is_file():
            rows.append(("checkpoint", checkpoint, "incomplete", 0, "no state.json"))
            continue
        problem = integrity.checkpoint_problem(checkpoint)
        state = json.loads((checkpoint / "state.json").read_text()) if problem is None else {}
        files = len(state.get(integrity.FILES_KEY) or {})
        if problem:
            rows.append(("checkpoint", checkpoint, "DAMAGED", 0,
                         f"{problem}; delete {checkpoint} to resume from the one before, or "
                         f"re-run `rdro train` with --force"))
        elif integrity.FILES_KEY not in state:
            rows.append(("checkpoint", checkpoint, "unsealed", 0, "written before checkpoints carried digests"))
        else:
            rows.append(("checkpoint", checkpoint, "ok", files, ""))
    return rows


def _candidates(run_dir: Path) -> list[Path]:
    if (run_dir / integrity.MANIFEST).exists():
        return [run_dir]
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and (
        (p / integrity.MANIFEST).exists() or p.name in STAGE_DIRS or TEMPORARY.search(p.name)))


def check_run(run_dir: Path) -> list[tuple[str, Path, str, int, str]]:
    """(kind, path, status, files, detail) for every artifact and temporary under `run_dir`."""
    rows = []
    for directory in _candidates(run_dir):
        if TEMPORARY.search(directory.name):
            rows.append(("temporary", directory, "temporary", 0, "left by a killed or running stage; not read"))
            continue
        stage, status, files, detail = _check_stage(directory)
        rows.append((stage, directory, status, files, detail))
        if stage == "train" or (directory / "checkpoints").is_dir():
            rows.extend(_check_checkpoints(directory))
    return rows


def _print_table(rows: list[tuple[str, Path, str, int, str]]) -> None:
    """Plain aligned text, never cut to the terminal's width (logs keep every column)."""
    header = ("stage", "path", "files", "status", "detail")
    cells = [header] + [(kind, str(path), str(files), status, detail) for kind, path, status, files, detail in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4])


def run(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory; pass a run directory (e.g. runs/my-run)")
    rows = check_run(run_dir)
    if not rows:
        raise UserError(f"{run_dir}: no stage artifacts here (no directory with a manifest.json)")
    _print_table(rows)
    bad = [r for r in rows if r[2] not in ("ok", "temporary")]
    if bad:
        kinds = sorted({r[2] for r in bad})
        raise NotIntact(f"{run_dir}: {len(bad)} of {len([r for r in rows if r[2] != 'temporary'])} artifacts "
                        f"not intact ({', '.join(k.lower() for k in kinds)}); see the table above")
    print(f"verify: {len(rows)} artifacts intact under {run_dir}", file=sys.stderr, flush=True)
