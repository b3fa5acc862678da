"""Where a stage may write: the checks every stage runs on its output path before any work starts.

A stage writes only into a path that does not exist (or is an empty directory) or that holds an artifact
of the same stage; `--force` replaces only such an artifact. Anything else is refused in one line naming
the path and what it holds: a regular file, a symbolic link, a directory of someone else's files, a model,
another stage's artifact, `.`/`..`/`/` (or the current or home directory, or one above them), an input
of the same command or a directory that contains one, or a path inside another artifact. Writability is
checked up front, and the output's lock (`locks.acquire_lock`) is taken, so a second launch against
the same output refuses instead of racing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from rdro_cli.errors import UserError
from rdro_cli.store import durable, locks, manifests

# written into a stage directory that is worked on in place (train) before anything else, so an
# unfinished run is recognised as the stage's own
STAGE_FILE = ".rdro-stage"
# what a train directory of rdro 0.1 (before STAGE_FILE) can hold
_LEGACY_TRAIN_ENTRIES = {"metrics.jsonl", "checkpoints", "final", "tb", manifests.MANIFEST}


# where each stage writes inside a run directory by default
DEFAULT_DIRS = {"prepare": "data", "logprobs": "logprobs", "train": "train", "merge": "merged", "eval": "eval",
                "report": "report"}


_MODEL_FILES = ("config.json", "adapter_config.json", "model.safetensors", "model.safetensors.index.json")


def mark_stage(directory: Path, stage: str) -> None:
    """Marks a directory a stage works in place as that stage's (before it writes anything else)."""
    directory.mkdir(parents=True, exist_ok=True)
    durable.write_text_atomic(directory / STAGE_FILE, json.dumps({"stage": stage}) + "\n")


def holder(path: Path) -> tuple[str, str | None]:
    """What `path` holds: (kind, stage) with kind one of missing, file, link, empty, artifact, model, foreign."""
    if path.is_symlink():
        return "link", None
    if not path.exists():
        return "missing", None
    if not path.is_dir():
        return "file", None
    entries = {p.name for p in path.iterdir()}
    if not entries:
        return "empty", None
    manifest = manifests.read_manifest(path)
    if manifest is not None and isinstance(manifest.get("stage"), str):
        return "artifact", manifest["stage"]
    if STAGE_FILE in entries:
        try:
            stage = json.loads((path / STAGE_FILE).read_text(encoding="utf-8")).get("stage")
        except (OSError, ValueError, AttributeError):
            stage = None
        if isinstance(stage, str):
            return "artifact", stage
    if entries <= _LEGACY_TRAIN_ENTRIES and entries & {"metrics.jsonl", "checkpoints"}:
        return "artifact", "train"
    if "report.md" in entries and all(n == "report.md" or n.endswith(".png") for n in entries):
        return "artifact", "report"  # a report of rdro 0.1 (before STAGE_FILE)
    if entries & set(_MODEL_FILES):
        return "model", None
    return "foreign", None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _refusal(out: Path, stage: str, inputs: Iterable[Path]) -> str | None:
    """Why `out` may not be written by `stage`, or None."""
    raw = Path(out)
    if raw.name in ("", ".", "..") or str(raw).rstrip("/") == "":
        return (f"{out}: not an output directory rdro can create (it would replace `{raw}` itself); "
                f"name a new directory, e.g. --out runs/<name>/{stage}")
    if raw.is_symlink():
        return f"{out}: is a symbolic link; pass the directory it points to, or a new path"
    resolved = raw.resolve()
    protected = {Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)}
    for directory in protected:
        if _inside(directory, resolved):
            return (f"{out}: would replace {'the current directory' if directory == Path.cwd().resolve() else directory}"
                    f"{' or a directory above it' if directory != resolved else ''}; name a new directory, "
                    f"e.g. --out runs/<name>/{stage}")
    for given in inputs:
        given = Path(given)
        if not given.exists():
            continue
        source = given.resolve()
        if source == resolved:
            return f"{out}: is an input of this command ({given}); choose another --out"
        if resolved in source.parents:
            return f"{out}: contains {given}, an input of this command; choose another --out"
        if source in resolved.parents:
            return f"{out}: is inside {given}, an input of this command; choose another --out"
    for parent in resolved.parents:
        manifest = manifests.read_manifest(parent)
        if manifest is not None and manifest.get("stage"):
            return (f"{out}: is inside {parent}, an rdro {manifest['stage']} artifact; choose a path outside it, "
                    f"e.g. {parent.parent / stage}")
    kind, found = holder(raw)
    if kind == "file":
        return f"{out}: is a file, not an rdro {stage} output; choose another --out (rdro never replaces it)"
    if kind == "model":
        return f"{out}: holds a model, not an rdro {stage} output; choose another --out (rdro never replaces it)"
    if kind == "foreign":
        held = sorted(p.name for p in raw.iterdir() if p.is_dir() and manifests.read_manifest(p) is not None)
        if held:
            return (f"{out}: is a run directory holding rdro artifacts ({', '.join(held)}); name the {stage} "
                    f"artifact's own directory, e.g. --out {raw / DEFAULT_DIRS.get(stage, stage)}")
        names = ", ".join(sorted(p.name for p in raw.iterdir())[:3])
        return (f"{out}: holds files rdro did not write ({names}{', ...' if len(list(raw.iterdir())) > 3 else ''}); "
                f"choose another --out (rdro never deletes them)")
    if kind == "artifact" and found != stage:
        return (f"{out}: holds an rdro {found} artifact, not a {stage} output; choose another --out "
                f"(e.g. {raw.parent / stage})")
    return None


