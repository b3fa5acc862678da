"""Integrity: the bytes a stage published are the bytes its consumers read.

Every manifest lists the files its stage published with their size and a content digest (xxh3-128, see
store.digests). The manifest seals itself: `manifest_digest` is the sha256 of its own canonical text without
that key, and the file must be byte-for-byte that canonical text, so any change to any byte of it is noticed.
Training checkpoints record their files the same way in `state.json`. Also: finding NaN/inf rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rdro_cli.store.digests import digest_cached

MANIFEST = "manifest.json"
FILES_KEY = "files"
SELF_KEY = "manifest_digest"
# Parts of a stage directory its manifest does not cover: checkpoints carry their own digests
# (state.json) and come and go during training; tb/ is a log that a tracker may still append to.
NOT_SEALED = {"train": ("checkpoints", "tb")}


def tree_digests(directory: str | Path, *, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative path: {"size", "digest"}} of every file under `directory`, in sorted order.

    `exclude` names top-level entries (files or directories) that are left out."""
    directory = Path(directory)
    found = {}
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in exclude]
            files = [f for f in files if f not in exclude]
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            rel = (rel_root / name).as_posix()
            found[rel] = {"size": path.stat().st_size, "digest": digest_cached(path)}
    return dict(sorted(found.items()))


def stage_files(directory: str | Path, stage: str) -> dict[str, dict]:
    """What a stage's manifest records: every file in its directory but the manifest (and NOT_SEALED)."""
    return tree_digests(directory, exclude=(MANIFEST, *NOT_SEALED.get(stage, ())))


def _canonical(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, default=str) + "\n"


def seal(manifest: dict) -> str:
    """The manifest's text with `manifest_digest` (sha256 of the text without it) as its last key."""
    body = {k: v for k, v in manifest.items() if k != SELF_KEY}
    body = json.loads(_canonical(body))  # what a reader will parse (default=str applied)
    return _canonical({**body, SELF_KEY: hashlib.sha256(_canonical(body).encode()).hexdigest()})


def manifest_problem(directory: str | Path) -> str | None:
    """Why `<directory>/manifest.json` cannot be trusted, or None (also None when there is none).

    A manifest with neither `files` nor `manifest_digest` predates digests and is accepted as it is; one
    byte changed cannot remove both keys."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError:
        return f"{path}: damaged (not valid JSON: truncated or changed)"
    if not isinstance(manifest, dict):
        return f"{path}: damaged (not a JSON object)"
    if FILES_KEY not in manifest and SELF_KEY not in manifest:
        return None
    if raw.decode("utf-8") != seal(manifest):  # seal() writes the correct digest: any change shows
        return f"{path}: damaged (its text does not match its own digest)"
    if not isinstance(manifest.get(FILES_KEY), dict):
        return f"{path}: damaged (no file list)"
    return None


def files_problem(directory: str | Path, files: dict) -> str | None:
    """The first recorded file that is missing, has another size or other bytes, or None."""
    directory = Path(directory)
    for rel, entry in files.items():
        path = directory / rel
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{path}: damaged ({size} bytes, {entry.get('size')} recorded: truncated or changed)"
        algorithm = str(entry.get("digest", "")).partition(":")[0]
        try:
            actual = digest_cached(path, algorithm)
        except ValueError:
            return f"{path}: damaged (unknown digest {entry.get('digest')!r} recorded)"
        if actual != entry.get("digest"):
            return f"{path}: damaged (content differs from its recorded digest)"
    return None


def artifact_problem(directory: str | Path, only: tuple[str, ...] | None = None) -> str | None:
    """Why the stage artifact in `directory` is not intact (manifest or any file it lists), or None.
    `only`: check just these of its files (a reader of a few small files need not hash the model beside them).

    A directory without a (readable) manifest is not judged here: require_input says it is incomplete, and
    a run still training is read as it is."""
    directory = Path(directory)
    problem = manifest_problem(directory)
    if problem:
        return problem
    path = directory / MANIFEST
    if not path.is_file():
        return None
    files = json.loads(path.read_text(encoding="utf-8")).get(FILES_KEY) or {}
    return files_problem(directory, files if only is None else {name: files[name] for name in only if name in files})


def reseal(directory: str | Path) -> None:
    """Re-records the file digests and the seal of an existing manifest, for files changed on purpose
    (tests that build a valid artifact of another shape, tools that migrate artifacts)."""
    from rdro_cli.store.durable import write_text_atomic

    path = Path(directory) / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest[FILES_KEY] = stage_files(directory, manifest.get("stage", ""))
    write_text_atomic(path, seal(manifest))


def checkpoint_problem(checkpoint: str | Path, state_file: str = "state.json") -> str | None:
    """Why a training checkpoint (complete with `state_file`, which lists its files) is not intact."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / state_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{checkpoint / state_file}: damaged (not valid JSON)"
    files = state.get(FILES_KEY) if isinstance(state, dict) else None
    if files is None:
        return None  # written before checkpoints carried digests
    return files_problem(checkpoint, files)


def nonfinite_rows(values) -> list[int]:
    """Indices of the NaN / inf entries of a 1-D tensor."""
    import torch

    return torch.nonzero(~torch.isfinite(values)).flatten().tolist()


def describe_rows(rows: list[int], total: int, limit: int = 8) -> str:
    shown = ", ".join(map(str, rows[:limit])) + (", ..." if len(rows) > limit else "")
    return f"{len(rows)} of {total} rows ({shown})"
