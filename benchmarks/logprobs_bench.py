"""Throughput and peak memory of the `logprobs` stage against a naive baseline, on the same rows (issue 3).

Contenders, each scoring every row's completion log-prob sum ``s = Σ_t log π(y_t | x, y_<t)``:

- ``stage``: exactly what ``rdro logprobs`` runs per shard, ``rdro_cli.logprobs._score``: length-sorted
  token-budget batches (``logprobs.max_tokens_per_batch``), inference mode, the transformer body, then the
  LM head only at completion positions in chunks of ``logprobs.chunk_size`` (``completion_head.completion_logps``).
- ``naive``: rows in random order, fixed batches of ``--naive-batch-rows`` rows padded to the longest row,
  a full HF forward producing ``[batch, seq, vocab]`` logits, float32 log_softmax over the whole vocabulary
  at every position, gather, mask to completion tokens, sum.

Fairness: both get the same worst-case padded tokens per batch. The stage packs rows so that
``rows × longest <= max_tokens_per_batch``; a fixed-row baseline must fit its worst case (every row at
``--max-length``) in the same budget, so by default ``naive_batch_rows = max_tokens_per_batch // max_length``
(16384 // 1024 = 16 rows). Both figures, and the realised mean real/padded tokens per batch of each
contender, are printed.

Each contender runs alone in a fresh subprocess of this script (``--contender stage|naive``), so its peak
memory is its own: ``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Contenders alternate
(naive, stage, naive, stage, ...) for ``--repeats`` rounds; the headline is the median over rounds for both
speed and memory. tokens/s counts prompt + completion tokens, never padding.

The model is built from a config with random weights (seeded) and saved as safetensors in a temp dir, then
loaded by ``rdro_cli.lm.loading.load_model`` like the stage does; rows are random token ids with a
mix14k-like prompt/completion length mix built in memory (no ``datasets`` needed).

    .venv/bin/python benchmarks/logprobs_bench.py                 # CPU: Llama h256 L4 vocab 32000, fp32
    .venv/bin/python benchmarks/logprobs_bench.py --quick         # seconds; a smoke run
    python benchmarks/logprobs_bench.py --device cuda --dtype bfloat16 --arch qwen2-0.5b --rows 4000

The last stdout line is one JSON object with every figure (for scripts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from bench_env import ARCHS, cpu_name, length_mix  # noqa: E402

FLOPS_FORMULA = ("2*N_body*T + 2*hidden*vocab*T_c + 4*layers*heads*head_dim*sum_rows(L^2); N_body = transformer "
                 "layer + final-norm params (no embedding, no head), T = prompt+completion tokens, T_c = completion "
                 "tokens (positions whose log-prob is needed), L = row length; padding never counts")
SPEEDUP_TARGET, MEMORY_TARGET = 2.0, 0.5


# ---------------------------------------------------------------------------------------------------------
# Rows and model (both deterministic from the seed, so every subprocess sees the same ones)


def make_rows(n: int, vocab: int, max_length: int, seed: int) -> list[tuple[list[int], int, bool]]:
    """(input_ids, completion_start, label) with a kto-mix-14k-like length mix of random token ids.

    Prompt lengths are lognormal around 120 tokens (capped at max_length // 2), completion lengths lognormal
    around 170 tokens, cut so prompt + completion <= max_length; about 55% of rows preferred.
    """
    import torch

    gen, prompt_len, completion_len, labels = length_mix(n, seed)
    rows = []
    for i in range(n):
        p = int(min(max(prompt_len[i].item(), 4), max_length // 2))
        c = int(min(max(completion_len[i].item(), 1), max_length - p))
        ids = torch.randint(3, vocab, (p + c,), generator=gen).tolist()  # 0-2: pad/bos/eos
        rows.append((ids, p, bool(labels[i])))
    return rows


def build_model(out: Path, arch: str, dtype: str, device: str, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, max_position_embeddings=4096,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):  # initialising a 7B model on the GPU takes seconds, on the CPU minutes
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)


def model_shape(model) -> dict:
    config = model.config
    body = model.get_decoder()
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_params = sum(p.numel() for p in embed.parameters())
    body_params = sum(p.numel() for p in body.parameters()) - embed_params
    head_params = sum(p.numel() for p in head.parameters())
    heads = config.num_attention_heads
    return {"model_type": config.model_type, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
            "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", heads),
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "intermediate": config.intermediate_size, "vocab": config.vocab_size,
            "tied_head": bool(getattr(config, "tie_word_embeddings", False)),
            "params": sum(p.numel() for p in model.parameters()),
            "body_params": body_params, "embedding_params": embed_params, "head_params": head_params}


def useful_flops(shape: dict, lengths: list[int], completion_tokens: int) -> float:
    """Forward FLOPs the job needs (see FLOPS_FORMULA), the same for both contenders."""
    attention = 4 * shape["layers"] * shape["heads"] * shape["head_dim"] * sum(n * n for n in lengths)
    return (2 * shape["body_params"] * sum(lengths) + 2 * shape["hidden"] * shape["vocab"] * completion_tokens
            + attention)


# ---------------------------------------------------------------------------------------------------------
# The two contenders


def run_stage(model, rows, args, device):
    """rdro_cli.logprobs._score: the stage's own code path, with the recipe's batching and chunk settings."""
    from rdro_cli import logprobs
    from rdro_cli.lm import batching
    from rdro_cli.recipe import Recipe

    cfg = Recipe()
    cfg.logprobs.max_tokens_per_batch = args.max_tokens_per_batch
    cfg.logprobs.chunk_size = args.chunk_size
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    sequences = [(ids, start) for ids, start, _ in rows]
    batches = batching.token_budget_batches([len(ids) for ids, _ in sequences], args.max_tokens_per_batch)
    padded = sum(len(b) * max(len(sequences[i][0]) for i in b) for b in batches)
    scores = logprobs._score(model, sequences, cfg, pad_id, device, lambda n_rows, n_tokens: None)
    return scores, len(batches), padded


def run_naive(model, rows, args, device):
    """Random-order fixed-size batches, full [batch, seq, vocab] logits, full-vocab float32 log_softmax."""
    import torch

    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + 1)).tolist()
    scores = torch.empty(len(rows), dtype=torch.float32)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batches, padded = 0, 0
    with torch.inference_mode():
        for first in range(0, len(order), args.naive_batch_rows):
            batch = order[first : first + args.naive_batch_rows]
            width = max(len(rows[i][0]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            completion_mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for b, i in enumerate(batch):
                ids, start, _ = rows[i]
                input_ids[b, : len(ids)] = torch.tensor(ids)
                attention_mask[b, : len(ids)] = 1
                completion_mask[b, start : len(ids)] = True
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            completion_mask = completion_mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logps = torch.log_softmax(logits.float(), dim=-1)  # [batch, seq, vocab] float32
            token_logps = logps[:, :-1].gather(2, input_ids[:, 1:].unsqueeze(2)).squeeze(2)
            scores[batch] = (token_logps * completion_mask[:, 1:]).sum(1).cpu()
            del logits, logps, token_logps
            batches += 1
            padded += len(batch) * width
    return scores, batches, padded


def contender_main(args) -> None:
    """One contender in this (fresh) process; prints its figures as one JSON line and saves its scores."""
    import resource

    import torch

    from rdro_cli.lm import loading

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    vocab = ARCHS[args.arch]["vocab_size"]
    rows = make_rows(args.rows, vocab, args.max_length, args.seed)
    model = loading.load_model(str(args.model_dir), dtype=args.dtype, device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_after_load = _current_rss()
    cuda_after_load = torch.cuda.memory_allocated() if cuda else 0
    run = run_stage if args.contender == "stage" else run_naive

    run(model, rows[: min(8, len(rows))], args, device)  # warm-up: kernels, allocator, the stage's head check
    load_before = os.getloadavg()[0]
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    scores, batches, padded = run(model, rows, args, device)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    lengths = [len(ids) for ids, _, _ in rows]
    completion_tokens = sum(len(ids) - start for ids, start, _ in rows)
    shape = model_shape(model)
    flops = useful_flops(shape, lengths, completion_tokens)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    result = {
        "contender": args.contender, "seconds": seconds, "tokens": sum(lengths),
        "completion_tokens": completion_tokens, "rows": len(rows), "tokens_per_s": sum(lengths) / seconds,
        "tflops": flops / seconds / 1e12, "flops": flops, "batches": batches, "padded_tokens": padded,
        "peak_rss_mb": peak_rss / 2**20, "rss_after_load_mb": rss_after_load / 2**20,
        "peak_rss_increase_mb": (peak_rss - rss_after_load) / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "cuda_after_load_mb": cuda_after_load / 2**20 if cuda else None,
        "cuda_peak_increase_mb": (torch.cuda.max_memory_allocated() - cuda_after_load) / 2**20 if cuda else None,
        "loadavg": [load_before, os.getloadavg()[0]], "threads": torch.get_num_threads(),
        "shape": shape, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
    }
    Path(args.scores_out).write_text(json.dumps(scores.tolist()))
    print(json.dumps(result), flush=True)


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------------------
# Driver: build the model once, alternate the contenders in fresh subprocesses, compare, report


def _subprocess(argv: list[str]) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"logprobs_bench: subprocess {' '.join(argv[:2])} failed (exit {done.returncode})")
    return done.stdout


def _common_argv(args) -> list[str]:
    return ["--arch", args.arch, "--device", args.device, "--dtype", args.dtype, "--rows", str(args.rows),
            "--seed", str(args.seed), "--max-length", str(args.max_length),
            "--max-tokens-per-batch", str(args.max_tokens_per_batch), "--chunk-size", str(args.chunk_size),
            "--naive-batch-rows", str(args.naive_batch_rows), "--threads", str(args.threads)]


def driver_main(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="rdro-logprobs-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        _subprocess(["--build-model", str(model_dir), *_common_argv(args)])
        runs: dict[str, list[dict]] = {"naive": [], "stage": []}
        scores: dict[str, list[list[float]]] = {"naive": [], "stage": []}
        for repeat in range(args.repeats):
            for contender in ("naive", "stage"):
                out = tmp / f"{contender}-{repeat}.json"
                stdout = _subprocess(["--contender", contender, "--model-dir", str(model_dir),
                                      "--scores-out", str(out), *_common_argv(args)])
                result = json.loads(stdout.strip().splitlines()[-1])
                runs[contender].append(result)
                scores[contender].append(json.loads(out.read_text()))
                print(f"# round {repeat + 1}/{args.repeats} {contender}: {result['tokens_per_s']:.0f} tok/s, "
                      f"peak {_peak(result, args):.0f} MiB, load {result['loadavg'][0]:.2f}", file=sys.stderr,
                      flush=True)
    return summarize(args, runs, scores)


def _peak(result: dict, args) -> float:
    return result["cuda_peak_mb"] if args.device.startswith("cuda") else result["peak_rss_mb"]


def _peak_increase(result: dict, args) -> float:
    return result["cuda_peak_increase_mb"] if args.device.startswith("cuda") else result["peak_rss_increase_mb"]


def summarize(args, runs: dict, scores: dict) -> dict:
    def med(contender, key):
        return statistics.median(key(r) for r in runs[contender])

    max_rel_diff = 0.0
    for naive_scores in scores["naive"]:
        for stage_scores in scores["stage"]:
            for a, b in zip(stage_scores, naive_scores, strict=True):
                max_rel_diff = max(max_rel_diff, abs(a - b) / max(abs(b), 1e-30))
    # float32 must agree to 1e-4 relative (the issue's bar); bf16 rounds the two batchings differently
    tolerance = 1e-4 if args.dtype == "float32" else 2e-2
    first = runs["stage"][0]
    shape = first["shape"]
    cuda = args.device.startswith("cuda")
    figures = {}
    for contender in ("stage", "naive"):
        r = runs[contender]
        figures[contender] = {
            "tokens_per_s": med(contender, lambda x: x["tokens_per_s"]),
            "tokens_per_s_runs": [x["tokens_per_s"] for x in r],
            "seconds": med(contender, lambda x: x["seconds"]),
            "peak_memory_mb": med(contender, lambda x: _peak(x, args)),
            "peak_memory_increase_mb": med(contender, lambda x: _peak_increase(x, args)),
            "peak_rss_mb": med(contender, lambda x: x["peak_rss_mb"]),
            "rss_after_load_mb": med(contender, lambda x: x["rss_after_load_mb"]),
            "tflops": med(contender, lambda x: x["tflops"]),
            "batches": r[0]["batches"],
            "mean_tokens_per_batch": r[0]["tokens"] / r[0]["batches"],
            "mean_padded_tokens_per_batch": r[0]["padded_tokens"] / r[0]["batches"],
            "loadavg": [x["loadavg"] for x in r],
        }
        if args.peak_tflops:
            figures[contender]["roofline_fraction"] = figures[contender]["tflops"] / args.peak_tflops
    stage, naive = figures["stage"], figures["naive"]
    speedup = stage["tokens_per_s"] / naive["tokens_per_s"]
    memory_ratio = stage["peak_memory_mb"] / naive["peak_memory_mb"]
    summary = {
        "benchmark": "logprobs", "device": args.device, "device_name": first["device_name"], "dtype": args.dtype,
        "arch": args.arch, "model": shape, "torch": first["torch"], "threads": first["threads"],
        "rows": first["rows"], "tokens": first["tokens"], "completion_tokens": first["completion_tokens"],
        "max_length": args.max_length, "max_tokens_per_batch": args.max_tokens_per_batch,
        "chunk_size": args.chunk_size, "naive_batch_rows": args.naive_batch_rows, "repeats": args.repeats,
        "aggregate": "median over rounds",
        "memory_kind": "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss (whole process)",
        "stage_tokens_per_s": stage["tokens_per_s"], "naive_tokens_per_s": naive["tokens_per_s"],
        "stage_peak_memory_mb": stage["peak_memory_mb"], "naive_peak_memory_mb": naive["peak_memory_mb"],
        "stage_peak_memory_increase_mb": stage["peak_memory_increase_mb"],
        "naive_peak_memory_increase_mb": naive["peak_memory_increase_mb"],
        "stage_peak_rss_mb": stage["peak_rss_mb"], "naive_peak_rss_mb": naive["peak_rss_mb"],
        "speedup": speedup, "memory_ratio": memory_ratio,
        "memory_increase_ratio": stage["peak_memory_increase_mb"] / max(naive["peak_memory_increase_mb"], 1e-9),
        "max_rel_diff": max_rel_diff, "agreement_tolerance": tolerance, "agrees": max_rel_diff <= tolerance,
        "speedup_target": SPEEDUP_TARGET, "memory_ratio_target": MEMORY_TARGET,
        "targets_met": speedup >= SPEEDUP_TARGET and memory_ratio <= MEMORY_TARGET,
        "flops_formula": FLOPS_FORMULA, "peak_tflops": args.peak_tflops or None,
        "stage": stage, "naive": naive,
    }
    return summary


def print_report(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s, st, nv = summary, summary["stage"], summary["naive"]
    m = s["model"]
    cuda = s["device"].startswith("cuda")
    console = Console(width=110)
    console.print(
        f"logprobs benchmark on {s['device_name']} ({s['device']}, {s['dtype']}, {s['threads']} threads); "
        f"model {s['arch']}: {m['model_type']} hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads "
        f"({m['kv_heads']} kv), intermediate {m['intermediate']}, vocab {m['vocab']}, {m['params'] / 1e6:.1f}M "
        f"params; {s['rows']} rows, {s['tokens']} tokens ({s['completion_tokens']} completion); "
        f"stage max_tokens_per_batch {s['max_tokens_per_batch']}, chunk_size {s['chunk_size']}; naive "
        f"{s['naive_batch_rows']} rows/batch; median of {s['repeats']} alternating rounds; load average "
        f"{min(x[0] for x in st['loadavg'] + nv['loadavg']):.2f}-{max(x[1] for x in st['loadavg'] + nv['loadavg']):.2f}"
    )
    mem = "peak CUDA allocated MiB" if cuda else "peak RSS MiB"
    table = Table()
    for column in ("", "tokens/s", "runs tok/s", mem, "increase over load MiB", "TFLOP/s", "batches",
                   "tok/batch (padded)"):
        table.add_column(column, justify="right")
    for name, f in (("naive", nv), ("stage", st)):
        tflops = f"{f['tflops']:.3f}" + (f" ({100 * f['roofline_fraction']:.1f}%)" if "roofline_fraction" in f else "")
        table.add_row(name, f"{f['tokens_per_s']:.0f}", " ".join(f"{x:.0f}" for x in f["tokens_per_s_runs"]),
                      f"{f['peak_memory_mb']:.0f}", f"{f['peak_memory_increase_mb']:.0f}", tflops,
                      str(f["batches"]),
                      f"{f['mean_tokens_per_batch']:.0f} ({f['mean_padded_tokens_per_batch']:.0f})")
    table.add_row("stage / naive", f"{s['speedup']:.2f}x", "", f"{s['memory_ratio']:.3f}x",
                  f"{s['memory_increase_ratio']:.3f}x", "", "", "")
    console.print(table)
    verdict = "met" if s["targets_met"] else "NOT met"
    console.print(
        f"targets (>= {s['speedup_target']}x tokens/s, <= {s['memory_ratio_target']}x peak memory): {verdict}; "
        f"max relative difference per row {s['max_rel_diff']:.2e} (tolerance {s['agreement_tolerance']:g}: "
        f"{'ok' if s['agrees'] else 'FAILED'})"
    )
    if s["peak_tflops"]:
        console.print(f"roofline: useful forward FLOPs / time / {s['peak_tflops']} TFLOP/s; FLOPs = {FLOPS_FORMULA}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default=None,
                        help="model shape (default: llama-cpu on CPU, qwen2-0.5b on CUDA, tiny with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--rows", type=int, default=None, help="rows to score (default 200 on CPU, 4000 on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=1024, help="max prompt + completion tokens")
    parser.add_argument("--max-tokens-per-batch", type=int, default=None,
                        help="the stage's logprobs.max_tokens_per_batch (default: the recipe default, 16384)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="the stage's logprobs.chunk_size (default: the recipe default, 1024)")
    parser.add_argument("--naive-batch-rows", type=int, default=None,
                        help="rows per naive batch (default: max_tokens_per_batch // max_length, the same "
                             "worst-case padded tokens per batch)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak for the roofline fraction (default 989, H100 bf16, on CUDA; none on CPU)")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration for a smoke test")
    parser.add_argument("--contender", choices=("stage", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scores-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build-model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from rdro_cli.recipe import LogprobsSection  # stdlib-only import: the driver needs no torch

    cuda = args.device.startswith("cuda")
    if args.quick:
        args.max_length = min(args.max_length, 256)
    args.arch = args.arch or ("tiny" if args.quick else "qwen2-0.5b" if cuda else "llama-cpu")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.rows = args.rows or (16 if args.quick else 4000 if cuda else 200)
    args.max_tokens_per_batch = args.max_tokens_per_batch or (
        2048 if args.quick else LogprobsSection().max_tokens_per_batch)
    args.chunk_size = args.chunk_size or LogprobsSection().chunk_size
    args.naive_batch_rows = args.naive_batch_rows or max(1, args.max_tokens_per_batch // args.max_length)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.peak_tflops is None and cuda:
        args.peak_tflops = 989.0

    if args.build_model:
        build_model(args.build_model, args.arch, args.dtype, args.device, args.seed)
    elif args.contender:
        contender_main(args)
    else:
        summary = driver_main(args)
        print_report(summary)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout without installing the package
    main()
