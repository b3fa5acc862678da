"""Durable writes: fsync of files and directories, atomic file and directory replacement (a killed stage never
leaves a directory that looks done), recovery of the last good artifact after a crash between the two renames
of a replacement, and removal of dead processes' temporary siblings.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path


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
