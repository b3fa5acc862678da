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
import signal
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


def fsync_file(path: Path) -> None:
    """Flushes a file's bytes to stable storage (a rename alone does not order data before metadata)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Makes the entries of a directory (a rename into it, a new file) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some filesystems (and platforms) do not open directories: nothing more can be done
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. EINVAL on filesystems that do not sync directories
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file below `root`, then every directory bottom-up (the SQLite / etcd rule)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(directory) / name)
        fsync_dir(Path(directory))


def fault_point(name: str) -> None:
    """Crash-window tests: SIGKILL this process here when RDRO_FAULT names this point."""
    if os.environ.get("RDRO_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def publish_file(tmp: Path, final: Path) -> None:
    """Renames a fully written `tmp` onto `final` durably: data first, then the name, then the directory."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
    """Yields a temporary sibling of `final`; on success it replaces `final` durably.

    Every file is fsynced before the rename and the parent directory after it. Replacing an existing
    artifact takes two renames (`final -> <name>.old-<pid>`, `tmp -> final`): in between, the old artifact
    is complete under its `.old-` name, and `recover` (run by every stage before it looks at an output)
    puts it back. On an exception `final` is untouched and the temporary directory is removed (after
    SIGKILL it is left under a name no stage accepts, and removed once its process is gone).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        fsync_dir(final.parent)
        fault_point("replace-between-renames")
        os.replace(tmp, final)
        fault_point("publish-before-dir-fsync")
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        fault_point("publish-before-dir-fsync")
        fsync_dir(final.parent)


def _owner_pid(path: Path) -> int | None:
    """The process id in a `<name>.tmp-<pid>` / `<name>.old-<pid>` sibling's name, if it has one."""
    suffix = path.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


def recover(final: Path) -> Path | None:
    """Restores `final` from a `<name>.old-<pid>` left by a crash between the two renames of a replacement.

    Returns the restored path, or None. The newest `.old-` sibling of a dead process is the last good artifact.
    """
    final = Path(final)
    if final.exists() or not final.parent.is_dir():
        return None
    olds = [p for p in final.parent.glob(f"{final.name}.old-*")
            if p.is_dir() and not pid_alive(_owner_pid(p) or -1)]
    if not olds:
        return None
    newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
    os.replace(newest, final)
    fsync_dir(final.parent)
    return final


def clean_stale(final: Path) -> None:
    """Removes temporary siblings (`<name>.tmp-<pid>`, `<name>.old-<pid>`) of processes no longer alive.

    A live process's temporary directory is never touched, and an orphaned `.old-` is restored first
    (it may be the only complete copy).
    """
    final = Path(final)
    if not final.parent.exists():
        return
    recover(final)
    for pattern in (f"{final.name}.tmp-*", f"{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            pid = _owner_pid(stale)
            if pid is not None and pid != os.getpid() and not pid_alive(pid):
                shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------- one writer

_HELD_LOCKS: dict[str, int] = {}  # lock file -> open descriptor holding the flock, for this process


def lock_path(out: Path) -> Path:
    """The lock of an output lives beside it: the output itself is replaced by a rename."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def _lock_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def acquire_lock(out: Path, stage: str) -> None:
    """Takes the exclusive advisory lock on `out` for this process (until `release_locks` or exit).

    Re-entrant within one process; a second process gets a one-line error naming the holder. The lock file
    is removed on release (so a refused or finished command leaves nothing behind); a holder checks after
    locking that the file it locked is still the one at the path, so removal cannot let two processes in.
    """
    import fcntl

    path = lock_path(out)
    key = str(path.parent.resolve() / path.name)
    if key in _HELD_LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _lock_holder(path)
            who = f"`rdro {holder.get('stage', '?')}` (pid {holder.get('pid', '?')}, since {holder.get('since', '?')})"
            raise UserError(f"{out}: in use by {who}; wait for it to finish, or stop it "
                            f"(kill {holder.get('pid', '<pid>')}) and re-run this command") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it between our open and our lock: try the new one
    body = json.dumps({"pid": os.getpid(), "stage": stage,
                       "since": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, body.encode(), 0)
    _HELD_LOCKS[key] = fd


def _release(key: str) -> None:
    import fcntl

    fd = _HELD_LOCKS.pop(key)
    with contextlib.suppress(OSError):
        os.unlink(key)  # while still holding it: a waiting process then re-opens the path (see acquire_lock)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def release_locks() -> None:
    """Releases every output lock this process holds (the CLI calls it when a command ends)."""
    for key in list(_HELD_LOCKS):
        _release(key)
