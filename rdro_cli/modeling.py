"""Loading models and tokenizers, and the chunked completion log-prob head shared by logprobs, train and eval.

The number every stage needs is docs/design.md §1's ``s = Σ_t log π(y_t | x, y_<t)`` over completion tokens.
``completion_logps`` computes it without a ``[batch, seq, vocab]`` tensor: it runs the transformer body,
keeps the hidden states only at the N positions that predict completion tokens, and applies the LM head to
``chunk_size`` of them at a time (log-softmax in float32 per chunk). With gradients it goes through
``_ChunkedHeadLogps``, whose backward recomputes each chunk's logits, so training memory stays
O(chunk_size × vocab) instead of O(N × vocab).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import random
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from rdro_cli import artifacts
from rdro_cli.errors import UserError

PICKLE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
ADAPTER_CONFIG = "adapter_config.json"
CONFIG_FILES = ("config.json", ADAPTER_CONFIG)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# ---------------------------------------------------------------------------------------------------------
# Chunked completion log-probs


def completion_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-row ``Σ_t log π(y_t | prefix)`` over completion tokens, as a float32 tensor of shape ``[batch]``.

    ``completion_mask[b, t]`` is True where token t of row b is a completion token (``t >= completion_start``
    and not padding); it must be False in column 0, which no position predicts. ``model`` is a transformers
    causal LM, optionally peft-wrapped (LoRA). Differentiable with respect to the body and the head
    (recomputing each chunk's logits in backward); under ``no_grad``/``inference_mode`` it is a plain loop.

    Under DDP/FSDP do not pass the wrapped model: wrap the policy in :class:`CompletionLogps` first and let
    the launcher wrap that, so the wrapper's forward (which syncs gradients / gathers shards) runs.
    """
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(input_ids)
    return _completion_logps(model, input_ids, attention_mask, None, completion_mask, rows, input_ids.shape[0],
                             chunk_size)


def packed_completion_logps(model: nn.Module, packed: PackedBatch, *, chunk_size: int = 1024) -> torch.Tensor:
    """:func:`completion_logps` of the rows packed in `packed` (see :func:`pack`), in their order, ``[rows]``.

    The body sees one row, no attention mask and ``position_ids`` that restart at 0 for every packed row;
    transformers turns that into per-row causal attention (flash-attention's varlen kernels, or a
    block-diagonal mask for sdpa/eager), so each row attends to itself only, at its own positions: the same
    computation as the padded path without a single padded position. Checked once per model against the
    padded path (:func:`_check_packing_is_exact`).
    """
    _check_packing_is_exact(model, packed, chunk_size)
    return _completion_logps(model, packed.input_ids, None, packed.position_ids, packed.completion_mask,
                             packed.row_index.unsqueeze(0), packed.rows, chunk_size)


def _completion_logps(model, input_ids, attention_mask, position_ids, completion_mask, row_index, rows,
                      chunk_size) -> torch.Tensor:
    """Shared by the padded and the packed path: ``row_index[b, t]`` is the output row of token (b, t)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    causal_lm = _causal_lm(model)
    body, head = _body_and_head(causal_lm)
    scale, softcap = _logit_transform(causal_lm)
    completion_mask = completion_mask.to(device=input_ids.device, dtype=torch.bool)
    if bool(completion_mask[:, 0].any()):
        raise ValueError("completion_mask is True at position 0; completion_start must be >= 1")
    if attention_mask is not None:
        _check_head_reproduces_model(causal_lm, body, head, scale, softcap, input_ids, attention_mask)

    hidden = _last_hidden_state(body, input_ids, attention_mask, position_ids)
    # position t-1 predicts completion token t; in a packed row the last token of one row "predicts" the
    # first of the next, which is never a completion token (completion_start >= 1), so rows never mix
    predicts = completion_mask[:, 1:]
    hidden = hidden[:, :-1][predicts]  # [N, hidden]
    targets = input_ids[:, 1:][predicts]
    row_of = row_index[:, 1:][predicts]

    if _is_plain_linear(head):
        weight, bias = head.weight, head.bias
        hidden = hidden.to(weight.dtype)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias)
        )
        if needs_grad:
            token_logps = _ChunkedHeadLogps.apply(hidden, weight, bias, targets, chunk_size, scale, softcap)
        else:
            token_logps = _chunked_logps_loop(hidden, weight, bias, targets, chunk_size, scale, softcap)
    else:
        token_logps = _module_head_logps(head, hidden, targets, chunk_size, scale, softcap)

    sums = torch.zeros(rows, dtype=torch.float32, device=input_ids.device)
    return sums.index_add(0, row_of, token_logps)


class CompletionLogps(nn.Module):
    """``forward(input_ids, attention_mask, completion_mask) -> [batch]`` completion log-prob sums.

    Wrap the policy in this before ``accelerator.prepare`` so DDP/FSDP/DeepSpeed see one forward that
    contains the whole computation (calling the body of a DDP-wrapped model directly would skip the
    gradient sync).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, *batch):
        """``(input_ids, attention_mask, completion_mask)``, one list of such triples (length groups), whose
        results are concatenated in order, or one :class:`PackedBatch`: one forward call each way, as
        DDP/FSDP need."""
        if len(batch) == 1 and isinstance(batch[0], PackedBatch):
            return packed_completion_logps(self.model, batch[0], chunk_size=self.chunk_size)
        if len(batch) == 1:
            return torch.cat([completion_logps(self.model, *group, chunk_size=self.chunk_size) for group in batch[0]])
        return completion_logps(self.model, *batch, chunk_size=self.chunk_size)


