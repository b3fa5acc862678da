"""What every loss function returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossOutput(NamedTuple):
    """Per-example losses (their plain mean is the objective) and statistics to log."""

    losses: torch.Tensor
    stats: dict[str, torch.Tensor]
