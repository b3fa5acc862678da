"""Manifests, fingerprints and atomic writes shared by every stage.

A stage directory counts as finished only when its `manifest.json` exists. Outputs are built in a
temporary sibling and renamed into place, so a killed stage never leaves a directory that looks done.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from rdro_cli import integrity
from rdro_cli.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_PACKAGES = ("rdro-cli", "torch", "transformers", "accelerate", "peft", "datasets", "safetensors")


def cache_dir() -> Path:
    """Per-user cache (converted models, file hashes); RDRO_CACHE_DIR overrides."""
    root = os.environ.get("RDRO_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rdro"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint_json(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (stable across runs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_hash_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def hash_file_cached(path: str | Path) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime_ns) so multi-GB weights are read once.

    An in-place rewrite that keeps both size and mtime (within the filesystem's timestamp
    granularity) would not be noticed.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir() / "file_hashes.json"
    cached = _read_hash_cache(cache_file).get(key)
    if isinstance(cached, str):
        return cached
    digest = _hash_file(path)
    try:  # re-read before writing: other ranks may have added entries meanwhile
        cache = _read_hash_cache(cache_file)
        cache[key] = digest
        write_text_atomic(cache_file, json.dumps(cache))
    except OSError:
        pass  # a read-only cache only costs re-hashing next time
    return digest


def fingerprint_files(paths: list[Path]) -> str:
    """Identity of a set of files by their names and content hashes."""
    return fingerprint_json({Path(p).name: hash_file_cached(p) for p in sorted(paths)})


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; a line that is not JSON is a one-line error."""
    rows = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except ValueError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err})") from None
    return rows


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yields a temporary sibling of `final`; on success it replaces `final` in one rename.

    On an exception (or a kill) `final` is untouched and the temporary directory is removed
    (or, after SIGKILL, left under a name no stage accepts).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def clean_stale(final: Path) -> None:
    """Removes temporary siblings left by killed runs (`<name>.tmp-*`, `<name>.old-*`)."""
    final = Path(final)
    if final.parent.exists():
        for stale in final.parent.glob(f"{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in final.parent.glob(f"{final.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
