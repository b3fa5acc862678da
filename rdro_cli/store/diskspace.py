"""Disk full: a write that fails for lack of space becomes one line naming the path and the space needed.

ENOSPC (no space left), EFBIG (file larger than the file-size limit or the filesystem allows) and EDQUOT
(quota) reach us in several shapes: an OSError from Python or pyarrow, a safetensors error whose text
says "os error 28", or a torch RuntimeError whose `__context__` is the OSError of the file object it
wrote to. `is_disk_full` recognises all of them; `writing(path, need)` wraps a stage's write phase so the
message names what was being written and roughly how much room it takes. Stages write into temporary
names (shards, `*.tmp-*` dirs, checkpoints complete only with state.json), so nothing half-written is
ever taken for finished, and the same command continues after space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from rdro_cli.errors import UserError

ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_errno(err: BaseException) -> int | None:
    """ENOSPC / EFBIG / EDQUOT behind `err` (or anything it was raised from), else None."""
    for link in _chain(err):
        if isinstance(link, OSError) and link.errno in ERRNOS:
            return link.errno
        text = str(link).lower()
        for marker, code in (("no space left", errno.ENOSPC), ("os error 28", errno.ENOSPC),
                             ("errno 28", errno.ENOSPC), ("file too large", errno.EFBIG),
                             ("os error 27", errno.EFBIG), ("errno 27", errno.EFBIG),
                             ("quota exceeded", errno.EDQUOT), ("os error 122", errno.EDQUOT),
                             ("errno 122", errno.EDQUOT)):
            if marker in text:
                return code
    return None


def is_disk_full(err: BaseException) -> bool:
    return disk_errno(err) is not None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def path_of(err: BaseException) -> str | None:
    for link in _chain(err):
        if isinstance(link, OSError) and link.filename:
            return str(link.filename)
    return None


def message(path: str | Path, err: BaseException, need: int | None) -> str:
    """One line: what failed where, how much room it takes, how much there is, and what to do."""
    code = disk_errno(err)
    free = shutil.disk_usage(_existing(Path(path))).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code == errno.EFBIG and limit != resource.RLIM_INFINITY:
        reason = f"file too large for this process's file-size limit (ulimit -f: {_size(limit)} per file)"
    elif code == errno.EFBIG:
        reason = "file too large for this filesystem"
    elif code == errno.EDQUOT:
        reason = "disk quota exceeded"
    else:
        reason = "no space left on device"
    needed = f"about {_size(need)} needed" if need else "space needed unknown"
    return (f"{path}: {reason} while writing it ({needed}, {_size(free)} free there); free space or raise the "
            f"limit and re-run the same command: finished work is kept")


@contextlib.contextmanager
def writing(path: str | Path, need: int | Callable[[], int | None] | None = None) -> Iterator[None]:
    """Turns a disk-full failure inside the block into a one-line UserError about `path`.

    `need` is the block's estimated size in bytes (or a function computing it when it fails)."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if not is_disk_full(err):
            raise
        estimate = need() if callable(need) else need
        raise UserError(message(path, err, estimate)) from None


def tree_size(path: str | Path, *, skip_suffixes: tuple[str, ...] = ()) -> int:
    """Bytes of the files under `path` (0 if it does not exist), leaving out names with `skip_suffixes`."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            if name.endswith(skip_suffixes) and skip_suffixes:
                continue
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total
