"""The loss registry: everything rdro knows about a loss, in its one entry.

An entry says which function computes the loss (resolved on first use, so this module, and with it the
recipe and `rdro validate`, imports no torch), its display name, the `loss.*` recipe keys it reads and the
function argument each becomes, its data shape (single labelled rows or chosen/rejected pairs), whether it
needs reference log-probs and KTO's mismatched pairs, and the running state the training loop keeps for it
(the state's update rules live in `losses.state`). The recipe's `loss.name` choices, train's loss arguments,
`logprobs`' mismatched pairs, the model card and the report's recipe table all read it from here: adding a
loss is its function, its entry, its tests and its docs/losses.md section.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LossSpec:
    """One loss. ``target`` is the function or its "module:function" path.

    ``keys`` pairs each `loss.*` recipe key the loss reads with the function argument it is passed as (None:
    read by its running state, not passed). ``state`` names the running state the training loop keeps across
    steps and checkpoints (``"bco_delta"``: BCO's running mean; ``"kldo_ema"``: KLDO's moving average of
    ``exp(beta r)``). ``batch_level`` losses read statistics of the global batch (all processes, one
    micro-step). ``preferred_fraction``: the function takes the training split's preferred fraction.
    ``resolved_alpha``: `loss.alpha` may be "auto" and is resolved from that fraction before the call.
    """

    target: Callable | str
    display: str = ""
    keys: tuple[tuple[str, str | None], ...] = ()
    needs_pairs: bool = False  # chosen/rejected pairs instead of single labelled rows (DPO, BPO, PMLE)
    needs_kl: bool = False  # log-ratios of mismatched prompt/completion pairs (KTO's reference point)
    needs_ref: bool = True  # reference log-probs (a `logprobs` artifact); False: the loss reads s_pol only
    state: str = ""  # running state carried across steps and checkpoints ("" = none)
    batch_level: bool = False  # uses statistics of the global batch, so DDP must gather them
    preferred_fraction: bool = False
    resolved_alpha: bool = False

    @property
    def fn(self) -> Callable:
        if callable(self.target):
            return self.target
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def stateful(self) -> bool:
        return bool(self.state)

    @property
    def recipe_keys(self) -> tuple[str, ...]:
        """The `loss.*` keys this loss reads, in the order the model card lists them."""
        return tuple(key for key, _ in self.keys)

    @property
    def data_shape(self) -> str:
        return "paired" if self.needs_pairs else "unpaired"

    def kwargs(self, loss_cfg: Any, *, alpha: float | None, preferred_fraction: float | None) -> dict:
        """The function's fixed arguments from the recipe's `loss` section (`alpha` as resolved)."""
        found = {arg: getattr(loss_cfg, key) for key, arg in self.keys if arg is not None}
        if self.resolved_alpha:
            found["alpha"] = alpha
        if self.preferred_fraction:
            found["preferred_fraction"] = preferred_fraction
        return found


_BETA = ("beta", "beta")
LOSSES: dict[str, LossSpec] = {
    "rdro": LossSpec("rdro_cli.losses.density_ratio:rdro_loss", "RDRO (Relative Density Ratio Optimization)",
                     (("alpha", "alpha"), ("weighting", "weighting")), preferred_fraction=True,
                     resolved_alpha=True),
    "ddro": LossSpec("rdro_cli.losses.density_ratio:ddro_loss", "DDRO (unbounded density ratio)"),
    "kto": LossSpec("rdro_cli.losses.kto_bco:kto_loss", "KTO",
                    (_BETA, ("desirable_weight", "desirable_weight"), ("undesirable_weight", "undesirable_weight")),
                    needs_kl=True, batch_level=True),
    "bco": LossSpec("rdro_cli.losses.kto_bco:bco_loss", "BCO", (_BETA,), state="bco_delta", batch_level=True),
    "dpo": LossSpec("rdro_cli.losses.pairwise:dpo_loss", "DPO", (_BETA,), needs_pairs=True),
    "pro": LossSpec("rdro_cli.losses.pro:pro_loss", "PRO-B (Proximalized Preference Optimization)",
                    (_BETA, ("pro_alpha", "alpha"), ("pro_weighting", "weighting")), preferred_fraction=True),
    "kldo": LossSpec("rdro_cli.losses.kldo:kldo_loss", "KLDO (KL divergence optimisation)",
                     (_BETA, ("kldo_estimator", "estimator"), ("kldo_rate", None)), state="kldo_ema",
                     batch_level=True),
    "bpo": LossSpec("rdro_cli.losses.pairwise:bpo_loss", "BPO (Bregman preference optimisation)",
                    (_BETA, ("bpo_divergence", "divergence"), ("bpo_lam", "lam"), ("bpo_ratio_min", "ratio_min")),
                    needs_pairs=True),
    "pmle": LossSpec("rdro_cli.losses.pairwise:pmle_loss", "preference maximum likelihood", (("pmle_gamma", "gamma"),),
                     needs_pairs=True, needs_ref=False),
}
NAMES: tuple[str, ...] = tuple(LOSSES)
UNPAIRED: tuple[str, ...] = tuple(name for name, spec in LOSSES.items() if not spec.needs_pairs)


def spoken_list(names: tuple[str, ...] = NAMES) -> str:
    """"rdro, ddro, ... or pmle" for messages and help texts."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)