def _check_writable(out: Path) -> None:
    """Probes the nearest existing directory at or above `out`; creates nothing that would outlive a refusal."""
    out = Path(out)
    target = out
    while not target.is_dir():
        if target.exists() or target.is_symlink() or target == target.parent:  # a file on the way, or no root
            raise UserError(f"{out}: cannot write there ({target} is not a directory); choose a writable --out")
        target = target.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{out}: cannot write there ({err.strerror or err}); choose a writable --out") from None


def claim(out: Path, stage: str, *, inputs: Iterable[Path | str | None] = (), is_main: bool = True,
          share: Callable[[object], object] | None = None) -> Path:
    """Checks that `stage` may write `out`, that it is writable, and takes its lock; returns `out`.

    Under several processes only the main one checks and locks; `share` (a broadcast from the main
    process) hands its verdict to the others so every process refuses together.
    """
    out = Path(out)
    paths = [Path(p) for p in inputs if p]
    problem = None
    if is_main:
        try:
            problem = _refusal(out, stage, paths)
            if problem is None:
                _check_writable(out)
                durable.clean_stale(out)
                locks.acquire_lock(out, stage)
        except UserError as err:
            problem = str(err)
    if share is not None:
        problem = share(problem)
    if problem:
        raise UserError(problem)
    return out


def made_from(artifact: Path) -> list[tuple[Path, str]]:
    """(directory, stage) of the finished artifacts beside `artifact` (the other stages of its run directory)
    whose manifests record `artifact`'s fingerprint among their inputs: what replacing it would leave stale."""
    artifact = Path(artifact)
    manifest = manifests.read_manifest(artifact)
    if manifest is None or not artifact.parent.is_dir():
        return []
    fingerprint = manifest.get("fingerprint")
    found = []
    for sibling in sorted(artifact.parent.iterdir()):
        if sibling == artifact or not sibling.is_dir():
            continue
        other = manifests.read_manifest(sibling) or {}
        recorded = other.get("inputs")
        if isinstance(recorded, dict) and fingerprint in recorded.values():
            found.append((sibling, other.get("stage")))
    return found


def refuse_replacing_used(out: Path, stage: str, fingerprint: str, *, force: bool) -> None:
    """Refuses (without --force) to replace a finished `stage` artifact with one of other inputs or settings
    while finished artifacts of the same run were made from it: a second recipe run into the same directory
    would otherwise swap the data under a trained model, and eval would score it on another split."""
    manifest = manifests.read_manifest(out)
    if force or manifest is None or manifest.get("stage") != stage or manifest.get("fingerprint") == fingerprint:
        return
    users = made_from(out)
    if users:
        names = ", ".join(f"{path.name}/ ({used_by})" for path, used_by in users)
        raise UserError(f"{out}: holds the {stage} artifact that {names} of this run were made from, and this "
                        f"command would replace it with one of other inputs or settings; write it elsewhere "
                        f"(--out, or another output.dir), or pass --force to replace it (they are then stale)")


def local_paths(*values: str | Path | None) -> list[Path]:
    """The values that name existing local paths (model names may be hub ids)."""
    return [Path(v) for v in values if v and Path(v).exists()]


def broadcast_from_main(state) -> Callable[[object], object] | None:
    """A `share` for `claim` under accelerate (`state`: a PartialState or an Accelerator)."""
    if state.num_processes <= 1:
        return None
    from accelerate.utils import broadcast_object_list

    return lambda value: broadcast_object_list([value])[0]