class _ChunkedHeadLogps(torch.autograd.Function):
    """log_softmax(transform(hidden @ weightᵀ + bias))[target] per row, recomputing logits in backward.

    Saves only hidden [N, H], weight, bias and targets. d logp / d z = onehot(target) − softmax(z), then the
    chain rule through the logit transform ``z = cap·tanh(scale·l / cap)`` (or ``z = scale·l``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, softcap):
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size, ctx.scale, ctx.softcap = chunk_size, scale, softcap
        return _chunked_logps_loop(hidden, weight, bias, targets, chunk_size, scale, softcap)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        chunk, scale, softcap = ctx.chunk_size, ctx.scale, ctx.softcap
        n = hidden.shape[0]
        grad_out = grad_out.float()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulate head gradients in float32 across chunks: bf16 accumulation would drop small updates.
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        )
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            g_out = grad_out[start : start + chunk]
            z = _chunk_logits(h, weight, bias).float()
            dz_dl = None
            if softcap is not None:
                z = torch.tanh(z * (scale / softcap)) * softcap
                dz_dl = (1.0 - (z / softcap).square()) * scale
            elif scale != 1.0:
                z = z * scale
            # z becomes softmax(z), then the gradient wrt z, in place: one [chunk, vocab] float32 buffer.
            g = torch.softmax(z, dim=-1)
            del z
            g.mul_(-g_out.unsqueeze(1))
            g[torch.arange(t.shape[0], device=t.device), t] += g_out
            if dz_dl is not None:
                g.mul_(dz_dl)
                del dz_dl
            elif scale != 1.0:
                g.mul_(scale)
            g = g.to(hidden.dtype)
            if need_hidden:
                torch.matmul(g, weight, out=grad_hidden[start : start + chunk])
            if need_weight:
                grad_weight.add_(g.t() @ h)
            if need_bias:
                grad_bias.add_(g.sum(0, dtype=torch.float32))
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _chunk_logits(
    hidden_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The head's matmul for one chunk, in the model dtype. Every head application goes through here."""
    return F.linear(hidden_chunk, weight, bias)


def _transform_logits(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    z = logits.float()
    if softcap is not None:
        return torch.tanh(z * (scale / softcap)) * softcap
    return z * scale if scale != 1.0 else z


def _target_logps(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return z.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=-1)


def _chunked_logps_loop(hidden, weight, bias, targets, chunk_size, scale, softcap) -> torch.Tensor:
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = _chunk_logits(hidden[start : start + chunk_size], weight, bias)
        z = _transform_logits(logits, scale, softcap)
        out[start : start + chunk_size] = _target_logps(z, targets[start : start + chunk_size])
    return out


def _module_head_chunk(head: nn.Module, hidden_chunk, targets_chunk, scale, softcap) -> torch.Tensor:
    return _target_logps(_transform_logits(head(hidden_chunk), scale, softcap), targets_chunk)


def _module_head_logps(head: nn.Module, hidden, targets, chunk_size, scale, softcap) -> torch.Tensor:
    """Fallback for heads that are not a plain ``nn.Linear`` (peft-wrapped lm_head, quantized or sharded
    heads): call the module per chunk, with activation checkpointing so backward recomputes the logits."""
    parts = []
    use_checkpoint = torch.is_grad_enabled()
    for start in range(0, hidden.shape[0], chunk_size):
        args = (head, hidden[start : start + chunk_size], targets[start : start + chunk_size], scale, softcap)
        if use_checkpoint:
            parts.append(checkpoint(_module_head_chunk, *args, use_reentrant=False))
        else:
            parts.append(_module_head_chunk(*args))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts)


