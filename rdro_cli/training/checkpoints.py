"""A training run's output directory: which run it holds (resume it, start over, or refuse), its checkpoints
written atomically and restored, its metrics rows, and its final model.

    <out>/metrics.jsonl                  one row per optimizer step (rows after a resumed checkpoint rewritten)
    <out>/checkpoints/step-XXXXXXX/      model/, optimizer.pt (or accelerate/ when sharded), scheduler.pt and,
                                         written last, state.json: a checkpoint without it is not complete
    <out>/final/                         the model or LoRA adapter, tokenizer, recipe.toml, model card

`session` below is train's Session: the recipe (`cfg`), the accelerator, the prepared policy, optimizer and
scheduler, the run's `state` (TrainState), `out`, `fingerprint` / `identity`, `loss_kwargs` and
`last_checkpoint`. Every process calls these functions; only the main one writes files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from rdro_cli.errors import UserError
from rdro_cli.store import digests, diskspace, durable, integrity, manifests
from rdro_cli.training import model_card

CHECKPOINT = re.compile(r"^step-(\d{7})$")
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint's state.json."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next step
    position: int = 0  # index of the next step within its epoch
    bco_delta: float = 0.0
    bco_count: int = 0
    kldo_ema: float = 0.0  # 0 = not started (the authors' convention); reset at every epoch's start


def run_fingerprint(identity: dict) -> str:
    return digests.fingerprint_json(identity)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs between two identities."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            name = f"{prefix}{key}"
            if name.startswith("inputs."):  # fingerprints: say what changed, not the hashes
                found.append(f"{name} (another {name.split('.', 1)[1]} than the run was started with)")
            else:
                found.append(f"{name}: {a!r} -> {b!r}")
    return found


def complete_checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    found = [p for p in folder.iterdir() if CHECKPOINT.match(p.name) and (p / STATE_FILE).is_file()] \
        if folder.is_dir() else []
    return sorted(found, key=lambda p: p.name)


@dataclass
class Opening:
    """What `open_output` decided, before anything on disk changed; `begin` carries it out.

    action: "done" (nothing to train), "fresh" (train from the policy's initialisation) or "resume" (from
    `checkpoint`). `replaces`: a fresh start removes what `out` holds (--force, or a run killed before its
    first checkpoint). `reopens`: a finished run trains longer, so its manifest goes (it is unfinished again).
    `note`: what to tell the user about the decision (stderr), if anything.
    """

    action: str
    checkpoint: Path | None = None
    replaces: bool = False
    reopens: bool = False
    note: str | None = None


def _refuse_other_run(where: Path, recorded: dict | None, identity: dict, what: str) -> None:
    if recorded is None:  # written before rdro recorded it: only the fingerprint is known
        raise UserError(f"{where}: {what} with another recipe or other inputs; --resume needs the same "
                        f"settings (or pass --force to start over)")
    changed = _differences(recorded, identity)
    raise UserError(f"{where}: {what} with other settings; --resume cannot change "
                    f"{'; '.join(changed)} (only train.max_steps/epochs upward, logging, checkpoint cadence "
                    f"and trackers may change); restore them, or pass --force to start over")


def _read_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{checkpoint / STATE_FILE}: unreadable ({err}); delete {checkpoint} to resume from the "
                        f"checkpoint before it, or pass --force to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"{checkpoint / STATE_FILE}: not a checkpoint state written by rdro; delete {checkpoint} "
                        f"to resume from the checkpoint before it, or pass --force to start over")
    return state


def open_output(out: Path, identity: dict, total_steps: int, *, resume: bool, force: bool,
                processes: int = 1) -> Opening:
    """Decides between "done", a fresh start and resuming from a checkpoint; refuses to mix runs.

    Only reads: every refusal comes before anything in `out` changes (`begin` makes the changes, once every
    other check of the stage has passed too). A resumed run may train longer (train.max_steps / epochs
    upward) and change what does not touch the weights (logging, checkpoint cadence, trackers); anything
    else is refused, naming every key that differs. `--resume` never starts a run over that has a `final/`:
    with no checkpoint to continue from it refuses and names --force.
    """
    fingerprint = run_fingerprint(identity)
    manifest = manifests.read_manifest(out)
    has_anything = out.is_dir() and any(out.iterdir())
    if force:
        return Opening("fresh", replaces=has_anything)
    checkpoints = complete_checkpoints(out)
    finished = manifest is not None
    if finished:
        trained = manifest.get("counts", {}).get("steps")
        if manifest.get("fingerprint") != fingerprint:
            _refuse_other_run(out, manifest.get("identity"), identity, "holds a finished training run")
        if trained == total_steps:
            return Opening("done")
        if not resume:
            raise UserError(f"{out}: holds a finished run of {trained} steps and {total_steps} are asked for; "
                            f"pass --resume to continue it, or --force to start over")
    elif not resume:
        if out.is_dir() and (checkpoints or (out / METRICS_FILE).exists() or (out / "final").exists()):
            raise UserError(f"{out}: holds an unfinished training run; pass --resume to continue it or --force "
                            f"to start over")
        return Opening("fresh", replaces=has_anything)
    if not checkpoints:
        if (out / "final").exists():  # a model is here: starting over would silently replace it
            what = f"a finished run of {manifest.get('counts', {}).get('steps')} steps" if finished \
                else "a run with a final/ model"
            raise UserError(f"{out}: holds {what} but no checkpoint to continue from (no complete "
                            f"checkpoint in checkpoints/: train.save_every = 0, or it was deleted), so --resume cannot "
                            f"train it further; "
                            f"pass --force to retrain from scratch (this replaces {out / 'final'}), or keep "
                            f"checkpoints/ next time (train.keep_checkpoints >= 1)")
        note = f"train: --resume found no checkpoint in {out}; starting from step 0" if has_anything \
            else f"train: --resume found no run in {out}; starting a new one"
        return Opening("fresh", replaces=has_anything, note=note)
    last = checkpoints[-1]
    state = _read_state(last)
    if state.get("fingerprint") != fingerprint:
        _refuse_other_run(last, state.get("identity"), identity, "was written by a run")
    if state["step"] > total_steps:
        raise UserError(f"{last}: the run has trained {state['step']} steps, more than the "
                        f"{total_steps} asked for; --resume can only train longer (raise train.max_steps)")
    written_by = len(state.get("rng") or [])
    if written_by and written_by != processes:
        raise UserError(f"{last}: written by {written_by} processes, resumed with {processes}; resume with the "
                        f"same launch settings")
    damaged = integrity.checkpoint_problem(last, STATE_FILE)
    if damaged:
        raise UserError(f"{damaged}; delete {last} to resume from the checkpoint before it, or pass "
                        f"--force to start over")
    return Opening("resume", checkpoint=last, reopens=finished)


def begin(out: Path, opening: Opening, *, is_main: bool) -> None:
    """Carries out what `open_output` decided, after every check of the stage has passed (main process)."""
    if not is_main:
        return
    if opening.replaces and out.exists():  # `outputs.claim` made sure `out` holds nothing but a train run of rdro's
        shutil.rmtree(out)
    if opening.reopens:  # training on: the run is unfinished again until its new manifest
        (out / manifests.MANIFEST).unlink(missing_ok=True)
        durable.fsync_dir(out)


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def restore(session, checkpoint: Path) -> None:
    """Optimizer, schedule, RNG, data position and loss state (the weights were loaded with the policy)."""
    accelerator = session.accelerator
    body = json.loads((checkpoint / STATE_FILE).read_text())
    if (checkpoint / "accelerate").is_dir():
        accelerator.load_state(str(checkpoint / "accelerate"))
    else:
        session.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    session.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    _set_rng_state(body["rng"][accelerator.process_index])
    session.state = TrainState(**{k: body[k] for k in vars(TrainState()) if k in body})  # older: no kldo_ema
    session.last_checkpoint = checkpoint


def _save_model(session, directory: Path) -> None:
    """Weights (full model) or adapter (LoRA) as safetensors; every process takes part in gathering them."""
    accelerator = session.accelerator
    state_dict = accelerator.get_state_dict(session.policy)  # gathers FSDP / ZeRO-3 shards
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(session.policy).model
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        model.save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True)


def save(session) -> Path:
    """Writes checkpoints/step-N; a full disk is one line, and the checkpoints before it stay intact."""
    final = session.out / "checkpoints" / f"step-{session.state.step:07d}"
    with diskspace.writing(final, partial(_checkpoint_size, session)):
        return _write_checkpoint(session)


def _checkpoint_size(session) -> int:
    """The room a checkpoint takes: the last one's size, or trainable weights and two Adam moments."""
    if session.last_checkpoint is not None:
        return diskspace.tree_size(session.last_checkpoint)
    return 3 * sum(p.numel() * p.element_size() for p in session.policy.parameters() if p.requires_grad)


