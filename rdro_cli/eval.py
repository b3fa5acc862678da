"""eval: score a model on preference separation, generations, exact match and BIG-Bench Hard -> <run>/eval.

Tasks (``eval.tasks``), each one small function below, all results in ``eval.json``:

- ``preference``: on the held-out split, the log-ratio ``r = s_pol − s_ref`` (docs/design.md §1) with ``s_pol``
  from the same chunked head as training and ``s_ref`` precomputed by ``logprobs``. Reports the mean ``r``
  per class, the AUC of ``r`` separating preferred from non-preferred rows (Mann–Whitney, ties count half)
  and, for paired data, the fraction of pairs whose chosen row has the larger ``r`` (ties half); the same
  numbers for the reference model itself (r = 0 everywhere: means 0, AUC 0.5, pair accuracy 0.5) sit next to
  them under ``reference``. ``logratios.safetensors`` keeps ``r`` and the labels for reports.
- ``generate``: completions for the test split's prompts (or an AlpacaEval-style JSON list with
  ``instruction``), written to ``generations.json`` as AlpacaEval model outputs.
- ``exact_match``: a JSONL of ``{prompt, answer}``; the answer is taken from the output with
  ``eval.answer_pattern`` (first capture group, or the whole match; ``-?\\d+`` takes the first integer) or,
  when the pattern is empty, is the whole stripped output.
- ``bbh``: BIG-Bench Hard ``<task>.json`` files (``{"examples": [{"input", "target"}]}``), optional few-shot
  ``<task>.txt`` prompts prepended; the answer is what follows "the answer is" (case-insensitive) in the
  output, else the output's first line; multiple-choice letters compare as ``(X)``, the rest case-folded.

Prompts for exact_match and bbh go through the chat template as one user message (when the tokenizer has
one); generation is batched with left padding, greedy unless ``eval.do_sample`` (exact_match and bbh are
always greedy).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rdro_cli.errors import UserError
from rdro_cli.evaluation.models import check_model, load_eval_model, provenance_warnings, resolve_model
from rdro_cli.evaluation.tasks import TASKS, examples, generator_name
from rdro_cli.recipe import Recipe
from rdro_cli.store import digests, diskspace, durable, manifests, outputs


def _console():
    from rdro_cli.progress import console

    return console


def _print_table(out: Path, model: str, results: dict) -> None:
    from rich.table import Table

    def fmt(value):
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    table = Table(title=f"eval {model} -> {out}")
    for column in ("task", "metric", "model", "reference"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    if "preference" in results:
        p = results["preference"]
        for key in ("mean_logratio_preferred", "mean_logratio_non_preferred", "auc", "pair_accuracy"):
            table.add_row("preference", key, fmt(p[key]), fmt(p["reference"][key]))
    if "generate" in results:
        g = results["generate"]
        table.add_row("generate", f"outputs -> {g['file']}", fmt(g["prompts"]), "")
    if "exact_match" in results:
        e = results["exact_match"]
        table.add_row("exact_match", f"accuracy ({e['correct']}/{e['examples']})", fmt(e["accuracy"]), "")
    if "bbh" in results:
        for name, task in results["bbh"]["tasks"].items():
            table.add_row("bbh", f"{name} ({task['correct']}/{task['examples']})", fmt(task["accuracy"]), "")
        table.add_row("bbh", "mean accuracy", fmt(results["bbh"]["mean_accuracy"]), "")
    _console().print(table)


def run(cfg: Recipe, *, data: Path | None = None, logprobs: Path | None = None, out: Path | None = None,
        force: bool = False) -> Path:
    started = time.time()
    out = Path(out or cfg.run_dir / "eval")
    tasks = list(dict.fromkeys(cfg.eval.tasks))
    if not tasks:
        raise UserError("no tasks to run: set eval.tasks or pass --tasks (preference, generate, exact_match, bbh)")
    model_name = resolve_model(cfg)
    outputs.claim(out, "eval", inputs=[*outputs.local_paths(model_name, cfg.eval.exact_match_file, cfg.eval.bbh_dir,
                                                            cfg.eval.bbh_fewshot_dir, cfg.eval.generate_prompts),
                                       data or cfg.run_dir / "data", logprobs or cfg.run_dir / "logprobs"])
    inputs = check_model(model_name, cfg)
    payloads = {}
    for task in tasks:
        payloads[task], task_inputs = TASKS[task].read(cfg, data, logprobs)
        inputs.update(task_inputs)
    warnings = provenance_warnings(model_name, inputs)
    for warning in warnings:
        _console().print(f"eval: warning: {warning}", soft_wrap=True)
    settings = {"eval": dataclasses.asdict(cfg.eval), "dtype": cfg.model.dtype, "model": model_name}
    fingerprint = digests.fingerprint_json({"inputs": inputs, "settings": settings})
    if not force and manifests.is_done(out, fingerprint):
        _console().print(f"eval: {out} is up to date (use --force to recompute)", soft_wrap=True)
        return out

    model, tokenizer = load_eval_model(model_name, cfg)
    if "preference" in payloads:
        from rdro_cli.lm.fingerprints import require_tokenizer

        require_tokenizer(tokenizer, payloads["preference"]["tokenizer"], model=model_name,
                          data=data or cfg.run_dir / "data")
    results = {}
    # eval writes per-example records: a few KiB per example is a generous estimate
    need = 4096 * sum(examples(task, payload) for task, payload in payloads.items()) + 16384  # + manifest
    with diskspace.writing(out, need), durable.atomic_dir(out) as tmp:
        for task in tasks:
            extra = {"generator": generator_name(model_name)} if task == "generate" else {}
            results[task] = TASKS[task].run(model, tokenizer, payloads[task], cfg, tmp, **extra)
        (tmp / "eval.json").write_text(json.dumps({"model": model_name, "tasks": results,
                                                   **({"warnings": warnings} if warnings else {})}, indent=2)
                                       + "\n", encoding="utf-8")
        counts = {task: examples(task, payload) for task, payload in payloads.items()}
        manifests.write_manifest(tmp, stage="eval", fingerprint=fingerprint, inputs=inputs, config=cfg.to_dict(),
                                 counts=counts, started=started, model=model_name)
    _print_table(out, model_name, results)
    return out