def _is_plain_linear(head: nn.Module) -> bool:
    # Anything else (peft LoRA/modules_to_save wrappers, bnb layers, DeepSpeed ZeRO-3 placeholders, DTensor
    # shards) has to be called as a module to be correct.
    weight = getattr(head, "weight", None)
    return (
        type(head) is nn.Linear
        and isinstance(weight, torch.Tensor)
        and weight.numel() > 0
        and not hasattr(weight, "ds_id")
        and type(weight.data) is torch.Tensor
    )


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model`` (peft wrappers and torch.compile are looked through)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, nn.DataParallel)) or type(model).__name__ in {
        "FullyShardedDataParallel",
        "DeepSpeedEngine",
    }:
        raise ValueError(
            "completion_logps got a DDP/FSDP/DeepSpeed-wrapped model; wrap the policy in "
            "modeling.CompletionLogps before accelerator.prepare and call that instead"
        )
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
        if model.active_peft_config.is_prompt_learning:
            raise ValueError("prompt-learning peft adapters are not supported by completion_logps")
        model = model.get_base_model()
    return model


def _body_and_head(causal_lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(causal_lm).__name__} has no output embeddings (LM head)")
    body = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    if body is None or body is causal_lm:
        raise ValueError(f"cannot find the transformer body of {type(causal_lm).__name__}")
    return body, head


def _logit_transform(causal_lm: nn.Module) -> tuple[float, float | None]:
    """(scale, softcap) applied after the head matmul: Cohere's ``logit_scale``, Granite's ``logits_scaling``,
    Gemma's ``final_logit_softcapping``. Anything else is caught by ``_check_head_reproduces_model``."""
    config = causal_lm.config
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


