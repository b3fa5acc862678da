"""Manifests: a stage directory counts as finished only when its `manifest.json` exists (written last, sealed
by store.integrity). Reading and writing them, requiring a finished upstream input, checking recorded inputs
against the ones at hand, and `is_done` (same fingerprint, intact files).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rdro_cli.errors import UserError
from rdro_cli.store import integrity
from rdro_cli.store.durable import recover, write_text_atomic
from rdro_cli.store.integrity import MANIFEST

SCHEMA_VERSION = 1




_PACKAGES = ("rdro-cli", "torch", "transformers", "accelerate", "peft", "datasets", "safetensors")



def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_manifest(directory: Path, *, stage: str, fingerprint: str, inputs: dict[str, str],
                   config: dict, counts: dict, started: float, **extra: Any) -> dict:
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "fingerprint": fingerprint,
        "inputs": inputs,
        "config": config,
        "versions": package_versions(),
        "wall_seconds": round(time.time() - started, 3),
        "counts": counts,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **extra,
    }
    # last, so the digests cover everything the stage wrote (integrity.py)
    manifest[integrity.FILES_KEY] = integrity.stage_files(directory, stage)
    write_text_atomic(Path(directory) / MANIFEST, integrity.seal(manifest))
    return manifest


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def require_input(directory: Path, stage: str, *, rerun: str | None = None) -> dict:
    """The manifest of a finished upstream stage, or a one-line error naming what to run."""
    directory = Path(directory)
    if not directory.exists():  # a crash between the two renames of a replacement: the old one is the input
        with contextlib.suppress(OSError):  # another reader may be restoring it right now
            recover(directory)
    damaged = integrity.manifest_problem(directory)
    if damaged:
        raise UserError(f"{damaged}; re-run `rdro {stage}` with --force")
    manifest = read_manifest(directory)
    rerun = rerun or f"rdro {stage}"
    if manifest is None:
        state = "is incomplete (no manifest.json)" if directory.exists() else "does not exist"
        raise UserError(f"{directory}: {stage} output {state}; run `{rerun}` first")
    if manifest.get("stage") != stage:
        raise UserError(f"{directory}: expected a {stage} artifact, found {manifest.get('stage')!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{directory}: written by an incompatible rdro version; re-run `{rerun}` with --force")
    damaged = integrity.files_problem(directory, manifest.get(integrity.FILES_KEY) or {})
    if damaged:
        raise UserError(f"{damaged}; re-run `rdro {stage}` with --force")
    return manifest


def require_finished_model(model_dir: Path) -> None:
    """Refuses `<run>/train/final` (or a checkpoint's model) while its training run is unfinished.

    The final weights are written just before the train manifest; a run killed in between must not
    hand a later stage something that looks like a finished model.
    """
    model_dir = Path(model_dir)
    train_dir = model_dir.parent
    if model_dir.name == "final" and (train_dir / "metrics.jsonl").exists():
        require_input(train_dir, "train", rerun="rdro train --resume")
    elif (read_manifest(model_dir) or {}).get("stage") == "merge":  # checked against its digests
        require_input(model_dir, "merge")


def training_manifest(model_dir: Path) -> dict | None:
    """The manifest of the train run a model directory came from: `<train>/final` itself, or a merge of such an
    adapter (its manifest names the adapter); None for any other model."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    if manifest and manifest.get("stage") == "merge" and manifest.get("adapter"):
        model_dir = Path(manifest["adapter"])
    if model_dir.name != "final":
        return None
    manifest = read_manifest(model_dir.parent)
    return manifest if manifest and manifest.get("stage") == "train" else None


def check_inputs_match(directory: Path, manifest: dict, expected: dict[str, str], *, rerun: str) -> None:
    """Refuses an artifact whose recorded inputs differ from the ones at hand."""
    recorded = manifest.get("inputs", {})
    for name, fingerprint in expected.items():
        if recorded.get(name) != fingerprint:
            raise UserError(f"{directory}: was computed for a different {name} than the one given now; "
                            f"re-run `{rerun}` (with --force to overwrite)")


def is_done(directory: Path, fingerprint: str) -> bool:
    """True when the stage output exists, is complete and was made from the same inputs and config."""
    manifest = read_manifest(directory)
    # a damaged output is not done: the stage rebuilds it
    return manifest is not None and manifest.get("fingerprint") == fingerprint \
        and integrity.artifact_problem(directory) is None
