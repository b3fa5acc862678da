"""train: the policy learns from binary feedback against precomputed reference log-probs.

Reads `<run>/data` (prepare) and `<run>/logprobs` (reference log-probs, one float per row), loads the
policy only, and minimises one of the losses of docs/losses.md over the training split (a reference-free
loss, `pmle`, reads no logprobs artifact):

    config -> validate inputs -> set up (policy, optimizer, schedule, output dir) -> loop -> save

Batches. Every optimizer step takes the next `units_per_step = u * processes * accumulation` units of
the epoch's order (a unit is a row, or a chosen/rejected pair for DPO, `u = batch_size` rows or
`batch_size / 2` pairs); micro-step k of process p takes slice `k * processes + p` of it. So N processes
with batch b see exactly the examples one process with batch N*b sees. An incomplete last step of an
epoch is dropped. The loss of a step is the SUM of per-example losses over all its examples divided by
their number, whatever the process count or accumulation. KTO's reference point and BCO's running mean
use the global micro-batch (all processes, one accumulation micro-step), as TRL does.

Output (`<out>`, default `<run>/train`): `metrics.jsonl` (one row per optimizer step),
`checkpoints/step-XXXXXXX/` (complete only with `state.json`), `final/` (model or LoRA adapter,
tokenizer, recipe.toml) and, last, `manifest.json`: downstream stages accept the run only then. The output
directory, checkpoints and metrics rows are `checkpoints.py`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from rdro_cli import (
    artifacts,
    checkpoints,
    integrity,
    losses,
    modeling,
    outputs,
    throughput,
    tracking,
)
from rdro_cli.errors import UserError
from rdro_cli.peft_compat import building_peft_model
from rdro_cli.recipe import Recipe

# train.* keys that do not change the trained weights: a run may resume with different values
NOT_IN_FINGERPRINT = {"save_every", "keep_checkpoints", "log_every", "report_to", "gradient_checkpointing",
                      "chunk_size", "max_tokens_per_batch", "group_cost", "packing", "compile", "peak_flops"}
# train.* keys that only say how long to train: they may grow on --resume (see checkpoints.open_output)
LENGTH_KEYS = {"max_steps", "epochs"}


# --------------------------------------------------------------------------------------------- inputs


@dataclass
class TrainRows:
    """The training split as the loop needs it: token ids (memory-mapped), labels, reference log-probs."""

    ids: object  # datasets.Dataset with the `input_ids` column only
    completion_start: np.ndarray
    label: np.ndarray
    kl_partner: np.ndarray
    ref_logps: torch.Tensor
    ref_kl_logps: torch.Tensor | None
    pairs: np.ndarray | None  # [pairs, 2] (chosen row, rejected row) for DPO
    kl_max_length: int
    pad_id: int = 0
    device: torch.device = torch.device("cpu")
    plan: throughput.BatchingPlan | None = None  # None: length groups at modeling.length_groups' default cost

    def units(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.label)

    def rows_of(self, units: np.ndarray) -> np.ndarray:
        """Row indices of some units; a DPO micro-batch is its chosen rows followed by its rejected rows."""
        return np.concatenate([self.pairs[units, 0], self.pairs[units, 1]]) if self.pairs is not None else units

    def batch(self, rows: np.ndarray, max_tokens: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """Length groups of `rows` (padded little, see modeling.length_groups) and the permutation that
        puts their concatenated results back in the order of `rows`."""
        ids = self.ids[rows.tolist()]["input_ids"]
        starts = self.completion_start[rows].tolist()
        plan = self.plan or throughput.BatchingPlan(pack=False, group_cost=512, bucket=False, source="default")
        if plan.pack:  # one row, results already in order
            return torch.arange(len(ids), device=self.device), modeling.pack(ids, starts, self.pad_id,
                                                                             bucket=plan.bucket).to(self.device)
        groups = modeling.length_groups([len(r) for r in ids], max_tokens=max_tokens, group_cost=plan.group_cost)
        tensors = [modeling.collate([ids[i] for i in g], [starts[i] for i in g], self.pad_id, bucket=plan.bucket)
                   for g in groups]
        order = torch.as_tensor([i for g in groups for i in g])
        restore = torch.empty_like(order)
        restore[order] = torch.arange(len(order))
        return restore.to(self.device), [tuple(t.to(self.device) for t in group) for group in tensors]

    def mismatched_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Prompt of row i with the completion of row kl_partner[i] (KTO), as logprobs built them."""
        partners = self.kl_partner[rows]
        ids = self.ids[rows.tolist()]["input_ids"]
        partner_ids = self.ids[partners.tolist()]["input_ids"]
        pairs = [modeling.mismatched_ids(row[: self.completion_start[i]], other[self.completion_start[j]:],
                                         self.kl_max_length)
                 for row, other, i, j in zip(ids, partner_ids, rows, partners, strict=True)]
        tensors = modeling.collate([p[0] for p in pairs], [p[1] for p in pairs], self.pad_id)
        return tuple(t.to(self.device) for t in tensors)


