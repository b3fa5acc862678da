"""Vectorised per-row decisions of `prepare` over whole columns (numpy, no Python loop over rows):
the prompt-grouped test split, exact duplicates and the fixed KL partners."""

from __future__ import annotations

import numpy as np

from rdro_cli.errors import UserError


def grouped_test_split(prompt_hash: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) source-row indices, ascending; rows sharing a prompt land in the same split.

    Prompt groups are visited in a seeded random order and whole groups go to the test split until it
    holds at least max(1, round(n * test_fraction)) rows, so with distinct prompts the test split has
    exactly that many rows (as a per-row split would) and no prompt is ever in both splits.
    """
    n = len(prompt_hash)
    n_test = max(1, round(n * test_fraction))
    groups, inverse = np.unique(prompt_hash, return_inverse=True)
    if len(groups) < 2:  # no test_fraction helps: a whole prompt group goes to one split
        found = "1 row" if n < 2 else "1 distinct prompt"
        raise UserError(f"dataset has only {found}: a held-out test split needs at least 2 distinct prompts (rows "
                        f"that share a prompt stay in one split); add rows with other prompts, or give the source "
                        f"a test split of its own (data.test_split, e.g. a .json file of "
                        f'{{"train": [...], "test": [...]}})')
    if n - n_test < 1:
        raise UserError(f"dataset has only {n} rows: test_fraction {test_fraction} leaves none for training; "
                        f"lower data.test_fraction")
    sizes = np.bincount(inverse, minlength=len(groups))
    order = np.random.default_rng(seed).permutation(len(groups))
    taken = int(np.searchsorted(np.cumsum(sizes[order]), n_test)) + 1
    in_test = np.zeros(len(groups), dtype=bool)
    in_test[order[:taken]] = True
    test_rows = in_test[inverse]
    if test_rows.all():
        raise UserError(f"dataset has only {len(groups)} distinct prompts: test_fraction {test_fraction} takes "
                        f"every prompt group into the test split; lower data.test_fraction")
    return np.flatnonzero(~test_rows), np.flatnonzero(test_rows)


def duplicates(keys: np.ndarray) -> np.ndarray:
    """True for each row whose key equals an earlier row's (the first occurrence is not a duplicate)."""
    first = np.unique(keys, return_index=True)[1]
    mask = np.ones(len(keys), dtype=bool)
    mask[first] = False
    return mask


def kl_partners(prompt_hash: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pairing for KTO's KL term: each row gets the completion of another row with a different prompt.

    Rows are visited in a seeded permutation and paired with the next row in it; when that one shares the
    prompt, the next after it, up to 62 steps (the same rule as one loop per row, done one step at a time
    for all rows at once).
    """
    n = len(prompt_hash)
    order = np.random.default_rng(seed).permutation(n)
    position = np.arange(n)
    partner_at = order[(position + 1) % n]  # partner of row order[position]
    pending = prompt_hash[partner_at] == prompt_hash[order]
    for step in range(2, min(n, 64)):
        if not pending.any():
            break
        positions = np.flatnonzero(pending)
        partner_at[positions] = order[(positions + step) % n]
        pending[positions] = prompt_hash[partner_at[positions]] == prompt_hash[order[positions]]
    partners = np.empty(n, dtype=np.int64)
    partners[order] = partner_at
    return partners
