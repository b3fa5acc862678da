"""Content digests of files and JSON objects, with one cache for both kinds of file digest.

Two digests are in use: xxh3-128 (`ALGORITHM`) for what manifests and checkpoints record of the files a
stage published (store.integrity), and sha256 for model and task-file fingerprints (`hash_file_cached`,
`fingerprint_files`; lm.fingerprints). Both go through `digest_cached`, cached by (device, inode, size,
mtime_ns) in memory and in `<cache_dir>/file_digests.json`: a rename (how every artifact is published) keeps
all four, so a multi-GB file is hashed once, when it is written, and every later check is a `stat`. Writing
a file changes its mtime, so an in-place change is re-hashed; a change that restores both size and mtime to
the nanosecond (deliberately, e.g. `touch -d`) would not be noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import xxhash

ALGORITHM = "xxh3_128"
_CACHE_FILE = "file_digests.json"
_CACHE_LIMIT = 20000
_memo: dict[str, str] = {}


def cache_dir() -> Path:
    """Per-user cache (converted models, file digests, forward costs); RDRO_CACHE_DIR overrides."""
    root = os.environ.get("RDRO_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rdro"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint_json(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (stable across runs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _hasher(algorithm: str):
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r}")


def digest_file(path: str | Path, algorithm: str = ALGORITHM) -> str:
    """`<algorithm>:<hex>` of a file's bytes, read in 8 MiB blocks (no caching)."""
    digest = _hasher(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return f"{algorithm}:{digest.hexdigest()}"


def _cache_path() -> Path:
    return cache_dir() / _CACHE_FILE


def _read_cache() -> dict:
    try:
        cache = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(key: str, value: str) -> None:
    try:  # re-read first: other processes may have added entries meanwhile
        cache = _read_cache()
        cache[key] = value
        if len(cache) > _CACHE_LIMIT:  # oldest first (dicts keep insertion order)
            cache = dict(list(cache.items())[-_CACHE_LIMIT:])
        path = _cache_path()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full cache dir only costs hashing again next time


def digest_cached(path: str | Path, algorithm: str = ALGORITHM) -> str:
    """digest_file, cached by (device, inode, size, mtime_ns) in memory and in the user cache dir."""
    stat = os.stat(path)
    key = f"{algorithm}|{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}"
    if key in _memo:
        return _memo[key]
    cached = _read_cache().get(key)
    if not isinstance(cached, str):
        cached = digest_file(path, algorithm)
        _write_cache(key, cached)
    _memo[key] = cached
    return cached


def hash_file_cached(path: str | Path) -> str:
    """sha256 hex of a file's bytes (what model fingerprints are made of), through the one digest cache."""
    return digest_cached(path, "sha256").split(":", 1)[1]


def fingerprint_files(paths: list[Path]) -> str:
    """Identity of a set of files by their names and content hashes."""
    return fingerprint_json({Path(p).name: hash_file_cached(p) for p in sorted(paths)})