def _read_inputs(cfg: Recipe, data_dir: Path, logprobs_dir: Path, spec: losses.LossSpec) -> tuple[dict, dict | None]:
    data_manifest = artifacts.require_input(data_dir, "prepare", rerun="rdro prepare")
    logprobs_manifest = None  # a reference-free loss (pmle) reads no logprobs artifact
    if spec.needs_ref:
        logprobs_manifest = artifacts.require_input(logprobs_dir, "logprobs", rerun="rdro logprobs")
        artifacts.check_inputs_match(logprobs_dir, logprobs_manifest, {"data": data_manifest["fingerprint"]},
                                     rerun="rdro logprobs")
    if spec.needs_pairs and not data_manifest.get("paired"):
        raise UserError(f"{data_dir}: {cfg.loss.name} needs paired data (prompt/chosen/rejected); this dataset "
                        f"is unpaired; use loss.name = rdro, ddro, kto, bco, pro or kldo, or prepare a paired dataset")
    return data_manifest, logprobs_manifest


def _load_rows(cfg: Recipe, data_dir: Path, logprobs_dir: Path, logprobs_manifest: dict | None,
               spec: losses.LossSpec) -> TrainRows:
    import datasets
    from safetensors.torch import load_file

    split = datasets.load_from_disk(str(data_dir))["train"]
    # reference-free: "log-ratios" are then s_pol itself (s_ref = 0)
    tensors = load_file(str(logprobs_dir / "train.safetensors")) if spec.needs_ref \
        else {"ref_logps": torch.zeros(len(split))}
    rerun = f"re-run `rdro logprobs --force{' --set loss.name=kto' if spec.needs_kl else ''}`"
    if tensors["ref_logps"].shape != (len(split),):
        raise UserError(f"{logprobs_dir}/train.safetensors has {tensors['ref_logps'].shape[0]} reference "
                        f"log-probs for {len(split)} training rows; {rerun}")
    if spec.needs_kl and "ref_kl_logps" not in tensors:
        raise UserError(f"{logprobs_dir}: {cfg.loss.name} needs the mismatched-pair reference log-probs "
                        f"(ref_kl_logps), which this logprobs run did not compute; {rerun}")
    for key in ("ref_logps", "ref_kl_logps"):
        bad = integrity.nonfinite_rows(tensors[key]) if key in tensors else []
        if bad:
            raise UserError(f"{logprobs_dir}/train.safetensors: {key} is NaN/inf for "
                            f"{integrity.describe_rows(bad, len(tensors[key]))}; {rerun} (fp16 overflows: "
                            f"use --set model.dtype=bfloat16 or float32)")
    # straight from Arrow: datasets' numpy formatter took ~8 s for these four columns at 1M rows
    columns = {name: split.data.column(name).to_numpy() for name in ("completion_start", "label", "pair_id",
                                                                       "kl_partner")}
    label = columns["label"].astype(bool)
    pairs = _pairs(columns["pair_id"], label) if spec.needs_pairs else None
    if pairs is not None and len(pairs) == 0:
        raise UserError(f"{data_dir}: {cfg.loss.name} needs paired data (prompt/chosen/rejected); no complete "
                        f"chosen/rejected pair is left in the training split")
    kl_max_length = (logprobs_manifest or {}).get("config", {}).get("data", {}).get("max_length", cfg.data.max_length)
    return TrainRows(ids=split.select_columns(["input_ids"]), completion_start=columns["completion_start"],
                     label=label, kl_partner=columns["kl_partner"], ref_logps=tensors["ref_logps"].float(),
                     ref_kl_logps=tensors.get("ref_kl_logps"), pairs=pairs, kl_max_length=int(kl_max_length))


