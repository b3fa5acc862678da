"""`rdro prepare` at scale (issue 18): rows/s, tokens/s and process-tree peak RSS, against TRL's KTO
dataset preparation of the same rows, plus the start-up of `rdro logprobs` / `rdro train` on the largest
artifact.

    .venv/bin/python benchmarks/prepare_bench.py                      # 100k and 1M rows (long on 2 cores)
    .venv/bin/python benchmarks/prepare_bench.py --rows 100000        # 100k only
    .venv/bin/python benchmarks/prepare_bench.py --quick              # 500 rows, small vocab: CI smoke run

Rows: `scripts/synthetic_feedback.py` (seed 0): conversational, both labels, a kto-mix-14k-like length mix.
Tokenizer: SmolLM2-135M-Instruct's from the demo cache (~/.cache/rdro/models) when present, else a byte-level
BPE with a 49,152 vocabulary trained offline on the generated text and the ChatML template (the report says
which). Every contender runs in its own subprocess; peak RSS is the sum over the process and all of its
children (worker processes included), sampled every 0.1 s while it runs. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "benchmarks")]
# the last commit before prepare ran through datasets workers (one process, two tokenizer calls per row)
PREVIOUS = "35a221b"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ---------------------------------------------------------------- measuring a subprocess


def measured(argv: list[str], log: Path, package_root: Path = ROOT) -> dict:
    """Run `argv` with `rdro_cli` imported from `package_root`; wall time and the peak RSS (and PSS) of its
    whole process tree (MB)."""
    import psutil

    env = {**os.environ, **OFFLINE,
           "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=package_root)
        root, peak, peak_pss = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                # PSS splits pages shared by forked workers between them: the tree's real footprint
                peak_pss = max(peak_pss, sum(getattr(p.memory_full_info(), "pss", 0) for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({proc.returncode}); see {log}:\n"
                         + log.read_text()[-3000:])
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "peak_pss_mb": peak_pss / 2**20, "log": str(log)}


def rates(run: dict, rows: int, tokens: int) -> dict:
    """A measured run with its row and token counts and their rates."""
    return {**run, "rows": rows, "tokens": tokens, "rows_per_s": rows / run["wall_s"],
            "tokens_per_s": tokens / run["wall_s"]}


def artifact_tokens(out: Path) -> int:
    """Tokens in a prepare artifact, from its manifest's counts."""
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    return sum(c["tokens"] for c in counts.values())


# ---------------------------------------------------------------- inputs


def tokenizer_dir(work: Path, vocab: int) -> tuple[Path, str]:
    cached = Path.home() / ".cache" / "rdro" / "models"
    smol = [p.parent for p in cached.rglob("tokenizer.json")] if cached.is_dir() else []
    smol = [p for p in smol if "smollm2" in str(p).lower()]
    if smol:
        return smol[0], f"SmolLM2 tokenizer from {smol[0]}"
    path = work / f"bpe-{vocab}"
    if not (path / "tokenizer.json").is_file():
        import synthetic_feedback
        import tiny_model

        texts = [m["content"] for r in synthetic_feedback.rows(20_000 if vocab > 10_000 else 500, seed=7)
                 for m in [*r["prompt"], *r["completion"]]]
        tiny_model.build_tokenizer(path, texts, vocab_size=vocab)
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(path))
    return path, f"offline byte-level BPE, vocab {size} (asked {vocab}; demo cache absent), ChatML template"


def data_file(work: Path, rows: int) -> Path:
    import synthetic_feedback

    path = work / f"rows-{rows}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".partial")
        synthetic_feedback.write_jsonl(tmp, rows, seed=0)
        tmp.replace(path)
    return path


def previous_package(work: Path, ref: str) -> Path | None:
    """`rdro_cli` as it was at commit `ref` (git archive of this checkout), or None without git history."""
    path = work / f"previous-{ref}"
    if (path / "rdro_cli" / "__init__.py").is_file():
        return path
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "rdro_cli"], check=True,
                                 capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"previous implementation ({ref}) not run: {err}", file=sys.stderr)
        return None
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
    return path


