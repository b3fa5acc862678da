"""logprobs: the reference model's completion log-probs for every row, once, in bulk.

For each split of `<run>/data` this writes `<run>/logprobs/<split>.safetensors` with a float32
`ref_logps` [rows] in row order (and `ref_kl_logps` for KTO's fixed mismatched pairs). Rows are cut
into shards of `logprobs.shard_rows`; each shard is batched by a token budget over length-sorted rows
and written atomically to `<out>.partial/`, so a killed run restarted with the same command computes
only the missing shards. Under `accelerate launch` each rank takes every N-th shard; the main process
assembles the files in row order.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rdro_cli.errors import UserError
from rdro_cli.lm import batching, completion_head, fingerprints, loading
from rdro_cli.losses.registry import LOSSES
from rdro_cli.progress import console
from rdro_cli.recipe import Recipe
from rdro_cli.store import digests, diskspace, durable, integrity, manifests, outputs


def _load_rows(data_dir: Path) -> dict:
    import datasets

    data = datasets.load_from_disk(str(data_dir))
    return {name: split.select_columns(["input_ids", "completion_start", "kl_partner"]) for name, split in
            data.items()}


def _shard_sequences(split, rows: range, with_kl: bool, max_length: int) -> list[tuple[list[int], int]]:
    """(ids, completion_start) for the rows of one shard, then their mismatched pairs when asked.

    Reads only the shard's rows (and their KL partners), not whole columns, so the cost per shard does not
    grow with the dataset."""
    shard = split[rows.start:rows.stop]
    ids, starts = shard["input_ids"], shard["completion_start"]
    sequences = list(zip(ids, starts, strict=True))
    if with_kl:
        partners = split.select(shard["kl_partner"])
        partner_ids, partner_starts = partners["input_ids"], partners["completion_start"]
        for k in range(len(ids)):
            sequences.append(batching.mismatched_ids(ids[k][: starts[k]], partner_ids[k][partner_starts[k]:],
                                                     max_length))
    return sequences


@torch.inference_mode()
def _score(model, sequences, cfg: Recipe, pad_id: int, device, on_batch) -> torch.Tensor:
    """Completion log-prob sums of `sequences`, batched by token budget over length-sorted rows."""
    scores = torch.empty(len(sequences), dtype=torch.float32)
    lengths = [len(ids) for ids, _ in sequences]
    for batch in batching.token_budget_batches(lengths, cfg.logprobs.max_tokens_per_batch):
        input_ids, attention_mask, completion_mask = batching.collate(
            [sequences[i][0] for i in batch], [sequences[i][1] for i in batch], pad_id)
        logps = completion_head.completion_logps(model, input_ids.to(device), attention_mask.to(device),
                                          completion_mask.to(device), chunk_size=cfg.logprobs.chunk_size)
        scores[batch] = logps.float().cpu()
        on_batch(len(batch), sum(lengths[i] for i in batch))
    return scores


def _plan(splits: dict, shard_rows: int) -> list[tuple[str, int, range]]:
    """Every (split, shard index, row range), in a fixed order every rank agrees on."""
    plan = []
    for name, split in splits.items():
        for k, first in enumerate(range(0, len(split), shard_rows)):
            plan.append((name, k, range(first, min(first + shard_rows, len(split)))))
    return plan


def _reusable_partial(partial: Path, fingerprint: str, force: bool) -> bool:
    """True when `partial` holds shards of the same inputs; refuses one made for other inputs."""
    plan_file = partial / "plan.json"
    if force or not plan_file.is_file():
        return False
    if json.loads(plan_file.read_text()).get("fingerprint") != fingerprint:
        raise UserError(f"{partial}: a partial logprobs run for other inputs (data, model or settings) is "
                        f"here; re-run with --force to discard it")
    return True


def _create_partial(partial: Path, fingerprint: str) -> None:
    if partial.is_dir() and not (partial / "plan.json").is_file() and any(partial.iterdir()):
        raise UserError(f"{partial}: holds files rdro did not write (it is where logprobs keeps its shards); "
                        f"move them away or choose another --out")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "shards").mkdir(parents=True)
    durable.write_text_atomic(partial / "plan.json", json.dumps({"fingerprint": fingerprint}))


def _require_finite(name: str, tensors: dict, dtype: str) -> None:
    """Refuses to publish NaN / inf log-probs: training on them would turn every loss into NaN."""
    for key, values in tensors.items():
        bad = integrity.nonfinite_rows(values)
        if bad:
            raise UserError(f"logprobs: the reference model gave NaN/inf {key} for {name} "
                            f"{integrity.describe_rows(bad, len(values))}; nothing was published. With "
                            f"model.dtype={dtype} this is most likely float16 overflow: re-run with --set "
                            f"model.dtype=bfloat16 (or float32) --force; if it persists, check the model's weights")


def _assemble(partial: Path, plan, splits: dict, with_kl: bool, out: Path, **manifest) -> None:
    need = sum(len(split) * 4 * (2 if with_kl else 1) + 1024 for split in splits.values())
    with diskspace.writing(out, need), durable.atomic_dir(out) as tmp:
        for name, split in splits.items():
            parts = [load_file(partial / "shards" / f"{name}-{k:05d}.safetensors") for s, k, _ in plan if s == name]
            tensors = {"ref_logps": torch.cat([p["ref_logps"] for p in parts]).contiguous()}
            if with_kl:
                tensors["ref_kl_logps"] = torch.cat([p["ref_kl_logps"] for p in parts]).contiguous()
            assert tensors["ref_logps"].shape[0] == len(split)
            _require_finite(name, tensors, manifest["config"]["model"]["dtype"])
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        manifests.write_manifest(tmp, stage="logprobs", **manifest)
    shutil.rmtree(partial, ignore_errors=True)


def run(cfg: Recipe, *, data: Path | None = None, out: Path | None = None, force: bool = False) -> Path:
    from accelerate import PartialState

    started = time.time()
    # cpu=True lets `accelerate launch --multi_gpu --num_processes N` (torchrun) run N CPU ranks on
    # gloo; accelerate's own `--cpu` flag starts a single process unless MPI is set up.
    state = PartialState(cpu=not torch.cuda.is_available())
    data = Path(data or cfg.run_dir / "data")
    out = Path(out or cfg.run_dir / "logprobs")
    model_name = cfg.model.ref_name or cfg.model.name
    outputs.claim(out, "logprobs", inputs=[data, *outputs.local_paths(model_name)], is_main=state.is_main_process,
                  share=outputs.broadcast_from_main(state))
    data_manifest = manifests.require_input(data, "prepare", rerun="rdro prepare")
    if not model_name:
        raise UserError("no reference model: pass --model or set model.ref_name / model.name")
    tokenizer = loading.load_tokenizer(model_name, revision=cfg.model.revision or None,
                                        trust_remote_code=cfg.model.trust_remote_code)
    fingerprints.require_tokenizer(tokenizer, data_manifest["inputs"].get("tokenizer"), model=model_name, data=data)
    with_kl = LOSSES[cfg.loss.name].needs_kl  # KTO's mismatched pairs
    inputs = {"data": data_manifest["fingerprint"],
              "model": fingerprints.model_fingerprint(model_name, revision=cfg.model.revision or None)}
    settings = {"dtype": cfg.model.dtype, "kl": with_kl, "max_tokens_per_batch": cfg.logprobs.max_tokens_per_batch,
                "shard_rows": cfg.logprobs.shard_rows, "max_length": cfg.data.max_length}
    fingerprint = digests.fingerprint_json({"inputs": inputs, "settings": settings})
    if not force and manifests.is_done(out, fingerprint):
        if state.is_main_process:
            console.print(f"logprobs: {out} is up to date (use --force to recompute)", soft_wrap=True)
        return out
    outputs.refuse_replacing_used(out, "logprobs", fingerprint, force=force)

    partial = out.with_name(out.name + ".partial")
    reuse = _reusable_partial(partial, fingerprint, force)
    splits = _load_rows(data)
    plan = _plan(splits, cfg.logprobs.shard_rows)
    mine = [(name, k, rows) for i, (name, k, rows) in enumerate(plan) if i % state.num_processes == state.process_index]
    todo = [(name, k, rows) for name, k, rows in mine
            if not (reuse and (partial / "shards" / f"{name}-{k:05d}.safetensors").is_file())]
    # Load before creating the work dir, so a model that cannot load leaves nothing behind.
    model = loading.load_model(model_name, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                                allow_pickle=cfg.model.allow_pickle, device=state.device,
                                revision=cfg.model.revision or None) if todo else None
    state.wait_for_everyone()
    if state.is_main_process and not reuse:
        _create_partial(partial, fingerprint)
    state.wait_for_everyone()

    tokens_done = 0
    if todo:
        tokenizer_pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        from rdro_cli.progress import task_progress

        total_rows = sum(len(rows) * (2 if with_kl else 1) for _, _, rows in todo)
        with task_progress("rate") as progress:
            task = progress.add_task(f"logprobs (rank {state.process_index})" if state.num_processes > 1
                                     else "logprobs", total=total_rows, rate="")
            begin = time.time()

            def on_batch(n_rows: int, n_tokens: int) -> None:
                nonlocal tokens_done
                tokens_done += n_tokens
                elapsed = max(time.time() - begin, 1e-9)
                done = progress.tasks[0].completed + n_rows
                progress.update(task, advance=n_rows,
                                rate=f"{done / elapsed:.1f} rows/s {tokens_done / elapsed:.0f} tok/s")

            for name, k, rows in todo:
                sequences = _shard_sequences(splits[name], rows, with_kl, cfg.data.max_length)
                scores = _score(model, sequences, cfg, tokenizer_pad, state.device, on_batch)
                tensors = {"ref_logps": scores[: len(rows)].contiguous()}
                if with_kl:
                    tensors["ref_kl_logps"] = scores[len(rows):].contiguous()
                shard = partial / "shards" / f"{name}-{k:05d}.safetensors"
                tmp = shard.with_name(f".{shard.name}.tmp")
                with diskspace.writing(shard, sum(t.numel() * 4 for t in tensors.values()) + 1024):
                    save_file(tensors, str(tmp))
                durable.publish_file(tmp, shard)  # a shard exists only when complete, and durably
        del model
    state.wait_for_everyone()
    if state.is_main_process:
        import pyarrow.compute as pc  # token counts from the Arrow list offsets, not a Python list per row

        counts = {name: {"rows": len(split), "tokens": int(pc.sum(pc.list_value_length(
            split.data.column("input_ids"))).as_py() or 0)} for name, split in splits.items()}
        _assemble(partial, plan, splits, with_kl, out, fingerprint=fingerprint, inputs=inputs,
                  config=cfg.to_dict(), counts=counts, started=started, model=model_name,
                  processes=state.num_processes, shards=len(plan), kl=with_kl)
        console.print(f"logprobs: wrote {', '.join(f'{n}.safetensors' for n in splits)} to {out}", soft_wrap=True)
    state.wait_for_everyone()
    return out
