"""What every loss returns and what the registry says about it (shared by losses.py and losses_pairs.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


class LossOutput(NamedTuple):
    """Per-example losses (their plain mean is the objective) and statistics to log."""

    losses: torch.Tensor
    stats: dict[str, torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs from the data pipeline besides log-ratios and labels.

    ``state`` names the running state the training loop keeps for it across steps and checkpoints
    (``"bco_delta"``: BCO's running mean; ``"kldo_ema"``: KLDO's moving average of ``exp(beta r)``).
    ``batch_level`` losses read statistics of the global batch (all processes, one micro-step).
    """

    fn: Callable[..., LossOutput]
    needs_pairs: bool = False  # chosen/rejected pairs instead of single labelled rows (DPO, BPO, PMLE)
    needs_kl: bool = False  # log-ratios of mismatched prompt/completion pairs (KTO's reference point)
    needs_ref: bool = True  # reference log-probs (a `logprobs` artifact); False: the loss reads s_pol only
    state: str = ""  # running state carried across steps and checkpoints ("" = none)
    batch_level: bool = False  # uses statistics of the global batch, so DDP must gather them

    @property
    def stateful(self) -> bool:
        return bool(self.state)
