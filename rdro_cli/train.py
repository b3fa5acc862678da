"""train: the policy learns from binary feedback against precomputed reference log-probs.

Reads `<run>/data` (prepare) and `<run>/logprobs` (reference log-probs, one float per row), loads the
policy only, and minimises one of the losses of docs/losses.md over the training split (a reference-free
loss, `pmle`, reads no logprobs artifact):

    run = validate (every refusal, nothing written) -> set_up (policy, optimizer, schedule; then the first
          change in the output directory) -> loop -> save (final/, then the manifest)

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
directory, checkpoints and metrics rows are training/checkpoints.py's; the training inputs, the set-up helpers and
the step loop are training/'s, the losses and their running state losses/'s.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from rdro_cli.errors import UserError
from rdro_cli.lm import completion_head, fast_paths, fingerprints, loading, throughput
from rdro_cli.losses import registry
from rdro_cli.progress import console
from rdro_cli.recipe import Recipe
from rdro_cli.store import manifests, outputs
from rdro_cli.training import checkpoints, tracking
from rdro_cli.training import loop as training_loop
from rdro_cli.training.inputs import TrainRows, check_reference, check_vocab, load_rows, read_inputs
from rdro_cli.training.setup import (
    Session,
    identity_of,
    load_policy,
    lr_factor,
    make_accelerator,
    make_optimizer,
    resolve_loss_alpha,
    schedule,
    static_loss_kwargs,
)


@dataclass
class Plan:
    """What `validate` found: the inputs, their fingerprints and the schedule, and what to do with `out`."""

    cfg: Recipe
    accelerator: object
    spec: registry.LossSpec
    data_dir: Path
    out: Path
    data_manifest: dict
    tokenizer: object
    rows: TrainRows
    inputs: dict
    reference: dict | None
    identity: dict
    fingerprint: str
    alpha: float | None
    preferred_fraction: float | None
    units_per_micro: int
    steps_per_epoch: int
    total_steps: int
    opening: checkpoints.Opening


def run(cfg: Recipe, *, data: Path | None = None, logprobs: Path | None = None, out: Path | None = None,
        resume: bool = False, force: bool = False) -> Path:
    started = time.time()
    plan = validate(cfg, Path(data or cfg.run_dir / "data"), Path(logprobs or cfg.run_dir / "logprobs"),
                    Path(out or cfg.run_dir / "train"), resume=resume, force=force)
    if plan.opening.action == "done":
        if plan.accelerator.is_main_process:
            console.print(f"train: {plan.out} is up to date (use --force to retrain)", soft_wrap=True)
        return plan.out
    session = set_up(plan)
    loop(session)
    return save(plan, session, started)


def validate(cfg: Recipe, data_dir: Path, logprobs_dir: Path, out: Path, *, resume: bool, force: bool) -> Plan:
    """Every check that can refuse the command, before anything in `out` changes."""
    if not cfg.model.name:
        raise UserError("no policy model: pass --model (a hub id or local dir) or set model.name")
    spec = registry.LOSSES[cfg.loss.name]
    if spec.needs_pairs and cfg.train.batch_size % 2:
        raise UserError(f"train.batch_size = {cfg.train.batch_size}: {cfg.loss.name} batches hold whole "
                        f"chosen/rejected pairs, so it must be even")
    data_manifest, logprobs_manifest = read_inputs(cfg, data_dir, logprobs_dir, spec)
    accelerator = make_accelerator(cfg, out)
    outputs.claim(out, "train", inputs=[data_dir, logprobs_dir, *outputs.local_paths(cfg.model.name)],
                  is_main=accelerator.is_main_process, share=outputs.broadcast_from_main(accelerator))
    # the data's tokenizer first: log-probs of another model are usually also another tokenizer's
    tokenizer = loading.recipe_tokenizer(cfg)
    fingerprints.require_tokenizer(tokenizer, data_manifest["inputs"].get("tokenizer"), model=cfg.model.name,
                                   data=data_dir)
    inputs = {"data": data_manifest["fingerprint"],
              "logprobs": logprobs_manifest["fingerprint"] if logprobs_manifest else None,
              "model": fingerprints.model_fingerprint(cfg.model.name, revision=cfg.model.revision or None)}
    reference = check_reference(cfg, logprobs_dir, logprobs_manifest, inputs["model"])
    identity = identity_of(cfg, inputs, accelerator.num_processes)
    rows = load_rows(cfg, data_dir, logprobs_dir, logprobs_manifest, spec)
    preferred_fraction = data_manifest.get("preferred_fraction")
    alpha = resolve_loss_alpha(cfg, preferred_fraction)
    units_per_micro = cfg.train.batch_size // 2 if spec.needs_pairs else cfg.train.batch_size
    steps_per_epoch, total_steps = schedule(
        cfg, rows.units(), units_per_micro * accelerator.num_processes * cfg.train.gradient_accumulation_steps,
        data_dir)
    opening = checkpoints.open_output(out, identity, total_steps, resume=resume, force=force,
                                      processes=accelerator.num_processes)
    return Plan(cfg=cfg, accelerator=accelerator, spec=spec, data_dir=data_dir, out=out, data_manifest=data_manifest,
                tokenizer=tokenizer, rows=rows, inputs=inputs, reference=reference, identity=identity,
                fingerprint=checkpoints.run_fingerprint(identity), alpha=alpha, preferred_fraction=preferred_fraction,
                units_per_micro=units_per_micro, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                opening=opening)


def set_up(plan: Plan) -> Session:
    """The policy (from its initialisation or the checkpoint to resume), optimizer and schedule; then, the
    last checks passed, the first change in `out` (`checkpoints.begin`)."""
    from accelerate.utils import set_seed

    cfg, accelerator, rows, out = plan.cfg, plan.accelerator, plan.rows, plan.out
    checkpoint = plan.opening.checkpoint
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed)
    model = load_policy(cfg, accelerator.device, checkpoint)
    check_vocab(rows, model, plan.data_dir)
    rows.device = accelerator.device
    rows.pad_id = next((t for t in (plan.tokenizer.pad_token_id, plan.tokenizer.eos_token_id) if t is not None), 0)
    wrapper = completion_head.CompletionLogps(model, chunk_size=cfg.train.chunk_size)
    wrapper._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP auto-wrap looks at the root
    mfu_scale = throughput.mfu_scale(model, accelerator.device, next(model.parameters()).dtype,
                                     cfg.train.peak_flops, accelerator.num_processes)
    optimizer = make_optimizer(cfg, model, accelerator.distributed_type.value)
    if accelerator.distributed_type.value == "DEEPSPEED":  # no dataloader to infer it from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    policy, optimizer = accelerator.prepare(wrapper, optimizer)
    rows.plan = throughput.batching_plan(cfg.train, model, policy, accelerator.device,
                                         fingerprint=plan.inputs["model"], lora=cfg.lora.enabled)
    if cfg.train.compile:  # after the measurement, which would otherwise compile no-grad graphs
        fast_paths.compile_body(model)
    if accelerator.is_main_process:
        console.print(rows.plan.describe(), soft_wrap=True)
    warmup = math.ceil(cfg.train.warmup_ratio * plan.total_steps)
    # not prepared: accelerate would step it once per process
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=warmup, total=plan.total_steps, kind=cfg.train.lr_scheduler))
    session = Session(cfg=cfg, accelerator=accelerator, policy=policy, optimizer=optimizer, scheduler=scheduler,
                      rows=rows, spec=plan.spec,
                      loss_kwargs=static_loss_kwargs(cfg, plan.alpha, plan.preferred_fraction), out=out,
                      fingerprint=plan.fingerprint, identity=plan.identity, units_per_micro=plan.units_per_micro,
                      steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps, mfu_scale=mfu_scale)
    if checkpoint is not None:
        checkpoints.restore(session, checkpoint)
    if accelerator.is_main_process:
        if plan.opening.note:
            console.print(plan.opening.note, soft_wrap=True)
        checkpoints.begin(out, plan.opening, is_main=True)  # the first change on disk
        outputs.mark_stage(out, "train")  # from here on `out` is recognisably a train run
        for stale in (out / "checkpoints").glob("*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        checkpoints.truncate_metrics(out / checkpoints.METRICS_FILE, session.state.step)
    accelerator.wait_for_everyone()
    return session


def loop(session: Session) -> None:
    """Optimizer steps to the end of the schedule, with progress, trackers and checkpoints."""
    from rdro_cli.progress import task_progress

    accelerator, cfg = session.accelerator, session.cfg
    progress = task_progress("loss", "speed")
    progress.disable = not accelerator.is_main_process
    tracking.start(accelerator, cfg)
    try:
        with progress:
            task = progress.add_task(f"train {cfg.loss.name}", total=session.total_steps,
                                     completed=session.state.step, loss="", speed="")
            training_loop.train_loop(session, progress, task)
    finally:
        tracking.finish(accelerator)


def save(plan: Plan, session: Session, started: float) -> Path:
    """`final/` (model or adapter, tokenizer, recipe, model card), then the manifest that marks the run done."""
    cfg, accelerator = plan.cfg, plan.accelerator
    final = checkpoints.save_final(session, plan.tokenizer, plan.data_manifest.get("dataset") or cfg.data.dataset,
                                   reference=plan.reference)
    if accelerator.is_main_process:
        counts = {"steps": session.state.step, "steps_per_epoch": plan.steps_per_epoch,
                  "train_units": plan.rows.units(), "processes": accelerator.num_processes,
                  "examples_per_step": plan.units_per_micro * accelerator.num_processes
                  * cfg.train.gradient_accumulation_steps}
        manifests.write_manifest(plan.out, stage="train", fingerprint=plan.fingerprint, inputs=plan.inputs,
                                 config=cfg.to_dict(), counts=counts, started=started, final=str(final),
                                 loss=cfg.loss.name, alpha=plan.alpha, lora=cfg.lora.enabled,
                                 identity=plan.identity, reference=plan.reference)
        console.print(f"train: {session.state.step} steps of {cfg.loss.name} -> {final}", soft_wrap=True)
    accelerator.wait_for_everyone()
    return plan.out
