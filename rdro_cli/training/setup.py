"""What train sets up before its loop: the run's identity (what decides the weights, so --resume can refuse
anything else), the accelerator, the policy (full weights or LoRA, fresh or from a checkpoint), the optimizer,
the learning-rate schedule and the loss's fixed arguments (from its registry entry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rdro_cli.errors import UserError
from rdro_cli.lm import loading
from rdro_cli.lm.peft_compat import building_peft_model
from rdro_cli.losses import density_ratio, registry
from rdro_cli.losses.registry import LOSSES, LossSpec
from rdro_cli.recipe import Recipe
from rdro_cli.training import checkpoints, tracking
from rdro_cli.training.inputs import TrainRows

# train.* keys that do not change the trained weights: a run may resume with different values
NOT_IN_FINGERPRINT = {"save_every", "keep_checkpoints", "log_every", "report_to", "gradient_checkpointing",
                      "chunk_size", "max_tokens_per_batch", "group_cost", "packing", "compile", "peak_flops"}


# train.* keys that only say how long to train: they may grow on --resume (see checkpoints.open_output)
LENGTH_KEYS = {"max_steps", "epochs"}


@dataclass
class Session:
    cfg: Recipe
    accelerator: object
    policy: torch.nn.Module  # CompletionLogps around the (peft) model, prepared by accelerate
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rows: TrainRows
    spec: LossSpec
    loss_kwargs: dict
    out: Path
    fingerprint: str
    identity: dict
    units_per_micro: int
    steps_per_epoch: int
    total_steps: int
    state: checkpoints.TrainState = field(default_factory=checkpoints.TrainState)
    last_checkpoint: Path | None = None
    mfu_scale: float | None = None  # throughput.mfu_scale: MFU = scale * tokens / seconds (None on CPU)


def identity_of(cfg: Recipe, inputs: dict, processes: int) -> dict:
    """What decides the weights of every step trained so far (not how many steps there will be)."""
    config = cfg.to_dict()
    train = {k: v for k, v in config["train"].items() if k not in NOT_IN_FINGERPRINT | LENGTH_KEYS}
    lora = config["lora"] if cfg.lora.enabled else {"enabled": False}
    model = {k: config["model"][k] for k in ("name", "revision", "dtype")}
    return {"inputs": inputs, "model": model, "loss": config["loss"], "train": train, "lora": lora,
            "processes": processes}


def make_accelerator(cfg: Recipe, out: Path):
    from accelerate import Accelerator

    # cpu=True without a GPU lets torchrun-launched processes (`accelerate launch --multi_gpu`, or
    # recipes/accelerate/ddp-cpu-2.yaml) train on CPU with gloo.
    return Accelerator(gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                       cpu=not torch.cuda.is_available(), **tracking.accelerator_kwargs(cfg, out))


def load_policy(cfg: Recipe, device: torch.device, checkpoint: Path | None):
    """The policy (never a reference model): full weights, or the base with a trainable LoRA adapter."""
    dtype = cfg.model.dtype
    if dtype == "auto":  # resolve for the accelerator's device, not for whatever GPU happens to exist
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    full_from_checkpoint = checkpoint is not None and not cfg.lora.enabled
    source = str(checkpoint / "model") if full_from_checkpoint else cfg.model.name
    model = loading.load_model(source, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                                allow_pickle=cfg.model.allow_pickle,
                                revision=None if full_from_checkpoint else (cfg.model.revision or None))
    model.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = _add_lora(cfg, model, checkpoint)
    model.train()
    return model


def _add_lora(cfg: Recipe, model, checkpoint: Path | None):
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad into the layers
    if checkpoint is not None:
        with building_peft_model():
            return PeftModel.from_pretrained(model, str(checkpoint / "model"), is_trainable=True)
    config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                        target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    try:
        with building_peft_model():
            return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"lora.target_modules {cfg.lora.target_modules} do not fit {cfg.model.name}: "
                        f"{' '.join(str(err).split())[:200]}") from None


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Linear warmup to the peak over `warmup` steps, then cosine / linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(cfg: Recipe, model, accelerator_kind: str) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    # weight decay on matrices only: decaying norms and biases towards 0 hurts and is not what it is for
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    # fused: one kernel over all parameters instead of a Python loop per tensor (CPU and CUDA); DeepSpeed
    # and FSDP bring their own handling of the optimizer, so they keep the default implementation.
    fused = accelerator_kind not in ("DEEPSPEED", "FSDP") and all(p.device.type in ("cpu", "cuda") for p in trainable)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.learning_rate, fused=fused)


def static_loss_kwargs(cfg: Recipe, alpha: float | None, preferred_fraction: float | None) -> dict:
    """The loss function's fixed arguments, as its registry entry maps the recipe's `loss.*` keys."""
    return LOSSES[cfg.loss.name].kwargs(cfg.loss, alpha=alpha, preferred_fraction=preferred_fraction)


def resolve_loss_alpha(cfg: Recipe, preferred_fraction: float | None) -> float | None:
    if not LOSSES[cfg.loss.name].resolved_alpha:
        return None
    try:
        return density_ratio.resolve_alpha(cfg.loss.alpha, preferred_fraction)
    except ValueError as err:
        raise UserError(f"loss.alpha: {err}; set loss.alpha to a number in (0, 1)") from None


def schedule(cfg: Recipe, units: int, units_per_step: int, data_dir: Path) -> tuple[int, int]:
    steps_per_epoch = units // units_per_step
    if steps_per_epoch == 0:
        what = "pairs" if registry.LOSSES[cfg.loss.name].needs_pairs else "rows"
        raise UserError(f"{data_dir}: the training split has {units} {what}, fewer than one optimizer step takes "
                        f"({units_per_step}); lower train.batch_size or train.gradient_accumulation_steps")
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    return steps_per_epoch, total
