"""Batches of token rows: token-budget batches over length-sorted rows, length groups inside a micro-batch
(split only where the padding saved is worth one more forward), right-padded collation with the completion
mask, KTO's mismatched prompt/completion ids, length buckets, and packing rows into one with restarting
position ids.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