def _check_reference(cfg: Recipe, logprobs_dir: Path, logprobs_manifest: dict | None,
                     policy_fingerprint: str) -> dict | None:
    """The model the reference log-probs were computed with: {"name", "fingerprint"} (None: reference-free).

    It must be the policy's initialisation (the log-ratio then starts at 0), compared by content, not by name:
    log-probs of another model with the same tokenizer would train without a word otherwise. A different
    reference is allowed only deliberately, by naming it as model.ref_name.
    """
    if logprobs_manifest is None:
        return None
    recorded = logprobs_manifest.get("inputs", {}).get("model")
    name = logprobs_manifest.get("model") or "an unrecorded model"
    deliberate = cfg.model.ref_name and cfg.model.ref_name != cfg.model.name
    if deliberate:
        expected = modeling.model_fingerprint(cfg.model.ref_name, revision=cfg.model.revision or None)
        if recorded != expected:
            raise UserError(f"{logprobs_dir}: the reference log-probs were computed by {name!r}, not by "
                            f"model.ref_name = {cfg.model.ref_name!r}; re-run `rdro logprobs --force` "
                            f"(it scores with model.ref_name)")
    elif recorded != policy_fingerprint:
        raise UserError(f"{logprobs_dir}: the reference log-probs were computed by {name!r}, another model than "
                        f"the policy train starts from ({cfg.model.name!r}), so the log-ratio would not start at "
                        f"0; re-run `rdro logprobs --model {cfg.model.name} --force`, or set model.ref_name = "
                        f"{name!r} to train against that reference deliberately")
    return {"name": cfg.model.ref_name if deliberate else name, "fingerprint": recorded}


