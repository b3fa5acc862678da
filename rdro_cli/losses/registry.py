"""losses.registry (moved)"""

from __future__ import annotations

from rdro_cli.losses.density_ratio import ddro_loss, rdro_loss
from rdro_cli.losses.kldo import kldo_loss
from rdro_cli.losses.kto_bco import bco_loss, kto_loss
from rdro_cli.losses.pairwise import bpo_loss, dpo_loss, pmle_loss  # noqa: E402
from rdro_cli.losses.pro import pro_loss
from rdro_cli.losses.types import LossSpec

LOSSES: dict[str, LossSpec] = {
    "rdro": LossSpec(rdro_loss),
    "ddro": LossSpec(ddro_loss),
    "kto": LossSpec(kto_loss, needs_kl=True, batch_level=True),
    "bco": LossSpec(bco_loss, state="bco_delta", batch_level=True),
    "dpo": LossSpec(dpo_loss, needs_pairs=True),
    "pro": LossSpec(pro_loss),
    "kldo": LossSpec(kldo_loss, state="kldo_ema", batch_level=True),
    "bpo": LossSpec(bpo_loss, needs_pairs=True),
    "pmle": LossSpec(pmle_loss, needs_pairs=True, needs_ref=False),
}