# Every batch here has a new shape (length-sorted and length-grouped rows). On Hopper, PyTorch's cuDNN
# attention builds a plan per new shape: measured on an H100 (torch 2.11, 0.5B model, batch 8), training
# steps took 0.3-2.8 s with it and 0.18-0.36 s without. Flash / memory-efficient attention have no such cost.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _last_hidden_state(body: nn.Module, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    scope = sdpa_kernel(_SDPA_BACKENDS) if input_ids.is_cuda else contextlib.nullcontext()
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    with scope:
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _check_head_reproduces_model(causal_lm, body, head, scale, softcap, input_ids, attention_mask) -> None:
    """Once per model: our body→head→transform must reproduce the model's own logits on a few tokens.

    An architecture whose causal-LM forward does something else after the body (an extra scaling, a second
    norm) would otherwise give silently wrong log-probs.
    """
    if _HEAD_CHECKED.get(causal_lm):
        return
    n = int(min(16, input_ids.shape[1]))
    ids, mask = input_ids[:1, :n], attention_mask[:1, :n]
    training = {m: m.training for m in causal_lm.modules()}
    causal_lm.eval()  # dropout would make the two forwards differ
    try:
        expected = causal_lm(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        got = _transform_logits(head(_last_hidden_state(body, ids, mask)), scale, softcap)
    finally:
        for module, flag in training.items():
            module.training = flag
    keep = mask[0].bool()
    got, expected = got[0][keep], expected[0][keep]
    # NaN/inf logits (fp16 overflow, damaged weights) are not a head mismatch when both paths agree on where
    # they are: the stages refuse non-finite results themselves, naming the rows and the likely cause.
    finite = torch.isfinite(expected)
    same_pattern = torch.equal(finite, torch.isfinite(got))
    err = (got[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    tol = 1e-4 + 2e-2 * expected[finite].abs().max().item() if finite.any() else 0.0
    if not (same_pattern and err <= tol):
        model_type = getattr(causal_lm.config, "model_type", type(causal_lm).__name__)
        raise UserError(
            f"model type {model_type!r} is not supported yet: its causal-LM forward transforms the logits in a "
            f"way rdro's chunked head does not reproduce (max logit difference {err:.3g})"
        )
    _HEAD_CHECKED[causal_lm] = True


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(
    name_or_path: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False
):
    """``AutoTokenizer.from_pretrained`` with one-line errors for missing directories and unreachable hub ids."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    _require_reachable(name, TOKENIZER_FILES)
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UserError(_load_error_message("tokenizer", name, exc)) from exc


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


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer's behaviour: its serialised backend (or vocab) and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return artifacts.fingerprint_json({"tokenizer": identity, "special": tokenizer.special_tokens_map})


def require_tokenizer(tokenizer, expected: str | None, *, model: str, data: Path | str) -> None:
    """Token ids in `data` only mean something under the tokenizer `prepare` used (`expected`)."""
    if expected and tokenizer_fingerprint(tokenizer) != expected:
        raise UserError(f"{data} was tokenised with a different tokenizer than {model}'s; re-run "
                        f"`rdro prepare --model {model}` (into another run dir) or pass the matching model")


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
    _require_reachable(name, ("config.json",))
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
        raise UserError(_load_error_message("model", name, exc)) from exc
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


def _require_reachable(name: str, needs: tuple[str, ...] = ()) -> None:
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


def _load_error_message(what: str, name: str, exc: BaseException) -> str:
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


# ---------------------------------------------------------------------------------------------------------
# Fingerprints


def model_fingerprint(name_or_path: str | os.PathLike, *, revision: str | None = None) -> str:
    """sha256 hex over config.json (and adapter_config.json) content and the weight files' sha256.

    Weight files are the top-level ``*.safetensors`` (pickle files only when there are none). A hub id is
    resolved to its local snapshot (downloading config and weights unless offline). File hashes are cached
    by (path, size, mtime_ns), see :func:`rdro_cli.artifacts.hash_file_cached`.
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
        "weights": {p.name: artifacts.hash_file_cached(p) for p in weights},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        files = sorted({p for pattern in PICKLE_WEIGHT_PATTERNS for p in directory.glob(pattern)})
    return [p for p in files if p.is_file()]


def _model_dir(name: str, revision: str | None) -> Path:
    _require_reachable(name)
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
        raise UserError(_load_error_message("model", name, exc)) from exc
    return snapshot


# ---------------------------------------------------------------------------------------------------------
# Batching


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int, *, shuffle: bool = False, seed: int = 0
) -> list[list[int]]:
    """Row indices grouped so that rows × longest row <= ``max_tokens`` (padding included).

    Rows are sorted by length, longest first (ties by index), and packed greedily; a row longer than the
    budget gets a batch of its own. ``shuffle`` permutes the order of the batches (not their contents) with
    ``seed``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    for i in order:
        # Sorted descending, so a batch's first row is its longest.
        if batches and (len(batches[-1]) + 1) * max(int(lengths[batches[-1][0]]), 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches


def length_groups(lengths: Sequence[int], *, max_tokens: int, group_cost: float = 512) -> list[list[int]]:
    """Row indices split into groups of similar length that minimise padded tokens + ``group_cost`` per group.

    Rows are sorted longest first; an exact dynamic programme over the cut points picks the groups
    (each costs rows × its longest row in padded tokens, plus ``group_cost`` for the extra forward pass),
    with at most ``max_tokens`` padded tokens per group unless a single row is longer. The result is the
    same computation on far fewer padded positions than one batch padded to its longest row. Training passes
    the device's measured ``group_cost`` (``rdro_cli.throughput``): large on a GPU, where it collapses most
    micro-batches to one forward, small on a CPU.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    longest = [max(int(lengths[i]), 1) for i in order]
    n = len(order)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end - 1, -1, -1):  # group = order[start:end]; its longest row is order[start]
            tokens = (end - start) * longest[start]
            if tokens > max_tokens and end - start > 1:
                break  # earlier starts only add rows to the group
            cost = best[start] + tokens + group_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def collate(
    rows_input_ids: Sequence[Sequence[int]], completion_starts: Sequence[int], pad_id: int, *, bucket: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids long, attention_mask long 0/1, completion_mask bool)``, each ``[rows, longest]``
    (``[rows, bucket_length(longest)]`` with `bucket`, so that a compiled body sees few distinct shapes).

    ``completion_mask[b, t]`` is True for ``completion_starts[b] <= t < len(row b)``.
    """
    if len(rows_input_ids) != len(completion_starts):
        raise ValueError("rows_input_ids and completion_starts differ in length")
    width = max((len(r) for r in rows_input_ids), default=0)
    if bucket and width:
        width = bucket_length(width)
    input_ids = torch.full((len(rows_input_ids), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows_input_ids), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows_input_ids), width), dtype=torch.bool)
    for b, (row, start) in enumerate(zip(rows_input_ids, completion_starts, strict=True)):
        if not 1 <= start < len(row):
            raise ValueError(f"row {b}: completion_start {start} outside [1, {len(row)})")
        input_ids[b, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        attention_mask[b, : len(row)] = 1
        completion_mask[b, start : len(row)] = True
    return input_ids, attention_mask, completion_mask


def mismatched_ids(
    prompt_ids_row: Sequence[int], completion_ids_row: Sequence[int], max_length: int
) -> tuple[list[int], int]:
    """KTO's mismatched pair: prompt of row i + completion of row j, as ``(ids, completion_start)``.

    The completion loses its end to fit ``max_length``. If the prompt alone leaves no room, the prompt keeps
    its last ``max_length - 1`` tokens so that one completion token remains.
    """
    if not completion_ids_row:
        raise ValueError("mismatched_ids: empty completion")
    if not prompt_ids_row:
        raise ValueError("mismatched_ids: empty prompt")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    prompt = list(prompt_ids_row)[-(max_length - 1) :]
    completion = list(completion_ids_row)[: max_length - len(prompt)]
    return prompt + completion, len(prompt)


def bucket_length(n: int, *, smallest: int = 16) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, ... (2^k and 1.5·2^k) that is >= n: at most a third of a
    bucketed batch is padding, and lengths up to 8192 fall in 19 buckets."""
    size = smallest
    while True:
        if size >= n:
            return size
        if size * 3 // 2 >= n:
            return size * 3 // 2
        size *= 2


# ---------------------------------------------------------------------------------------------------------
# Packing: a micro-batch as one row without padding


@dataclass
class PackedBatch:
    """Rows concatenated into one: ``input_ids``, ``position_ids`` (0, 1, ... restarting per row) and
    ``completion_mask``, each ``[1, T]``; ``row_index[t]`` is the row of token t (``rows`` for a padding
    segment, see :func:`pack`); ``cu_seqlens`` ``[segments + 1]`` int32 the row boundaries as flash-attention's
    varlen kernels take them; ``tokens`` the real tokens."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    completion_mask: torch.Tensor
    row_index: torch.Tensor
    cu_seqlens: torch.Tensor
    rows: int
    tokens: int

    def to(self, device) -> PackedBatch:
        moved = {name: getattr(self, name).to(device) for name in
                 ("input_ids", "position_ids", "completion_mask", "row_index", "cu_seqlens")}
        return PackedBatch(**moved, rows=self.rows, tokens=self.tokens)


def pack(rows_input_ids: Sequence[Sequence[int]], completion_starts: Sequence[int], pad_id: int, *,
         bucket: bool = False) -> PackedBatch:
    """The rows one after another in a single row. With `bucket`, a padding segment (its own positions from
    0, its own row index ``rows``, never a completion) fills the row up to ``bucket_length(T)``; it attends
    only to itself and its results are dropped."""
    if len(rows_input_ids) != len(completion_starts):
        raise ValueError("rows_input_ids and completion_starts differ in length")
    ids, positions, completion, row_index, bounds = [], [], [], [], [0]
    for b, (row, start) in enumerate(zip(rows_input_ids, completion_starts, strict=True)):
        if not 1 <= start < len(row):
            raise ValueError(f"row {b}: completion_start {start} outside [1, {len(row)})")
        ids += list(row)
        positions += range(len(row))
        completion += [False] * start + [True] * (len(row) - start)
        row_index += [b] * len(row)
        bounds.append(bounds[-1] + len(row))
    tokens = len(ids)
    if bucket and tokens:
        extra = bucket_length(tokens) - tokens
        if extra:
            ids += [int(pad_id)] * extra
            positions += range(extra)
            completion += [False] * extra
            row_index += [len(rows_input_ids)] * extra
            bounds.append(bounds[-1] + extra)
    return PackedBatch(input_ids=torch.tensor([ids], dtype=torch.long),
                       position_ids=torch.tensor([positions], dtype=torch.long),
                       completion_mask=torch.tensor([completion], dtype=torch.bool),
                       row_index=torch.tensor(row_index, dtype=torch.long),
                       cu_seqlens=torch.tensor(bounds, dtype=torch.int32), rows=len(rows_input_ids), tokens=tokens)


def batch_tokens(batch) -> torch.Tensor | int:
    """Real (unpadded) tokens of a :class:`PackedBatch` or of a list of collated length groups."""
    if isinstance(batch, PackedBatch):
        return torch.tensor(batch.tokens, device=batch.input_ids.device)  # summed with on-device losses
    return sum(attention_mask.sum() for _, attention_mask, _ in batch)


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def attention_implementation(model: nn.Module) -> str:
    return str(getattr(_causal_lm(model).config, "_attn_implementation", None) or "eager")


def packing_supported() -> bool:
    """transformers builds per-row causal attention from restarting ``position_ids`` (masking_utils' packed
    sequence detection; the flash-attention integration derives cu_seqlens from them the same way)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def use_packing(setting: str, model: nn.Module) -> bool:
    """``train.packing``: "off"; "on" (any attention implementation: with sdpa/eager the block-diagonal mask
    is exact but dense, T² for the whole packed row); "auto" = on only with a varlen flash-attention kernel,
    where packing costs no attention work at all and saves every padded position."""
    if setting == "off":
        return False
    if not packing_supported():
        if setting == "on":
            import transformers

            raise UserError(f"train.packing = on needs transformers' packed-sequence masks (masking_utils), "
                            f"which transformers {transformers.__version__} lacks; set train.packing = auto or off")
        return False
    return setting == "on" or attention_implementation(model) in VARLEN_ATTENTION


_PACKING_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _check_packing_is_exact(model, packed: PackedBatch, chunk_size: int) -> None:
    """Once per model: the packed path must reproduce the padded path's per-row log-probs on two short rows
    (an architecture that builds its attention mask without looking at position_ids would mix rows)."""
    causal_lm = _causal_lm(model)
    if _PACKING_CHECKED.get(causal_lm):
        return
    ids = packed.input_ids[0, : packed.tokens].tolist()
    ids = (ids * 20)[:20]
    rows, starts = [ids[:12], ids[12:]], [5, 3]
    device = packed.input_ids.device
    training = {m: m.training for m in causal_lm.modules()}
    causal_lm.eval()  # dropout would make the two forwards differ
    try:
        padded = completion_logps(model, *(t.to(device) for t in collate(rows, starts, 0)), chunk_size=chunk_size)
        check = pack(rows, starts, 0).to(device)
        got = _completion_logps(model, check.input_ids, None, check.position_ids, check.completion_mask,
                                check.row_index.unsqueeze(0), check.rows, chunk_size)
    finally:
        for module, flag in training.items():
            module.training = flag
    low_precision = next(causal_lm.parameters()).dtype in (torch.bfloat16, torch.float16)
    tol = (3e-2 if low_precision else 1e-4) * max(1.0, padded.abs().max().item())
    err = (got - padded).abs().max().item()
    if not err <= tol:
        model_type = getattr(causal_lm.config, "model_type", type(causal_lm).__name__)
        raise UserError(f"train.packing: packed rows of model type {model_type!r} do not reproduce the padded "
                        f"log-probs (max difference {err:.3g}); set train.packing = off")
    _PACKING_CHECKED[causal_lm] = True


def compile_body(model: nn.Module) -> nn.Module:
    """``train.compile``: the transformer body compiled in place (``nn.Module.compile``: parameter names and
    the module tree stay as they are, so saving, peft and FSDP see the same model). Shapes stay few because
    training then pads lengths to :func:`bucket_length` buckets; dynamic dimensions are left to torch's
    automatic detection (a dimension seen with two sizes is made symbolic instead of recompiling again)."""
    body, _ = _body_and_head(_causal_lm(model))
    body.compile()
    return model
