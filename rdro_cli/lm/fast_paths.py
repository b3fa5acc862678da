"""Optional fast paths: packing rows into one (`train.packing`: when the installed transformers and attention
implementation make it exact and worth it) and compiling the transformer body (`train.compile`).
"""

from __future__ import annotations

from torch import nn

from rdro_cli.errors import UserError
from rdro_cli.lm.completion_head import body_and_head, causal_lm_of

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def attention_implementation(model: nn.Module) -> str:
    return str(getattr(causal_lm_of(model).config, "_attn_implementation", None) or "eager")


def packing_supported() -> bool:
    """transformers builds per-row causal attention from restarting ``position_ids`` (masking_utils' packed
    sequence detection; the flash-attention integration derives cu_seqlens from them the same way)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def use_packing(setting: str, model: nn.Module) -> bool:
    """``train.packing``: "off"; "on" (any attention implementation: with sdpa/eager the block-diagonal mask
    is exact but dense, T² for the whole packed row); "auto" = on only with a varlen flash-attention kernel,
    where packing costs no attention work at all and saves every padded position."""
    if setting == "off":
        return False
    if not packing_supported():
        if setting == "on":
            import transformers

            raise UserError(f"train.packing = on needs transformers' packed-sequence masks (masking_utils), "
                            f"which transformers {transformers.__version__} lacks; set train.packing = auto or off")
        return False
    return setting == "on" or attention_implementation(model) in VARLEN_ATTENTION


def compile_body(model: nn.Module) -> nn.Module:
    """``train.compile``: the transformer body compiled in place (``nn.Module.compile``: parameter names and
    the module tree stay as they are, so saving, peft and FSDP see the same model). Shapes stay few because
    training then pads lengths to :func:`bucket_length` buckets; dynamic dimensions are left to torch's
    automatic detection (a dimension seen with two sizes is made symbolic instead of recompiling again)."""
    body, _ = body_and_head(causal_lm_of(model))
    body.compile()
    return model
