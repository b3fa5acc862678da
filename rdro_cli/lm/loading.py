"""Loading models and tokenizers: hub ids (offline: a clear one-line error) or local directories, safetensors
only unless `model.allow_pickle`, the recipe's chat template, and the dtype for the device.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import torch
from torch import nn

from rdro_cli.errors import UserError

PICKLE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
ADAPTER_CONFIG = "adapter_config.json"
CONFIG_FILES = ("config.json", ADAPTER_CONFIG)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def load_tokenizer(
    name_or_path: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False
):
    """``AutoTokenizer.from_pretrained`` with one-line errors for missing directories and unreachable hub ids."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    require_reachable(name, TOKENIZER_FILES)
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UserError(load_error_message("tokenizer", name, exc)) from exc


def recipe_tokenizer(cfg):
    """The tokenizer of `model.name` with the recipe's `model.chat_template` (prepare renders with it; train
    saves it with the trained model)."""
    if not cfg.model.name:
        raise UserError("no tokenizer: pass --model (a hub id or local dir) or set model.name")
    tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision or None,
                               trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.chat_template:
        tokenizer.chat_template = resolve_chat_template(cfg.model.chat_template)
    return tokenizer


def resolve_chat_template(value: str) -> str:
    """`model.chat_template` -> the Jinja text: a file's content, or the value itself when it is template
    text (it holds `{{` or `{%`). Anything else names a file that does not exist: a one-line error, rather
    than a path silently used as the template."""
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8-sig")
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:  # template text too long to be a name is not a file
            raise UserError(f"model.chat_template: cannot read {path} ({err})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"model.chat_template: cannot read {path} ({err})") from None
    except ValueError:  # a template text too long or odd to be a path
        pass
    if "{{" in value or "{%" in value:
        return value
    raise UserError(f"model.chat_template: {value!r} is neither an existing file nor Jinja template text "
                    f"(no '{{{{' or '{{%'); check the path")


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> nn.Module:
    """A transformers causal LM, in eval mode, safetensors weights only unless ``allow_pickle``.

    ``dtype``: "auto" (bfloat16 when the target device — ``device``, or CUDA if available when ``device`` is
    None — is CUDA; float32 otherwise), "float32", "bfloat16" or "float16". Moved to ``device`` if given.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rdro draws its own progress; a per-load bar is noise in logs
    name = str(name_or_path)
    torch_dtype = _resolve_dtype(dtype, device)
    require_reachable(name, ("config.json",))
    local = Path(name).expanduser()
    if local.is_dir() and not allow_pickle and not any(local.glob("*.safetensors")):
        if any(p for pattern in PICKLE_WEIGHT_PATTERNS for p in local.glob(pattern)):
            raise UserError(
                f"model {name!r} has only pickle weights (.bin/.pt), which can run code when loaded; convert them "
                "to safetensors or set model.allow_pickle = true if you trust the files"
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(local) if local.is_dir() else name,
            dtype=torch_dtype,
            revision=revision,
            trust_remote_code=trust_remote_code,
            # True: safetensors or fail; None: prefer safetensors, fall back to pickle files.
            use_safetensors=None if allow_pickle else True,
        )
    except OSError as exc:
        raise UserError(load_error_message("model", name, exc)) from exc
    if device is not None:
        model.to(device)
    return model.eval()


def _resolve_dtype(dtype: str, device) -> torch.dtype:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_cuda else torch.float32
    if dtype not in names:
        raise UserError(f"unknown model dtype {dtype!r}; use one of: auto, {', '.join(names)}")
    return names[dtype]


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in {
        "1",
        "true",
        "yes",
    }


def require_reachable(name: str, needs: tuple[str, ...] = ()) -> None:
    """A local directory that holds one of `needs`, or a name that can be a hub id; else a one-line error."""
    path = Path(name).expanduser()
    if path.is_dir():
        if needs and not any((path / f).is_file() for f in needs):
            raise UserError(f"{name}: not a model directory (none of {', '.join(needs)}); pass the directory "
                            f"a model was saved to with save_pretrained, or a hub id")
        return
    if path.exists():
        raise UserError(f"model path {name!r} is a file; pass the directory that holds config.json")
    if not _HUB_ID.match(name):
        raise UserError(f"model directory {name!r} does not exist")


def load_error_message(what: str, name: str, exc: BaseException) -> str:
    reason = " ".join(str(exc).split())[:300]
    if Path(name).expanduser().is_dir():
        return f"cannot load {what} from {name!r}: {reason}"
    where = (
        "HF_HUB_OFFLINE=1 is set" if _hub_offline() else "the Hub could not be reached or has no such files"
    )
    return (
        f"cannot load {what} {name!r} from the Hugging Face Hub ({where}; no local directory of that name "
        f"exists either): pass a local directory with the model files instead ({reason})"
    )


def device_of(model) -> torch.device:
    """The device a loaded model's (first) parameters sit on."""
    return next(model.parameters()).device
