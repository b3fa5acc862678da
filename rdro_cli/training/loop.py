"""The training loop: which units each optimizer step takes, a micro-step's forward/loss/backward, an optimizer
step with clipping and its metrics, and the loop with its stop requests (SIGINT/SIGTERM finish the step,
checkpoint and stop), metrics rows, trackers and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch

from rdro_cli.errors import UserError
from rdro_cli.lm import batching, throughput
from rdro_cli.losses import kto_bco
from rdro_cli.losses import state as loss_state
from rdro_cli.training import checkpoints, tracking
from rdro_cli.training.setup import Session


@contextlib.contextmanager
def stop_requests() -> Iterator[dict]:
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


def step_units(session: Session, epoch: int, position: int) -> np.ndarray:
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
        kwargs["kl_ref_point"] = extra["kl_ref_point"] = kto_bco.kto_ref_point(accelerator.gather(kl_logratios))
    restore, groups = rows_data.batch(rows, session.cfg.train.max_tokens_per_batch)
    logratios = session.policy(groups)[restore] - rows_data.ref_logps[index].to(accelerator.device)
    labels = torch.from_numpy(rows_data.label[rows]).to(accelerator.device)
    gathered = accelerator.gather(torch.stack([logratios.detach(), labels.float()], dim=1))
    loss_state.before_loss(spec, session.state, kwargs, gathered, session.cfg.loss)  # BCO's delta, KLDO's m
    if spec.needs_pairs:
        half = len(rows) // 2
        output = spec.fn(logratios[:half], logratios[half:], **kwargs)
    else:
        output = spec.fn(logratios, labels, **kwargs)
    accelerator.backward(output.losses.sum() * loss_scale)
    tokens = batching.batch_tokens(groups)
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
    loss_state.for_statistics(session.spec, session.state, stat_kwargs)
    if session.spec.needs_pairs:
        stats = session.spec.fn(logratios[labels], logratios[~labels], **stat_kwargs).stats
    else:
        stats = session.spec.fn(logratios, labels, **stat_kwargs).stats
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": totals[1].item(),
            **{name: value.item() for name, value in stats.items()}}


def train_loop(session: Session, progress, task) -> None:
    accelerator, cfg, state = session.accelerator, session.cfg, session.state
    metrics_path = session.out / checkpoints.METRICS_FILE
    with stop_requests() as stop:
        while state.step < session.total_steps:
            began = time.perf_counter()
            record = _optimizer_step(session, step_units(session, state.epoch, state.position))
            state.step += 1
            state.position += 1
            epoch_progress = state.epoch + state.position / session.steps_per_epoch
            if state.position == session.steps_per_epoch:
                state.epoch, state.position = state.epoch + 1, 0
                loss_state.at_epoch_end(session.spec, state)  # KLDO's authors restart its moving average
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
