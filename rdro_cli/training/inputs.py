"""The training split as the loop needs it: token ids (memory-mapped), labels, reference log-probs, pairs for the
pair losses, KTO's mismatched pairs; and the checks on the inputs train reads (their manifests, the
reference log-probs' model, the vocabulary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rdro_cli.errors import UserError
from rdro_cli.lm import batching, fingerprints, throughput
from rdro_cli.losses.registry import UNPAIRED, LossSpec, spoken_list
from rdro_cli.recipe import Recipe
from rdro_cli.store import integrity, manifests


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
    plan: throughput.BatchingPlan | None = None  # None: length groups at batching.length_groups' default cost

    def units(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.label)

    def rows_of(self, units: np.ndarray) -> np.ndarray:
        """Row indices of some units; a DPO micro-batch is its chosen rows followed by its rejected rows."""
        return np.concatenate([self.pairs[units, 0], self.pairs[units, 1]]) if self.pairs is not None else units

    def batch(self, rows: np.ndarray, max_tokens: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """Length groups of `rows` (padded little, see batching.length_groups) and the permutation that
        puts their concatenated results back in the order of `rows`."""
        ids = self.ids[rows.tolist()]["input_ids"]
        starts = self.completion_start[rows].tolist()
        plan = self.plan or throughput.BatchingPlan(pack=False, group_cost=512, bucket=False, source="default")
        if plan.pack:  # one row, results already in order
            return torch.arange(len(ids), device=self.device), batching.pack(ids, starts, self.pad_id,
                                                                             bucket=plan.bucket).to(self.device)
        groups = batching.length_groups([len(r) for r in ids], max_tokens=max_tokens, group_cost=plan.group_cost)
        tensors = [batching.collate([ids[i] for i in g], [starts[i] for i in g], self.pad_id, bucket=plan.bucket)
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
        pairs = [batching.mismatched_ids(row[: self.completion_start[i]], other[self.completion_start[j]:],
                                         self.kl_max_length)
                 for row, other, i, j in zip(ids, partner_ids, rows, partners, strict=True)]
        tensors = batching.collate([p[0] for p in pairs], [p[1] for p in pairs], self.pad_id)
        return tuple(t.to(self.device) for t in tensors)


def read_inputs(cfg: Recipe, data_dir: Path, logprobs_dir: Path, spec: LossSpec) -> tuple[dict, dict | None]:
    data_manifest = manifests.require_input(data_dir, "prepare", rerun="rdro prepare")
    logprobs_manifest = None  # a reference-free loss (pmle) reads no logprobs artifact
    if spec.needs_ref:
        logprobs_manifest = manifests.require_input(logprobs_dir, "logprobs", rerun="rdro logprobs")
        manifests.check_inputs_match(logprobs_dir, logprobs_manifest, {"data": data_manifest["fingerprint"]},
                                     rerun="rdro logprobs")
    if spec.needs_pairs and not data_manifest.get("paired"):
        raise UserError(f"{data_dir}: {cfg.loss.name} needs paired data (prompt/chosen/rejected); this dataset "
                        f"is unpaired; use loss.name = {spoken_list(UNPAIRED)}, or prepare a paired dataset")
    return data_manifest, logprobs_manifest


def load_rows(cfg: Recipe, data_dir: Path, logprobs_dir: Path, logprobs_manifest: dict | None,
              spec: LossSpec) -> TrainRows:
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
    pairs = pair_rows(columns["pair_id"], label) if spec.needs_pairs else None
    if pairs is not None and len(pairs) == 0:
        raise UserError(f"{data_dir}: {cfg.loss.name} needs paired data (prompt/chosen/rejected); no complete "
                        f"chosen/rejected pair is left in the training split")
    kl_max_length = (logprobs_manifest or {}).get("config", {}).get("data", {}).get("max_length", cfg.data.max_length)
    return TrainRows(ids=split.select_columns(["input_ids"]), completion_start=columns["completion_start"],
                     label=label, kl_partner=columns["kl_partner"], ref_logps=tensors["ref_logps"].float(),
                     ref_kl_logps=tensors.get("ref_kl_logps"), pairs=pairs, kl_max_length=int(kl_max_length))


def check_reference(cfg: Recipe, logprobs_dir: Path, logprobs_manifest: dict | None,
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
        expected = fingerprints.model_fingerprint(cfg.model.ref_name, revision=cfg.model.revision or None)
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


def pair_rows(pair_id: np.ndarray, label: np.ndarray) -> np.ndarray:
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


def check_vocab(rows: TrainRows, model, data_dir: Path) -> None:
    import pyarrow.compute as pc

    # prepare records the largest id; scanning every token instead maps the whole column (GBs at 1M rows)
    manifest = json.loads((Path(data_dir) / manifests.MANIFEST).read_text())
    largest = manifest.get("counts", {}).get("train", {}).get("max_token_id")
    if largest is None:
        largest = pc.max(pc.list_flatten(rows.ids.data.column("input_ids"))).as_py()
    vocab = model.get_input_embeddings().num_embeddings
    if largest is not None and largest >= vocab:
        raise UserError(f"{data_dir}: token id {largest} is outside the policy's vocabulary ({vocab}); the data "
                        f"was tokenised for another model: re-run `rdro prepare --model <policy>`")
