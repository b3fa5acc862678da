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

import math
import shutil
import time
from functools import partial
from pathlib import Path

import torch

from rdro_cli.errors import UserError
from rdro_cli.lm import completion_head, fast_paths, fingerprints, loading, throughput
from rdro_cli.losses import registry
from rdro_cli.recipe import Recipe
from rdro_cli.store import checkpoints, manifests, outputs
from rdro_cli.training import tracking
from rdro_cli.training.inputs import check_reference, check_vocab, load_rows, read_inputs
from rdro_cli.training.loop import train_loop
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
    spec = registry.LOSSES[cfg.loss.name]
    if spec.needs_pairs and cfg.train.batch_size % 2:
        raise UserError(f"train.batch_size = {cfg.train.batch_size}: {cfg.loss.name} batches hold whole "
                        f"chosen/rejected pairs, so it must be even")

    # validate inputs
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
    fingerprint = checkpoints.run_fingerprint(identity)
    rows = load_rows(cfg, data_dir, logprobs_dir, logprobs_manifest, spec)
    preferred_fraction = data_manifest.get("preferred_fraction")
    alpha = resolve_loss_alpha(cfg, preferred_fraction)
    units_per_micro = cfg.train.batch_size // 2 if spec.needs_pairs else cfg.train.batch_size
    steps_per_epoch, total_steps = schedule(
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
    model = load_policy(cfg, accelerator.device, checkpoint)
    check_vocab(rows, model, data_dir)
    rows.device = accelerator.device
    rows.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    wrapper = completion_head.CompletionLogps(model, chunk_size=cfg.train.chunk_size)
    wrapper._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP auto-wrap looks at the root
    mfu_scale = throughput.mfu_scale(model, accelerator.device, next(model.parameters()).dtype,
                                     cfg.train.peak_flops, accelerator.num_processes)
    optimizer = make_optimizer(cfg, model, accelerator.distributed_type.value)
    if accelerator.distributed_type.value == "DEEPSPEED":  # no dataloader to infer it from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    policy, optimizer = accelerator.prepare(wrapper, optimizer)
    rows.plan = throughput.batching_plan(cfg.train, model, policy, accelerator.device, fingerprint=inputs["model"],
                                         lora=cfg.lora.enabled)
    if cfg.train.compile:  # after the measurement, which would otherwise compile no-grad graphs
        fast_paths.compile_body(model)
    if accelerator.is_main_process:
        console.print(rows.plan.describe(), soft_wrap=True)
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    # not prepared: accelerate would step it once per process
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=warmup, total=total_steps, kind=cfg.train.lr_scheduler))
    session = Session(cfg=cfg, accelerator=accelerator, policy=policy, optimizer=optimizer, scheduler=scheduler,
                      rows=rows, spec=spec, loss_kwargs=static_loss_kwargs(cfg, alpha, preferred_fraction),
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
            train_loop(session, progress, task)
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
        manifests.write_manifest(out, stage="train", fingerprint=fingerprint, inputs=inputs, config=cfg.to_dict(),
                                 counts=counts, started=started, final=str(final), loss=cfg.loss.name, alpha=alpha,
                                 lora=cfg.lora.enabled, identity=identity, reference=reference)
        console.print(f"train: {session.state.step} steps of {cfg.loss.name} -> {final}", soft_wrap=True)
    accelerator.wait_for_everyone()
    return out
