"""Packed rows against the padded path on one micro-batch: per-row log-probs, gradients and time (issue 16).

One config-only model (``bench_env.ARCHS``, random seeded weights), one micro-batch of ``--rows`` rows with the
kto-mix-14k-like length mix. Three ways to compute the same per-row completion log-probs and their gradient:

- ``padded``: one forward padded to the longest row (``batching.collate`` + ``completion_logps``);
- ``groups``: the length groups training uses (``batching.length_groups`` at ``--group-cost``);
- ``packed``: one row without padding (``batching.pack`` + ``packed_completion_logps``), whose attention is
  per row through the restarting ``position_ids`` (flash-attention varlen if the model loads with it, else
  a block-diagonal mask).

Prints one JSON line: the largest per-row |packed − padded| log-prob difference (relative to the row's
|value|), the largest per-parameter relative gradient difference ‖g_packed − g_padded‖ / ‖g_padded‖, and
the median seconds of forward+backward of each way over ``--repeats`` (after one warm-up).

    python benchmarks/packing_check.py --quick                                   # CPU, tiny, fp32 (1e-5)
    python benchmarks/packing_check.py --device cuda --dtype bfloat16 --arch qwen2-0.5b-llama
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from bench_env import ARCHS, length_mix  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen2-0.5b-llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--group-cost", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model, short rows, fp32 on CPU")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.max_length, args.rows, args.repeats = "tiny", 384, 4, 1
        args.device, args.dtype = "cpu", "float32"

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rdro_cli.lm import batching, completion_head, fast_paths

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = dict(ARCHS[args.arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, max_position_embeddings=4096, pad_token_id=0)
    config._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn)
    model.train()
    _, prompt_len, completion_len, _ = length_mix(args.rows, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows, starts = [], []
    for p, c in zip(prompt_len.tolist(), completion_len.tolist(), strict=True):
        p = int(min(max(p, 8), args.max_length // 2))
        c = int(min(max(c, 2), args.max_length - p))
        rows.append(torch.randint(1, config.vocab_size, (p + c,), generator=gen).tolist())
        starts.append(p)
    weights = torch.randn(args.rows, generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(way: str):
        if way == "packed":
            packed = batching.pack(rows, starts, 0).to(device)
            return completion_head.packed_completion_logps(model, packed)
        lengths = [len(r) for r in rows]
        cost = 1e9 if way == "padded" else args.group_cost
        groups = batching.length_groups(lengths, max_tokens=10**9, group_cost=cost)
        parts = [completion_head.completion_logps(model, *(t.to(device) for t in
                                                    batching.collate([rows[i] for i in g], [starts[i] for i in g], 0)))
                 for g in groups]
        order = torch.tensor([i for g in groups for i in g], device=device)
        out = torch.empty(len(rows), device=device)
        out[order] = torch.cat(parts)
        return out

    results = {}
    for way in ("padded", "groups", "packed"):
        times = []
        for i in range(args.repeats + 1):
            model.zero_grad(set_to_none=True)
            sync()
            began = time.perf_counter()
            logps = run(way)
            (logps * weights).sum().backward()
            sync()
            if i:
                times.append(time.perf_counter() - began)
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[way] = {"logps": logps.detach().float().cpu(), "grads": grads, "seconds": statistics.median(times)}

    ref = results["padded"]
    summary = {"check": "packing", "arch": args.arch, "device": torch.cuda.get_device_name() if device.type == "cuda"
               else "cpu", "dtype": args.dtype, "attn_implementation": fast_paths.attention_implementation(model),
               "rows": args.rows, "tokens": sum(len(r) for r in rows),
               "padded_tokens": len(rows) * max(len(r) for r in rows)}
    for way in ("groups", "packed"):
        got = results[way]
        diff = (got["logps"] - ref["logps"]).abs()
        summary[f"{way}_max_abs_logp_diff"] = diff.max().item()
        summary[f"{way}_max_rel_logp_diff"] = (diff / ref["logps"].abs().clamp(min=1.0)).max().item()
        summary[f"{way}_max_rel_grad_diff"] = max(
            ((got["grads"][n] - g).norm() / g.norm().clamp(min=1e-30)).item() for n, g in ref["grads"].items())
    for way in ("padded", "groups", "packed"):
        summary[f"{way}_seconds"] = results[way]["seconds"]
        summary[f"{way}_tokens_per_s"] = summary["tokens"] / results[way]["seconds"]
    summary["packed_speedup_vs_padded"] = ref["seconds"] / results["packed"]["seconds"]
    summary["packed_speedup_vs_groups"] = results["groups"]["seconds"] / results["packed"]["seconds"]
    tolerance = 1e-5 if args.dtype == "float32" else 2e-2
    summary["tolerance"] = tolerance
    summary["exact_within_tolerance"] = summary["packed_max_rel_logp_diff"] <= tolerance
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
