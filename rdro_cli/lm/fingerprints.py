"""Model and tokenizer fingerprints: what decides their outputs (config and weight digests; the tokenizer's
vocabulary, special tokens and template), so stages can refuse artifacts made with another model by content,
not by name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rdro_cli.errors import UserError
from rdro_cli.lm.loading import CONFIG_FILES, PICKLE_WEIGHT_PATTERNS, load_error_message, require_reachable
from rdro_cli.store import digests


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer's behaviour: its serialised backend (or vocab) and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return digests.fingerprint_json({"tokenizer": identity, "special": tokenizer.special_tokens_map})


def model_fingerprint(name_or_path: str | os.PathLike, *, revision: str | None = None) -> str:
    """sha256 hex over config.json (and adapter_config.json) content and the weight files' sha256.

    Weight files are the top-level ``*.safetensors`` (pickle files only when there are none). A hub id is
    resolved to its local snapshot (downloading config and weights unless offline). File hashes are cached
    by (path, size, mtime_ns), see :func:`rdro_cli.store.digests.hash_file_cached`.
    """
    directory = _model_dir(str(name_or_path), revision)
    configs = [directory / n for n in CONFIG_FILES if (directory / n).is_file()]
    if not configs:
        raise UserError(f"no config.json in model directory {str(directory)!r}")
    weights = _weight_files(directory)
    if not weights:
        raise UserError(f"no weight files (*.safetensors) in model directory {str(directory)!r}")
    identity = {
        "configs": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in configs},
        "weights": {p.name: digests.hash_file_cached(p) for p in weights},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        files = sorted({p for pattern in PICKLE_WEIGHT_PATTERNS for p in directory.glob(pattern)})
    return [p for p in files if p.is_file()]


def _model_dir(name: str, revision: str | None) -> Path:
    require_reachable(name)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(
            snapshot_download(
                name,
                revision=revision,
                allow_patterns=[*CONFIG_FILES, "*.safetensors", "*.safetensors.index.json"],
            )
        )
        if not any(snapshot.glob("*.safetensors")):
            snapshot = Path(
                snapshot_download(
                    name, revision=revision, allow_patterns=[*CONFIG_FILES, *PICKLE_WEIGHT_PATTERNS]
                )
            )
    except OSError as exc:
        raise UserError(load_error_message("model", name, exc)) from exc
    return snapshot


def require_tokenizer(tokenizer, expected: str | None, *, model: str, data: Path | str) -> None:
    """Token ids in `data` only mean something under the tokenizer `prepare` used (`expected`)."""
    if expected and tokenizer_fingerprint(tokenizer) != expected:
        raise UserError(f"{data} was tokenised with a different tokenizer than {model}'s; re-run "
                        f"`rdro prepare --model {model}` (into another run dir) or pass the matching model")
