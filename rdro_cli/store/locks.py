"""One writer per output: an advisory lock beside each output directory, named after its holder (PID, stage,
since), removed on release.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from pathlib import Path

from rdro_cli.errors import UserError

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