# ---------------------------------------------------------------- contenders (run as subprocesses)


def contender_trl(data: Path, tokenizer: Path, num_proc: int, out: Path) -> None:
    """TRL's own KTO preparation: what `KTOTrainer.__init__` runs on the train dataset before training."""
    from types import SimpleNamespace

    import datasets
    from transformers import AutoTokenizer
    from trl import KTOConfig
    from trl.trainer.kto_trainer import KTOTrainer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(out / "cache"))
    args = KTOConfig(output_dir=str(out / "trl"), dataset_num_proc=num_proc if num_proc > 1 else None,
                     max_length=1024, per_device_train_batch_size=8, report_to=[], use_cpu=True, bf16=False)
    trainer = SimpleNamespace(_tokenizer=tok, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    prepared = KTOTrainer._prepare_dataset(trainer, dataset, tok, args, "train")
    import pyarrow.compute as pc

    tokens = sum(pc.sum(pc.list_value_length(prepared.data.column(c))).as_py() for c in
                 ("prompt_ids", "completion_ids"))
    print(json.dumps({"rows": len(prepared), "tokens": int(tokens)}))


class _FirstStep(BaseException):
    """Raised right after the first batch (logprobs) or optimizer step (train) has been computed."""


def contender_startup(stage: str, data: Path, logprobs: Path, model: Path, out: Path) -> None:
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    baseline = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)  # the model's own footprint
    model_rss = psutil.Process().memory_info().rss / 2**20
    del baseline
    from rdro_cli.cli import app
    from rdro_cli.lm import completion_head
    from rdro_cli.training import loop as train_loop_module

    if stage == "logprobs":
        original = completion_head.completion_logps

        def first_batch(*args, **kwargs):
            original(*args, **kwargs)
            raise _FirstStep

        completion_head.completion_logps = first_batch
        argv = ["logprobs", "--data", str(data), "--model", str(model), "--out", str(out)]
    else:
        original = train_loop_module._optimizer_step

        def first_step(*args, **kwargs):
            original(*args, **kwargs)
            raise _FirstStep

        train_loop_module._optimizer_step = first_step
        argv = ["train", "--data", str(data), "--logprobs", str(logprobs), "--model", str(model), "--out", str(out),
                "--set", "train.batch_size=8"]
    try:
        app(argv, standalone_mode=False)
        raise SystemExit(f"{stage} finished without reaching a first step")
    except _FirstStep:
        pass
    print(json.dumps({"first_step_s": time.perf_counter() - started, "model_rss_mb": model_rss}))


def contender_fake_logprobs(data: Path, model: Path, out: Path) -> None:
    """A valid logprobs artifact for `data` without running the model (zeros), so train can start."""
    import torch

    from rdro_cli import logprobs as stage
    from rdro_cli.recipe import load_recipe

    stage._shard_sequences = lambda split, rows, with_kl, max_length: [([0], 0)] * (len(rows) * (1 + with_kl))
    stage._score = lambda model, sequences, *a, **k: torch.zeros(len(sequences))
    stage.run(load_recipe(None, [], {"model.name": str(model)}), data=data, out=out)


# ---------------------------------------------------------------- the run


