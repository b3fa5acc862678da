"""Running state of the losses that keep one across steps: how the training loop advances it.

A loss's registry entry names its state (``LossSpec.state``); the rules for that state live here, next to the
losses, so the loop only calls the three hooks below. The values themselves are fields of the run's
`TrainState` (store/checkpoints.py), saved in every checkpoint:

- ``bco_delta`` (BCO): the running mean ``delta`` of ``beta * r`` over every row seen so far, updated with the
  global micro-batch before its loss (`kto_bco.bco_update_delta`);
- ``kldo_ema`` (KLDO): the moving average ``m`` of ``exp(beta * r)`` over non-preferred rows, updated with the
  global micro-batch before its loss when ``loss.kldo_estimator = "ma"`` (`kldo.kldo_update_ema`), and
  restarted at every epoch, as the authors' trainer does.
"""

from __future__ import annotations

import torch

from rdro_cli.losses import kldo, kto_bco


class _BcoDelta:
    def before_loss(self, state, kwargs: dict, gathered: torch.Tensor, loss_cfg) -> None:
        state.bco_delta, state.bco_count = kto_bco.bco_update_delta(
            state.bco_delta, state.bco_count, kwargs["beta"] * gathered[:, 0])
        kwargs["delta"] = state.bco_delta

    def for_statistics(self, state, kwargs: dict) -> None:
        kwargs["delta"] = state.bco_delta

    def at_epoch_end(self, state) -> None:
        pass


class _KldoEma:
    def before_loss(self, state, kwargs: dict, gathered: torch.Tensor, loss_cfg) -> None:
        batch_labels = gathered[:, 1].bool()  # its statistics come from all rows of the global micro-batch
        if kwargs["estimator"] == "ma":
            state.kldo_ema = kldo.kldo_update_ema(state.kldo_ema, kwargs["beta"] * gathered[~batch_labels, 0],
                                                  rate=loss_cfg.kldo_rate)
        kwargs.update(ema=state.kldo_ema, batch_logratios=gathered[:, 0], batch_labels=batch_labels)

    def for_statistics(self, state, kwargs: dict) -> None:
        kwargs["ema"] = state.kldo_ema

    def at_epoch_end(self, state) -> None:
        state.kldo_ema = 0.0  # 0 = not started, the authors' convention


STATES = {"bco_delta": _BcoDelta(), "kldo_ema": _KldoEma()}


def before_loss(spec, state, kwargs: dict, gathered: torch.Tensor, loss_cfg) -> None:
    """Advances the loss's state with this global micro-batch ([rows, 2]: log-ratio, label) and adds what the
    loss function reads of it to `kwargs`."""
    if spec.state:
        STATES[spec.state].before_loss(state, kwargs, gathered, loss_cfg)


def for_statistics(spec, state, kwargs: dict) -> None:
    """Adds the state as it stands after the step to `kwargs`, for the logged statistics of the step."""
    if spec.state:
        STATES[spec.state].for_statistics(state, kwargs)


def at_epoch_end(spec, state) -> None:
    if spec.state:
        STATES[spec.state].at_epoch_end(state)