def _pairs(pair_id: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(chosen row, rejected row) for every pair id with exactly one of each, in pair-id order (vectorised:
    a Python loop over a million rows alone took seconds)."""
    rows = np.flatnonzero(pair_id >= 0)
    label = label[rows].astype(bool)
    ids, inverse = np.unique(pair_id[rows], return_inverse=True)
    n_chosen = np.bincount(inverse[label], minlength=len(ids))
    n_rejected = np.bincount(inverse[~label], minlength=len(ids))
    chosen, rejected = np.full(len(ids), -1, dtype=np.int64), np.full(len(ids), -1, dtype=np.int64)
    chosen[inverse[label]], rejected[inverse[~label]] = rows[label], rows[~label]
    complete = (n_chosen == 1) & (n_rejected == 1)
    return np.stack([chosen[complete], rejected[complete]], axis=1).reshape(-1, 2)


def _check_vocab(rows: TrainRows, model, data_dir: Path) -> None:
    import pyarrow.compute as pc

    # prepare records the largest id; scanning every token instead maps the whole column (GBs at 1M rows)
    manifest = json.loads((Path(data_dir) / artifacts.MANIFEST).read_text())
    largest = manifest.get("counts", {}).get("train", {}).get("max_token_id")
    if largest is None:
        largest = pc.max(pc.list_flatten(rows.ids.data.column("input_ids"))).as_py()
    vocab = model.get_input_embeddings().num_embeddings
    if largest is not None and largest >= vocab:
        raise UserError(f"{data_dir}: token id {largest} is outside the policy's vocabulary ({vocab}); the data "
                        f"was tokenised for another model: re-run `rdro prepare --model <policy>`")


# --------------------------------------------------------------------------------------------- setup


@dataclass
class Session:
    cfg: Recipe
    accelerator: object
    policy: torch.nn.Module  # CompletionLogps around the (peft) model, prepared by accelerate
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rows: TrainRows
    spec: losses.LossSpec
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


def _identity(cfg: Recipe, inputs: dict, processes: int) -> dict:
    """What decides the weights of every step trained so far (not how many steps there will be)."""
    config = cfg.to_dict()
    train = {k: v for k, v in config["train"].items() if k not in NOT_IN_FINGERPRINT | LENGTH_KEYS}
    lora = config["lora"] if cfg.lora.enabled else {"enabled": False}
    model = {k: config["model"][k] for k in ("name", "revision", "dtype")}
    return {"inputs": inputs, "model": model, "loss": config["loss"], "train": train, "lora": lora,
            "processes": processes}


def _make_accelerator(cfg: Recipe, out: Path):
    from accelerate import Accelerator

    # cpu=True without a GPU lets torchrun-launched processes (`accelerate launch --multi_gpu`, or
    # recipes/accelerate/ddp-cpu-2.yaml) train on CPU with gloo.
    return Accelerator(gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                       cpu=not torch.cuda.is_available(), **tracking.accelerator_kwargs(cfg, out))


def _load_policy(cfg: Recipe, device: torch.device, checkpoint: Path | None):
    """The policy (never a reference model): full weights, or the base with a trainable LoRA adapter."""
    dtype = cfg.model.dtype
    if dtype == "auto":  # resolve for the accelerator's device, not for whatever GPU happens to exist
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    full_from_checkpoint = checkpoint is not None and not cfg.lora.enabled
    source = str(checkpoint / "model") if full_from_checkpoint else cfg.model.name
    model = modeling.load_model(source, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
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


def _lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Linear warmup to the peak over `warmup` steps, then cosine / linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _make_optimizer(cfg: Recipe, model, accelerator_kind: str) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    # weight decay on matrices only: decaying norms and biases towards 0 hurts and is not what it is for
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    # fused: one kernel over all parameters instead of a Python loop per tensor (CPU and CUDA); DeepSpeed
    # and FSDP bring their own handling of the optimizer, so they keep the default implementation.
    fused = accelerator_kind not in ("DEEPSPEED", "FSDP") and all(p.device.type in ("cpu", "cuda") for p in trainable)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.learning_rate, fused=fused)


def _static_loss_kwargs(cfg: Recipe, alpha: float | None, preferred_fraction: float | None) -> dict:
    name = cfg.loss.name
    if name == "rdro":
        return {"alpha": alpha, "weighting": cfg.loss.weighting, "preferred_fraction": preferred_fraction}
    if name == "kto":
        return {"beta": cfg.loss.beta, "desirable_weight": cfg.loss.desirable_weight,
                "undesirable_weight": cfg.loss.undesirable_weight}
    if name in ("bco", "dpo"):
        return {"beta": cfg.loss.beta}
    if name == "pro":
        return {"beta": cfg.loss.beta, "alpha": cfg.loss.pro_alpha, "weighting": cfg.loss.pro_weighting,
                "preferred_fraction": preferred_fraction}
    if name == "kldo":
        return {"beta": cfg.loss.beta, "estimator": cfg.loss.kldo_estimator}
    if name == "bpo":
        return {"beta": cfg.loss.beta, "divergence": cfg.loss.bpo_divergence, "lam": cfg.loss.bpo_lam,
                "ratio_min": cfg.loss.bpo_ratio_min}
    if name == "pmle":
        return {"gamma": cfg.loss.pmle_gamma}
    return {}


def _resolve_alpha(cfg: Recipe, preferred_fraction: float | None) -> float | None:
    if cfg.loss.name != "rdro":
        return None
    try:
        return losses.resolve_alpha(cfg.loss.alpha, preferred_fraction)
    except ValueError as err:
        raise UserError(f"loss.alpha: {err}; set loss.alpha to a number in (0, 1)") from None


def _schedule(cfg: Recipe, units: int, units_per_step: int, data_dir: Path) -> tuple[int, int]:
    steps_per_epoch = units // units_per_step
    if steps_per_epoch == 0:
        what = "pairs" if losses.LOSSES[cfg.loss.name].needs_pairs else "rows"
        raise UserError(f"{data_dir}: the training split has {units} {what}, fewer than one optimizer step takes "
                        f"({units_per_step}); lower train.batch_size or train.gradient_accumulation_steps")
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    return steps_per_epoch, total


# --------------------------------------------------------------------------------------------- the loop


@contextlib.contextmanager
def _stop_requests() -> Iterator[dict]:
    """SIGINT / SIGTERM ask the loop to finish its step, checkpoint and stop; a second SIGINT stops now."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        from rdro_cli.progress import console

        console.print("train: stopping after this step (a checkpoint will be saved; Ctrl-C again to abort now)")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _step_units(session: Session, epoch: int, position: int) -> np.ndarray:
    """Units of optimizer step `position` in `epoch`: the epoch's seeded order (or data order), cut in steps."""
    cfg, n = session.cfg, session.rows.units()
    order = np.random.default_rng(cfg.train.seed + epoch).permutation(n) if cfg.train.shuffle else np.arange(n)
    per_step = session.units_per_micro * session.accelerator.num_processes * cfg.train.gradient_accumulation_steps
    return order[position * per_step:(position + 1) * per_step]


def _micro_step(session: Session, rows: np.ndarray, loss_scale: float) -> dict:
    """Forward, loss and backward of this process's micro-batch; returns detached numbers for the log."""
    accelerator, rows_data, spec = session.accelerator, session.rows, session.spec
    kwargs = dict(session.loss_kwargs)
    index = torch.from_numpy(rows)
    extra = {}
    if spec.needs_kl:
        with torch.no_grad():  # KTO's reference point takes no gradient
            kl_logratios = session.policy(*rows_data.mismatched_batch(rows)) - rows_data.ref_kl_logps[index].to(
                accelerator.device)
        kwargs["kl_ref_point"] = extra["kl_ref_point"] = losses.kto_ref_point(accelerator.gather(kl_logratios))
    restore, groups = rows_data.batch(rows, session.cfg.train.max_tokens_per_batch)
    logratios = session.policy(groups)[restore] - rows_data.ref_logps[index].to(accelerator.device)
    labels = torch.from_numpy(rows_data.label[rows]).to(accelerator.device)
    gathered = accelerator.gather(torch.stack([logratios.detach(), labels.float()], dim=1))
    if spec.state == "bco_delta":  # BCO: delta includes this global batch before the loss
        state = session.state
        state.bco_delta, state.bco_count = losses.bco_update_delta(
            state.bco_delta, state.bco_count, kwargs["beta"] * gathered[:, 0])
        kwargs["delta"] = state.bco_delta
    if spec.state == "kldo_ema":  # KLDO: m includes this global batch; its statistics come from all rows
        batch_labels = gathered[:, 1].bool()
        if kwargs["estimator"] == "ma":
            session.state.kldo_ema = losses.kldo_update_ema(
                session.state.kldo_ema, kwargs["beta"] * gathered[~batch_labels, 0], rate=session.cfg.loss.kldo_rate)
        kwargs.update(ema=session.state.kldo_ema, batch_logratios=gathered[:, 0], batch_labels=batch_labels)
    if spec.needs_pairs:
        half = len(rows) // 2
        output = spec.fn(logratios[:half], logratios[half:], **kwargs)
    else:
        output = spec.fn(logratios, labels, **kwargs)
    accelerator.backward(output.losses.sum() * loss_scale)
    tokens = modeling.batch_tokens(groups)
    return {"loss_sum": output.losses.detach().sum(), "tokens": tokens, "gathered": gathered,
            **extra}


def _optimizer_step(session: Session, units: np.ndarray) -> dict:
    """One optimizer step over `units` (all processes' examples); returns its metrics."""
    accelerator, cfg = session.accelerator, session.cfg
    processes, accumulation = accelerator.num_processes, cfg.train.gradient_accumulation_steps
    # Sum over the step's examples / their number: DDP averages over processes and accelerate's
    # backward divides by the accumulation steps, so scale each micro-batch's sum by processes*accumulation.
    loss_scale = processes * accumulation / len(units)
    u = session.units_per_micro
    micro = []
    for k in range(accumulation):
        mine = units[(k * processes + accelerator.process_index) * u:(k * processes + accelerator.process_index + 1) * u]
        with accelerator.accumulate(session.policy):
            micro.append(_micro_step(session, session.rows.rows_of(mine), loss_scale))
    totals = accelerator.reduce(torch.stack([sum(m["loss_sum"] for m in micro).float(),
                                             sum(m["tokens"] for m in micro).float()]), reduction="sum")
    loss = totals[0].item() / len(units)
    max_norm = cfg.train.max_grad_norm or float("inf")  # inf: measure the norm without clipping
    grad_norm = accelerator.clip_grad_norm_(session.policy.parameters(), max_norm)
    grad_norm = None if grad_norm is None else float(grad_norm)  # None: DeepSpeed clips (and checks) itself
    step = session.state.step + 1
    if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
        kept = f"the last good checkpoint is {session.last_checkpoint}" if session.last_checkpoint \
            else "no checkpoint was written yet"
        raise UserError(f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                        f"(loss {loss}, grad norm {grad_norm}); stopped before the update, {kept}; lower "
                        f"train.learning_rate or set train.max_grad_norm and re-run with --force")
    lr = session.scheduler.get_last_lr()[0]
    session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)

    gathered = torch.cat([m["gathered"] for m in micro])
    logratios, labels = gathered[:, 0], gathered[:, 1].bool()
    stat_kwargs = dict(session.loss_kwargs)
    if session.spec.needs_kl:
        stat_kwargs["kl_ref_point"] = torch.stack([m["kl_ref_point"] for m in micro]).mean()
    if session.spec.state == "bco_delta":
        stat_kwargs["delta"] = session.state.bco_delta
    if session.spec.state == "kldo_ema":
        stat_kwargs["ema"] = session.state.kldo_ema
    if session.spec.needs_pairs:
        stats = session.spec.fn(logratios[labels], logratios[~labels], **stat_kwargs).stats
    else:
        stats = session.spec.fn(logratios, labels, **stat_kwargs).stats
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": totals[1].item(),
            **{name: value.item() for name, value in stats.items()}}


