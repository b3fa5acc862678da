"""Throughput facts about the device training runs on: the fixed cost of one forward, peak FLOP/s, MFU.

Fixed cost per forward. ``batching.length_groups`` splits a micro-batch into length groups when the padding
saved outweighs the cost of one more forward. That cost is the device's, not a constant: kernel launches and
per-call Python dominate on a GPU (a small forward costs about as much as a large one), almost nothing on a
CPU. We model one forward over ``T`` padded tokens as

    t(T) = t_0 + c · T                                                             (1)

time a few no-grad forwards of the policy at two shapes, fit (1) and express the fixed part in tokens:

    group_cost = max(t_0 / c, MIN_GROUP_COST)   token-equivalents per forward      (2)

cached per (model fingerprint, dtype, device name, torch version) under ``digests.cache_dir()``, so every
run of the same model on the same device groups the same way (and a resumed run repeats its steps exactly).

MFU. Model FLOPs utilisation of a training step (the PaLM convention, attention FLOPs not counted):

    MFU = 6 · N · tokens / seconds / (peak · processes)                            (3)

with N all parameters of the policy (tied embeddings once), tokens the real (unpadded) tokens of the step
over all processes and peak the dense bf16/fp16 FLOP/s of one device, looked up by
``torch.cuda.get_device_name`` (``PEAK_BF16_FLOPS``) or given as ``train.peak_flops``.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from rdro_cli.lm import fast_paths
from rdro_cli.store import digests, durable

# Cap of (2): beyond it the DP makes one group per micro-batch anyway; keeps the cache JSON finite.
MAX_GROUP_COST = 1e9
# Floor of the measured cost: the fixed 512 that issue 10 tuned on CPU. Model (1) is linear, but on a CPU
# small matmuls are also less efficient per token and each group adds backward/autograd overhead that a
# no-grad forward does not show: measured there (llama-cpu, 2 busy cores), (2) came out at 131 tokens, and
# grouping with 131 instead of 512 made forward+backward of train_bench's micro-batches 0.72x as fast
# (21 groups instead of 12). The measurement may only raise the cost, which it does on GPUs by orders of
# magnitude (launch-bound forwards).
MIN_GROUP_COST = 512.0
# Two shapes for (1): one row of 32 tokens (launch-bound everywhere) and 8 rows of 256 (2048 tokens).
SHAPES = ((1, 32), (8, 256))

# Dense (no sparsity) bf16 tensor-core FLOP/s per device, from the vendors' datasheets. Matched in order
# against torch.cuda.get_device_name(), so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"H200 NVL", 835e12),
    (r"H200", 989e12),  # SXM; nvidia-smi names it plainly "NVIDIA H200"
    (r"GH200", 989e12),
    (r"H100.*PCIe", 756e12),
    (r"H100 NVL", 835e12),
    (r"H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H800", 989e12),
    (r"B200", 2250e12),
    (r"A100", 312e12),  # SXM and PCIe
    (r"A800", 312e12),
    (r"L40S", 362e12),
    (r"L40\b", 181e12),
    (r"L4\b", 121e12),
    (r"A10\b", 125e12),
)


def fit_forward_cost(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares fit of (1) to ``(tokens, seconds)`` samples: ``(t_0 seconds, c seconds per token)``."""
    if len({tokens for tokens, _ in samples}) < 2:
        raise ValueError("fit_forward_cost needs samples at two or more token counts")
    xs, ys = [float(t) for t, _ in samples], [float(s) for _, s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def group_cost_tokens(fixed_s: float, per_token_s: float) -> float:
    """(2), clamped to [0, MAX_GROUP_COST] (training uses at least ``MIN_GROUP_COST``). A non-positive slope (the bigger forward was not slower: all of its
    time is fixed cost) means one forward per micro-batch is cheapest."""
    if per_token_s <= 0 or not math.isfinite(per_token_s):
        return MAX_GROUP_COST
    return min(max(fixed_s / per_token_s, 0.0), MAX_GROUP_COST)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_forward_cost(forward, vocab: int, device: torch.device, *, repeats: int = 3,
                         clock=time.perf_counter) -> dict:
    """:func:`_measure` with the global RNG (CPU and this CUDA device) restored afterwards: the forwards run in
    train mode, and their dropout draws must not shift the run's randomness (a run that measured and one
    that read the cache, e.g. a resumed one, must train identically)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        return _measure(forward, vocab, device, repeats, clock)


def _measure(forward, vocab: int, device: torch.device, repeats: int, clock) -> dict:
    """Times ``forward(input_ids, attention_mask, completion_mask)`` (no grad) at ``SHAPES``, the fastest of
    `repeats` calls after one warm-up each, and fits (1). Random token ids below `vocab`; the second half of
    each row is "completion". Every process of a launch times the same shapes (FSDP's gathers stay matched)."""
    generator = torch.Generator().manual_seed(0)
    fastest = {}
    for rows, width in SHAPES:
        ids = torch.randint(0, vocab, (rows, width), generator=generator).to(device)
        mask = torch.ones_like(ids)
        completion = torch.zeros_like(ids, dtype=torch.bool)
        completion[:, width // 2:] = True
        times = []
        for i in range(repeats + 1):
            _sync(device)
            began = clock()
            forward(ids, mask, completion)
            _sync(device)
            if i:  # the first call is a warm-up (allocator, kernel selection)
                times.append(clock() - began)
        fastest[f"{rows}x{width}"] = min(times)
    # the fastest call of each shape: on a shared machine other processes only ever add time, and a
    # measurement inflated by them would be cached for every later run
    fixed, per_token = fit_forward_cost([(r * w, fastest[f"{r}x{w}"]) for r, w in SHAPES])
    measured = group_cost_tokens(fixed, per_token)
    return {"fixed_s": fixed, "per_token_s": per_token, "measured_group_cost": measured,
            "group_cost": max(measured, MIN_GROUP_COST), "fastest_s": fastest, "repeats": repeats}


def forward_cost(setting, forward, *, vocab: int, fingerprint: str, dtype: torch.dtype, device: torch.device,
                 extra: dict | None = None) -> tuple[float, str]:
    """``train.group_cost``: a number is used as given; "auto" measures (2) once per (model, dtype, device,
    torch version, `extra`) and caches it. Returns ``(group_cost, where it came from)``."""
    if setting != "auto":
        return float(setting), "train.group_cost"
    key = {"model": fingerprint, "dtype": str(dtype), "device": device_name(device), "torch": torch.__version__,
           **(extra or {})}
    path = digests.cache_dir() / "forward-cost" / f"{digests.fingerprint_json(key)}.json"
    try:
        return float(json.loads(path.read_text())["group_cost"]), f"cached in {path}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    measured = measure_forward_cost(forward, vocab, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_text_atomic(path, json.dumps({"key": key, **measured}, indent=1))
    return measured["group_cost"], f"measured, cached in {path}"


@dataclass
class BatchingPlan:
    pack: bool  # one packed row per micro-batch (batching.pack) instead of length groups
    group_cost: float  # length_groups' cost of one more forward, in padded tokens
    bucket: bool  # pad lengths to batching.bucket_length (train.compile)
    source: str  # where group_cost came from

    def describe(self) -> str:
        how = "packed rows (no padding)" if self.pack else \
            f"length groups, {self.group_cost:,.0f} padded tokens per extra forward ({self.source})"
        return f"train: batches as {how}" + ("; lengths bucketed for train.compile" if self.bucket else "")


def batching_plan(train_cfg, model: nn.Module, forward, device: torch.device, *, fingerprint: str,
                  lora: bool) -> BatchingPlan:
    """How training batches a micro-batch on this device (``train.packing``, ``train.group_cost``,
    ``train.compile``); `forward` is the prepared policy (measured when the cost is "auto")."""

    if fast_paths.use_packing(train_cfg.packing, model):
        return BatchingPlan(pack=True, group_cost=0.0, bucket=train_cfg.compile, source="packing")
    dtype = next(model.parameters()).dtype
    cost, source = forward_cost(train_cfg.group_cost, forward, vocab=model.get_input_embeddings().num_embeddings,
                                fingerprint=fingerprint, dtype=dtype, device=device, extra={"lora": lora})
    return BatchingPlan(pack=False, group_cost=cost, bucket=train_cfg.compile, source=source)


def peak_flops(name: str | None, override: float = 0.0) -> float | None:
    """Peak dense bf16 FLOP/s of one device named `name` (``torch.cuda.get_device_name``); `override` > 0
    wins. None when unknown (MFU is then not reported)."""
    if override and override > 0:
        return float(override)
    if not name:
        return None
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, name):
            return flops
    return None


def count_parameters(model: nn.Module) -> int:
    """N of (3): every parameter once (``parameters()`` yields a tied embedding/head weight once)."""
    return sum(p.numel() for p in model.parameters())


def mfu(params: int, tokens: float, seconds: float, peak: float, processes: int = 1) -> float:
    """(3)."""
    return 6.0 * params * tokens / max(seconds, 1e-12) / (peak * processes)


def mfu_scale(model: nn.Module, device: torch.device, dtype: torch.dtype, override: float,
              processes: int) -> float | None:
    """``6 N / (peak · processes)``, so that MFU = scale · tokens / seconds; None off CUDA (also with an
    override: the metrics rows then have no ``mfu`` field), for float32 weights without an override (the table holds bf16/fp16 tensor-core peaks) or on an unknown GPU."""
    if device.type != "cuda":  # MFU is a GPU figure; on CPU metrics.jsonl has no mfu field
        return None
    if dtype not in (torch.bfloat16, torch.float16) and not override:
        return None
    peak = peak_flops(device_name(device) if device.type == "cuda" else None, override)
    if peak is None:
        return None
    return 6.0 * count_parameters(model) / (peak * processes)


def step_mfu(scale: float | None, tokens: float, seconds: float) -> float | None:
    """MFU of one optimizer step from :func:`mfu_scale`; None where MFU is not reported (CPU)."""
    return None if scale is None else round(scale * float(tokens) / max(seconds, 1e-12), 5)


def speed_text(tokens_per_s: float, step_mfu_value: float | None) -> str:
    """The progress line's speed field: tokens/s, and the MFU where there is one."""
    text = f"{tokens_per_s:,.0f} tok/s"
    return text if step_mfu_value is None else f"{text}, MFU {step_mfu_value:.1%}"