def _write_checkpoint(session) -> Path:
    from accelerate.utils import DistributedType, gather_object

    accelerator, state = session.accelerator, session.state
    final = session.out / "checkpoints" / f"step-{state.step:07d}"
    tmp = final.with_name(f"{final.name}.tmp-save")  # one name every process agrees on
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_model(session, tmp / "model")
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        accelerator.save_state(str(tmp / "accelerate"))  # sharded optimizer state: every process writes its part
    elif accelerator.is_main_process:
        _torch_save(session.optimizer.state_dict(), tmp / "optimizer.pt")
    rng = gather_object([_rng_state()])
    if accelerator.is_main_process:
        _torch_save(session.scheduler.state_dict(), tmp / "scheduler.pt")
        body = {"fingerprint": session.fingerprint, "identity": session.identity, **vars(state), "rng": rng,
                integrity.FILES_KEY: integrity.tree_digests(tmp, exclude=(STATE_FILE,))}  # --resume checks them
        (tmp / STATE_FILE).write_text(json.dumps(body))  # last: its presence marks the checkpoint complete
        durable.fsync_tree(tmp)
        if (session.out / METRICS_FILE).is_file():  # the rows up to this step survive a crash with it
            durable.fsync_file(session.out / METRICS_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        durable.fsync_dir(final.parent)
        for old in complete_checkpoints(session.out)[: -session.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    session.last_checkpoint = final
    return final


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as handle:  # through a file object, so a full disk surfaces as its OSError
        torch.save(obj, handle)


def truncate_metrics(path: Path, step: int) -> None:
    """Keeps the rows of steps <= `step`: a resumed run rewrites the ones after its checkpoint."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        durable.write_text_atomic(path, "".join(line + "\n" for line in kept))


def append_metrics(path: Path, row: dict) -> None:
    line = (json.dumps(row) + "\n").encode()
    with diskspace.writing(path, 4096), open(path, "ab", buffering=0) as handle:  # unbuffered: we see each write
        size = handle.seek(0, os.SEEK_END)
        try:
            written = 0
            while written < len(line):
                written += handle.write(line[written:])
        except OSError:  # never leave half a row (disk full): cut back to the last whole one
            handle.truncate(size)
            raise


def save_final(session, tokenizer, dataset: str, *, reference: dict | None = None) -> Path:
    final = session.out / "final"
    if not session.accelerator.is_main_process:
        _save_model(session, final)  # only takes part in gathering the weights
    else:
        # the weights (as the last checkpoint holds them) and the tokenizer files the model came with
        need = diskspace.tree_size(session.last_checkpoint / "model") + diskspace.tree_size(
            session.cfg.model.name, skip_suffixes=(".safetensors", ".bin", ".pt")) if session.last_checkpoint else None
        with diskspace.writing(final, need), durable.atomic_dir(final) as tmp:
            _save_model(session, tmp)
            tokenizer.save_pretrained(str(tmp))
            (tmp / "recipe.toml").write_text(session.cfg.to_toml(), encoding="utf-8")
            # after the weights: replaces the empty template peft writes next to an adapter
            metadata = model_card.training_metadata(
                session.cfg, adapter=session.cfg.lora.enabled, steps=session.state.step, dataset=dataset,
                alpha=session.loss_kwargs.get("alpha"), processes=session.accelerator.num_processes,
                base_fingerprint=session.identity["inputs"]["model"], reference=reference)
            model_card.write(tmp, metadata, name=session.out.resolve().parent.name)
    session.accelerator.wait_for_everyone()
    return final