def _train_loop(session: Session, progress, task) -> None:
    accelerator, cfg, state = session.accelerator, session.cfg, session.state
    metrics_path = session.out / checkpoints.METRICS_FILE
    with _stop_requests() as stop:
        while state.step < session.total_steps:
            began = time.perf_counter()
            record = _optimizer_step(session, _step_units(session, state.epoch, state.position))
            state.step += 1
            state.position += 1
            epoch_progress = state.epoch + state.position / session.steps_per_epoch
            if state.position == session.steps_per_epoch:
                state.epoch, state.position = state.epoch + 1, 0
                state.kldo_ema = 0.0  # KLDO's authors restart the moving average every epoch
            seconds, tokens = max(time.perf_counter() - began, 1e-9), record.pop("tokens")
            tokens_per_s, mfu = tokens / seconds, throughput.step_mfu(session.mfu_scale, tokens, seconds)
            row = {"step": state.step, "epoch": round(epoch_progress, 6), "tokens_per_s": round(tokens_per_s, 1),
                   **({} if mfu is None else {"mfu": mfu}),  # absent off CUDA
                   **{k: (v if v is not None and math.isfinite(v) else None) for k, v in record.items()}}
            if accelerator.is_main_process and (state.step % cfg.train.log_every == 0
                                                or state.step == session.total_steps):
                checkpoints.append_metrics(metrics_path, row)
                tracking.log(accelerator, row)
            progress.update(task, advance=1, loss=f"loss {record['loss']:.4f}",
                            speed=throughput.speed_text(tokens_per_s, mfu))
            stopping = stop["stop"]
            if accelerator.num_processes > 1:  # every process must stop after the same step
                stopping = bool(accelerator.reduce(torch.tensor(float(stopping), device=accelerator.device),
                                                   reduction="sum").item())
            if (cfg.train.save_every and state.step % cfg.train.save_every == 0) or stopping \
                    or state.step == session.total_steps:
                checkpoints.save(session)
            if stopping:
                raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------- the stage