def _tile(artifact: Path, rows: int, out: Path) -> Path:
    """`artifact`'s train split repeated to `rows` rows (KL partners shifted with their copy): a stand-in
    for a larger prepare output when only start-up is measured."""
    import datasets
    import numpy as np

    if (out / "manifest.json").is_file():
        return out
    data = datasets.load_from_disk(str(artifact))
    train = data["train"]
    copies = -(-rows // len(train))
    parts = []
    for k in range(copies):
        shift = k * len(train)
        part = train.map(lambda b, s=shift: {"kl_partner": (np.asarray(b["kl_partner"]) + s).tolist(),
                                             "pair_id": [p + s if p >= 0 else p for p in b["pair_id"]]},
                         batched=True, cache_file_name=str(out.parent / f"{out.name}-part{k}.arrow"))
        parts.append(part)
    tiled = datasets.concatenate_datasets(parts).select(range(rows))
    datasets.DatasetDict({"train": tiled, "test": data["test"]}).save_to_disk(str(out))
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["fingerprint"] += f"-tiled-{rows}"
    manifest["counts"]["train"]["rows"] = rows
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,1000000", help="comma-separated row counts for (a)")
    parser.add_argument("--trl-rows", type=int, default=100_000, help="rows for (b), TRL's KTO preparation")
    parser.add_argument("--startup-rows", type=int, default=0,
                        help="rows of the artifact for (c) (default: the largest (a); larger = tiled from it)")
    parser.add_argument("--previous", default=PREVIOUS, help="commit of the previous prepare, run on the --trl-rows "
                        f"file as the same-run baseline (default {PREVIOUS}; 'none' skips it)")
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--num-proc", type=int, default=0, help="workers for both (0 = one per core)")
    parser.add_argument("--work", type=Path, default=None, help="keep inputs and outputs here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="500 rows, a 2k vocabulary: a smoke run")
    parser.add_argument("--contender", choices=("trl", "startup", "fake-logprobs"), help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--logprobs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    num_proc = args.num_proc or cores
    if args.contender == "trl":
        return contender_trl(args.data, args.tokenizer, num_proc, args.out)
    if args.contender == "startup":
        return contender_startup(args.stage, args.data, args.logprobs, args.model, args.out)
    if args.contender == "fake-logprobs":
        return contender_fake_logprobs(args.data, args.model, args.out)

    if args.quick:
        args.rows, args.trl_rows, args.vocab = "500", 500, 2000
    sizes = sorted(int(r) for r in args.rows.split(","))
    with tempfile.TemporaryDirectory(prefix="rdro-prepare-bench-") as tmp:
        work = (args.work or Path(tmp)).resolve()  # the previous implementation runs in another cwd
        work.mkdir(parents=True, exist_ok=True)
        tok, tokenizer_note = tokenizer_dir(work, args.vocab)
        print(f"tokenizer: {tokenizer_note}", file=sys.stderr)
        me = [sys.executable, str(Path(__file__).resolve())]
        results, artifacts_by_size = {}, {}
        for n in sizes:
            source = data_file(work, n)
            out = work / f"prepared-{n}"
            run = measured([sys.executable, "-m", "rdro_cli", "prepare", "--dataset", str(source), "--model", str(tok),
                            "--out", str(out), "--force", "--set", f"data.num_proc={args.num_proc}"],
                           work / f"prepare-{n}.log")
            results[f"rdro_{n}"] = rates(run, n, artifact_tokens(out))
            artifacts_by_size[n] = out
            print(f"rdro prepare {n}: {run['wall_s']:.1f} s, {run['peak_rss_mb']:.0f} MB", file=sys.stderr)
        trl_source = data_file(work, args.trl_rows)
        previous = None if args.previous == "none" else previous_package(work, args.previous)
        if previous is not None:  # one process, one row at a time; its recipe has no data.num_proc
            out = work / "prepared-previous"
            run = measured([sys.executable, "-m", "rdro_cli", "prepare", "--dataset", str(trl_source), "--model",
                            str(tok), "--out", str(out), "--force"], work / "prepare-previous.log", previous)
            results["previous"] = {**rates(run, args.trl_rows, artifact_tokens(out)), "commit": args.previous}
            print(f"previous prepare ({args.previous}) {args.trl_rows}: {run['wall_s']:.1f} s, "
                  f"{run['peak_rss_mb']:.0f} MB", file=sys.stderr)
        run = measured([*me, "--contender", "trl", "--data", str(trl_source), "--tokenizer", str(tok),
                        "--out", str(work / "trl"), "--num-proc", str(num_proc)], work / "trl.log")
        trl_out = json.loads(Path(run["log"]).read_text().strip().splitlines()[-1])
        results["trl"] = rates(run, args.trl_rows, trl_out["tokens"])
        print(f"trl kto prepare {args.trl_rows}: {run['wall_s']:.1f} s, {run['peak_rss_mb']:.0f} MB", file=sys.stderr)

        # (c) start-up on the largest artifact (tiled when --startup-rows asks for more)
        import tiny_model
        from transformers import AutoTokenizer

        model = work / "tiny-model"
        if not (model / "config.json").is_file():
            tiny_model.build_model(model, AutoTokenizer.from_pretrained(tok), "llama", hidden=32, layers=2)
        largest = artifacts_by_size[sizes[-1]]
        startup_rows = max(args.startup_rows, sizes[-1])
        data = largest if startup_rows == sizes[-1] else _tile(largest, startup_rows, work / f"tiled-{startup_rows}")
        fake = work / f"logprobs-{startup_rows}"
        if not (fake / "manifest.json").is_file():
            measured([*me, "--contender", "fake-logprobs", "--data", str(data), "--model", str(model), "--out",
                      str(fake)], work / "fake-logprobs.log")
        for stage in ("logprobs", "train"):
            run = measured([*me, "--contender", "startup", "--stage", stage, "--data", str(data), "--logprobs",
                            str(fake), "--model", str(model), "--out", str(work / f"startup-{stage}")],
                           work / f"startup-{stage}.log")
            inner = json.loads(Path(run["log"]).read_text().strip().splitlines()[-1])
            results[f"{stage}_startup"] = {**run, **inner, "rows": startup_rows,
                                           "above_model_mb": run["peak_rss_mb"] - inner["model_rss_mb"]}

    small, big = f"rdro_{sizes[0]}", f"rdro_{sizes[-1]}"
    trl_match = f"rdro_{args.trl_rows}" if f"rdro_{args.trl_rows}" in results else small
    print(f"\n{'contender':<22}{'rows':>10}{'wall s':>10}{'rows/s':>10}{'tokens/s':>12}{'peak RSS MB':>13}"
          f"{'peak PSS MB':>13}")
    for name in [*(f"rdro_{n}" for n in sizes), *(["previous"] if "previous" in results else []), "trl"]:
        r = results[name]
        print(f"{name:<22}{r['rows']:>10}{r['wall_s']:>10.1f}{r['rows_per_s']:>10.0f}{r['tokens_per_s']:>12.0f}"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_pss_mb']:>13.0f}")
    for stage in ("logprobs", "train"):
        r = results[f"{stage}_startup"]
        print(f"{stage + ' start-up':<22}{r['rows']:>10}{r['first_step_s']:>10.1f}{'':>10}{'':>12}"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_pss_mb']:>13.0f}  (+{r['above_model_mb']:.0f} MB RSS over the "
              f"model alone)")
    ratios = {"rdro_over_trl_rows_per_s": results[trl_match]["rows_per_s"] / results["trl"]["rows_per_s"],
              "rss_largest_over_smallest": results[big]["peak_rss_mb"] / results[small]["peak_rss_mb"],
              "rdro_rows_per_s_over_600": results[small]["rows_per_s"] / 600}
    if "previous" in results:
        ratios["rdro_over_previous_rows_per_s"] = results[trl_match]["rows_per_s"] / results["previous"]["rows_per_s"]
        ratios["rdro_over_previous_peak_rss"] = results[trl_match]["peak_rss_mb"] / results["previous"]["peak_rss_mb"]
    print(f"\nratios: rdro/trl rows/s {ratios['rdro_over_trl_rows_per_s']:.2f}x, peak RSS {sizes[-1]}/{sizes[0]} "
          f"{ratios['rss_largest_over_smallest']:.2f}x, rdro rows/s / 600 (issue's baseline) "
          f"{ratios['rdro_rows_per_s_over_600']:.2f}x"
          + (f", rdro/previous rows/s {ratios['rdro_over_previous_rows_per_s']:.2f}x (same run)"
             if "previous" in results else ""))
    from bench_env import cpu_name

    summary = {**{k: {kk: vv for kk, vv in v.items() if kk != "log"} for k, v in results.items()}, **ratios,
               "tokenizer": tokenizer_note, "machine": cpu_name(), "num_proc": num_proc,
               "load_average": os.getloadavg()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
