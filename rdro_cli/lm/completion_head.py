"""The chunked completion log-prob head shared by logprobs, train and eval.

The number every stage needs is docs/design.md §1's ``s = Σ_t log π(y_t | x, y_<t)`` over completion tokens.
``completion_logps`` computes it without a ``[batch, seq, vocab]`` tensor: it runs the transformer body,
keeps the hidden states only at the N positions that predict completion tokens, and applies the LM head to
``chunk_size`` of them at a time (log-softmax in float32 per chunk). With gradients it goes through
``_ChunkedHeadLogps``, whose backward recomputes each chunk's logits, so training memory stays
O(chunk_size × vocab) instead of O(N × vocab). A packed batch's path is checked against the padded one once
per model.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from rdro_cli.errors import UserError
from rdro_cli.lm.batching import PackedBatch, collate, pack


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
    return completion_logps_of(model, input_ids, attention_mask, None, completion_mask, rows, input_ids.shape[0],
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
    return completion_logps_of(model, packed.input_ids, None, packed.position_ids, packed.completion_mask,
                             packed.row_index.unsqueeze(0), packed.rows, chunk_size)


def completion_logps_of(model, input_ids, attention_mask, position_ids, completion_mask, row_index, rows,
                        chunk_size) -> torch.Tensor:
    """Shared by the padded and the packed path: ``row_index[b, t]`` is the output row of token (b, t)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    causal_lm = causal_lm_of(model)
    body, head = body_and_head(causal_lm)
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


def causal_lm_of(model: nn.Module) -> nn.Module:
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


def body_and_head(causal_lm: nn.Module) -> tuple[nn.Module, nn.Module]:
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


_PACKING_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _check_packing_is_exact(model, packed: PackedBatch, chunk_size: int) -> None:
    """Once per model: the packed path must reproduce the padded path's per-row log-probs on two short rows
    (an architecture that builds its attention mask without looking at position_ids would mix rows)."""
    causal_lm = causal_lm_of(model)
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
        got = completion_logps_of(model, check.input_ids, None, check.position_ids, check.completion_mask,
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