def run(cfg: Recipe, *, data: Path | None = None, logprobs: Path | None = None, out: Path | None = None,
        resume: bool = False, force: bool = False) -> Path:
    from accelerate.utils import set_seed

    from rdro_cli.progress import console, task_progress

    started = time.time()
    data_dir = Path(data or cfg.run_dir / "data")
    logprobs_dir = Path(logprobs or cfg.run_dir / "logprobs")
    out = Path(out or cfg.run_dir / "train")
    if not cfg.model.name:
        raise UserError("no policy model: pass --model (a hub id or local dir) or set model.name")
    spec = losses.LOSSES[cfg.loss.name]
    if spec.needs_pairs and cfg.train.batch_size % 2:
        raise UserError(f"train.batch_size = {cfg.train.batch_size}: {cfg.loss.name} batches hold whole "
                        f"chosen/rejected pairs, so it must be even")

    # validate inputs
    data_manifest, logprobs_manifest = _read_inputs(cfg, data_dir, logprobs_dir, spec)
    accelerator = _make_accelerator(cfg, out)
    outputs.claim(out, "train", inputs=[data_dir, logprobs_dir, *outputs.local_paths(cfg.model.name)],
                  is_main=accelerator.is_main_process, share=outputs.broadcast_from_main(accelerator))
    # the data's tokenizer first: log-probs of another model are usually also another tokenizer's
    tokenizer = modeling.recipe_tokenizer(cfg)
    modeling.require_tokenizer(tokenizer, data_manifest["inputs"].get("tokenizer"), model=cfg.model.name,
                               data=data_dir)
    inputs = {"data": data_manifest["fingerprint"],
              "logprobs": logprobs_manifest["fingerprint"] if logprobs_manifest else None,
              "model": modeling.model_fingerprint(cfg.model.name, revision=cfg.model.revision or None)}
    reference = _check_reference(cfg, logprobs_dir, logprobs_manifest, inputs["model"])
    identity = _identity(cfg, inputs, accelerator.num_processes)
    fingerprint = checkpoints.run_fingerprint(identity)
    rows = _load_rows(cfg, data_dir, logprobs_dir, logprobs_manifest, spec)
    preferred_fraction = data_manifest.get("preferred_fraction")
    alpha = _resolve_alpha(cfg, preferred_fraction)
    units_per_micro = cfg.train.batch_size // 2 if spec.needs_pairs else cfg.train.batch_size
    steps_per_epoch, total_steps = _schedule(
        cfg, rows.units(), units_per_micro * accelerator.num_processes * cfg.train.gradient_accumulation_steps,
        data_dir)
    # every check that can refuse comes before `checkpoints.begin` changes anything in `out`
    opening = checkpoints.open_output(out, identity, total_steps, resume=resume, force=force,
                                      processes=accelerator.num_processes)
    if opening.action == "done":
        if accelerator.is_main_process:
            console.print(f"train: {out} is up to date (use --force to retrain)", soft_wrap=True)
        return out
    checkpoint = opening.checkpoint
    accelerator.wait_for_everyone()

    # set up: policy, optimizer, schedule
    set_seed(cfg.train.seed)
    model = _load_policy(cfg, accelerator.device, checkpoint)
    _check_vocab(rows, model, data_dir)
    rows.device = accelerator.device
    rows.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    wrapper = modeling.CompletionLogps(model, chunk_size=cfg.train.chunk_size)
    wrapper._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP auto-wrap looks at the root
    mfu_scale = throughput.mfu_scale(model, accelerator.device, next(model.parameters()).dtype,
                                     cfg.train.peak_flops, accelerator.num_processes)
    optimizer = _make_optimizer(cfg, model, accelerator.distributed_type.value)
    if accelerator.distributed_type.value == "DEEPSPEED":  # no dataloader to infer it from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    policy, optimizer = accelerator.prepare(wrapper, optimizer)
    rows.plan = throughput.batching_plan(cfg.train, model, policy, accelerator.device, fingerprint=inputs["model"],
                                         lora=cfg.lora.enabled)
    if cfg.train.compile:  # after the measurement, which would otherwise compile no-grad graphs
        modeling.compile_body(model)
    if accelerator.is_main_process:
        console.print(rows.plan.describe(), soft_wrap=True)
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    # not prepared: accelerate would step it once per process
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_lr_factor, warmup=warmup, total=total_steps, kind=cfg.train.lr_scheduler))
    session = Session(cfg=cfg, accelerator=accelerator, policy=policy, optimizer=optimizer, scheduler=scheduler,
                      rows=rows, spec=spec, loss_kwargs=_static_loss_kwargs(cfg, alpha, preferred_fraction),
                      out=out, fingerprint=fingerprint, identity=identity, units_per_micro=units_per_micro,
                      steps_per_epoch=steps_per_epoch, total_steps=total_steps, mfu_scale=mfu_scale)
    if checkpoint is not None:
        checkpoints.restore(session, checkpoint)
    if accelerator.is_main_process:
        if opening.note:
            console.print(opening.note, soft_wrap=True)
        checkpoints.begin(out, opening, is_main=True)  # the first change on disk
        outputs.mark_stage(out, "train")  # from here on `out` is recognisably a train run
        for stale in (out / "checkpoints").glob("*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        checkpoints.truncate_metrics(out / checkpoints.METRICS_FILE, session.state.step)
    accelerator.wait_for_everyone()

    # loop
    progress = task_progress("loss", "speed")
    progress.disable = not accelerator.is_main_process
    tracking.start(accelerator, cfg)
    try:
        with progress:
            task = progress.add_task(f"train {cfg.loss.name}", total=total_steps, completed=session.state.step,
                                     loss="", speed="")
            _train_loop(session, progress, task)
    finally:
        tracking.finish(accelerator)

    # save
    final = checkpoints.save_final(session, tokenizer, data_manifest.get("dataset") or cfg.data.dataset,
                                   reference=reference)
    if accelerator.is_main_process:
        counts = {"steps": session.state.step, "steps_per_epoch": steps_per_epoch, "train_units": rows.units(),
                  "processes": accelerator.num_processes,
                  "examples_per_step": units_per_micro * accelerator.num_processes
                  * cfg.train.gradient_accumulation_steps}
        artifacts.write_manifest(out, stage="train", fingerprint=fingerprint, inputs=inputs, config=cfg.to_dict(),
                                 counts=counts, started=started, final=str(final), loss=cfg.loss.name, alpha=alpha,
                                 lora=cfg.lora.enabled, identity=identity, reference=reference)
        console.print(f"train: {session.state.step} steps of {cfg.loss.name} -> {final}", soft_wrap=True)
    accelerator.wait_for_everyone()
    return out
