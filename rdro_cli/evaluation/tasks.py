"""eval's tasks, each a reader (what it needs from disk, and the fingerprints of it) and a runner (the
numbers and files it writes): preference, generate, exact_match and bbh; see `rdro_cli/eval.py` for what
each measures. `TASKS` is the one table of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rdro_cli.errors import UserError
from rdro_cli.evaluation.scoring import bbh_correct, extract_answer, preference_metrics
from rdro_cli.lm import generation
from rdro_cli.lm.loading import device_of
from rdro_cli.recipe import Recipe
from rdro_cli.store import digests, manifests


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; a line that is not JSON is a one-line error."""
    rows = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except ValueError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err})") from None
    return rows


BBH_QUESTION = "Q: {input}\nA: Let's think step by step."


def _data_dir(cfg: Recipe, data: Path | None) -> tuple[Path, dict]:
    directory = Path(data or cfg.run_dir / "data")
    return directory, manifests.require_input(directory, "prepare")


def _test_split(directory: Path, cfg: Recipe):
    import datasets

    test = datasets.load_from_disk(str(directory))["test"]
    return test.select(range(min(cfg.eval.limit, len(test)))) if cfg.eval.limit else test


def read_preference(cfg: Recipe, data: Path | None, logprobs: Path | None) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    data_dir, data_manifest = _data_dir(cfg, data)
    logprobs_dir = Path(logprobs or cfg.run_dir / "logprobs")
    manifest = manifests.require_input(logprobs_dir, "logprobs")
    manifests.check_inputs_match(logprobs_dir, manifest, {"data": data_manifest["fingerprint"]},
                                 rerun="rdro logprobs")
    path = logprobs_dir / "test.safetensors"
    if not path.is_file():
        raise UserError(f"{path}: missing; re-run `rdro logprobs --force`")
    ref_logps = load_file(str(path))["ref_logps"].float()
    test = _test_split(data_dir, cfg)
    full_rows = data_manifest.get("counts", {}).get("test", {}).get("rows", len(test))
    if len(ref_logps) != full_rows:
        raise UserError(f"{path}: {len(ref_logps)} reference log-probs for {full_rows} test rows; "
                        f"re-run `rdro logprobs --force`")
    rows = test.select_columns(["input_ids", "completion_start", "label", "pair_id"])[:]  # plain lists
    rows["ref_logps"] = ref_logps[: len(test)]
    rows["tokenizer"] = data_manifest.get("inputs", {}).get("tokenizer")
    return rows, {"data": data_manifest["fingerprint"], "logprobs": manifest["fingerprint"]}


def read_generate(cfg: Recipe, data: Path | None, logprobs: Path | None) -> tuple[list[dict], dict]:
    """Prompts as {instruction, prompt_text (None = apply the chat template), dataset}."""
    if cfg.eval.generate_prompts:
        path = Path(cfg.eval.generate_prompts)
        items = _read_json(path, "eval.generate_prompts")
        if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("instruction"), str)
                                                  for i in items):
            raise UserError(f'{path}: expected a JSON list of {{"instruction": ...}} objects (AlpacaEval format)')
        prompts = [{"instruction": i["instruction"], "prompt_text": None, "dataset": i.get("dataset", path.stem)}
                   for i in items]
        fingerprint = {"generate_prompts": digests.fingerprint_files([path])}
    else:
        data_dir, manifest = _data_dir(cfg, data)
        import datasets

        test = datasets.load_from_disk(str(data_dir))["test"]
        name = str(manifest.get("dataset") or "test")
        dataset = Path(name).stem if Path(name).exists() else name
        columns = test.select_columns(["prompt_text", "prompt"])[:]
        unique = dict(zip(columns["prompt_text"], columns["prompt"], strict=True))  # first appearance order
        prompts = [{"instruction": raw, "prompt_text": text, "dataset": dataset} for text, raw in unique.items()]
        fingerprint = {"data": manifest["fingerprint"]}
    return prompts[: cfg.eval.limit or None], fingerprint


def read_exact_match(cfg: Recipe, data: Path | None, logprobs: Path | None) -> tuple[list[dict], dict]:
    if not cfg.eval.exact_match_file:
        raise UserError("exact_match needs a JSONL of {prompt, answer}: set eval.exact_match_file")
    if cfg.eval.answer_pattern:
        try:
            re.compile(cfg.eval.answer_pattern)
        except re.error as err:
            raise UserError(f"eval.answer_pattern {cfg.eval.answer_pattern!r} is not a valid regex ({err})") \
                from None
    path = Path(cfg.eval.exact_match_file)
    if not path.is_file():
        raise UserError(f"{path}: exact_match file not found (eval.exact_match_file)")
    rows = []
    for number, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
            raise UserError(f'{path}:{number}: expected {{"prompt": "...", "answer": ...}}')
        rows.append({"prompt": row["prompt"], "answer": str(row["answer"])})
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows[: cfg.eval.limit or None], {"exact_match_file": digests.fingerprint_files([path])}


def read_bbh(cfg: Recipe, data: Path | None, logprobs: Path | None) -> tuple[dict, dict]:
    """{task: {"fewshot": str, "examples": [{input, target}]}} from `<task>.json` (+ `<task>.txt`)."""
    if not cfg.eval.bbh_dir:
        raise UserError("bbh needs a directory of BIG-Bench Hard <task>.json files: set eval.bbh_dir")
    directory = Path(cfg.eval.bbh_dir)
    if not directory.is_dir():
        raise UserError(f"{directory}: BBH directory not found (eval.bbh_dir)")
    files = sorted(directory.glob("*.json"))
    if not files:
        raise UserError(f"{directory}: no <task>.json files (eval.bbh_dir)")
    fewshot_dir = Path(cfg.eval.bbh_fewshot_dir) if cfg.eval.bbh_fewshot_dir else None
    if fewshot_dir is not None and not fewshot_dir.is_dir():
        raise UserError(f"{fewshot_dir}: few-shot directory not found (eval.bbh_fewshot_dir)")
    tasks, used = {}, list(files)
    for path in files:
        examples = _bbh_examples(path)
        fewshot = ""
        if fewshot_dir is not None:
            prompt_file = fewshot_dir / f"{path.stem}.txt"
            if not prompt_file.is_file():
                raise UserError(f"{prompt_file}: few-shot prompt for BBH task {path.stem!r} not found")
            fewshot = _strip_canary(prompt_file.read_text(encoding="utf-8"))
            used.append(prompt_file)
        tasks[path.stem] = {"fewshot": fewshot, "examples": examples[: cfg.eval.limit or None]}
    return tasks, {"bbh": digests.fingerprint_files(used)}


def _bbh_examples(path: Path) -> list[dict]:
    shape = '{"examples": [{"input": "...", "target": "..."}, ...]}'
    content = _read_json(path, "eval.bbh_dir")
    examples = content.get("examples") if isinstance(content, dict) else None
    if not isinstance(examples, list) or not examples:
        raise UserError(f"{path}: not a BIG-Bench Hard task file; expected {shape}")
    for i, example in enumerate(examples):
        if not (isinstance(example, dict) and isinstance(example.get("input"), str)
                and isinstance(example.get("target"), (str, int, float))):
            raise UserError(f"{path}: examples[{i}] is not {{\"input\": str, \"target\": str}}; expected {shape}")
    return [{"input": e["input"], "target": str(e["target"])} for e in examples]


def _strip_canary(text: str) -> str:
    # The published CoT prompt files start with a canary line and "-----" before the task description.
    parts = re.split(r"^-----\s*$", text, maxsplit=1, flags=re.MULTILINE)
    return (parts[1] if len(parts) == 2 else text).strip()


def _read_json(path: Path, key: str):
    if not path.is_file():
        raise UserError(f"{path}: file not found ({key})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def policy_logps(model, rows: dict, pad_id: int, cfg: Recipe) -> torch.Tensor:
    """s_pol for every row, batched by token budget over length-sorted rows, in row order."""
    from rdro_cli.lm.batching import collate, token_budget_batches
    from rdro_cli.lm.completion_head import completion_logps
    from rdro_cli.progress import task_progress

    ids, starts = rows["input_ids"], rows["completion_start"]
    logps = torch.empty(len(ids), dtype=torch.float32)
    device = device_of(model)
    with task_progress() as progress, torch.inference_mode():
        task = progress.add_task("preference: policy log-probs", total=len(ids))
        for batch in token_budget_batches([len(r) for r in ids], cfg.logprobs.max_tokens_per_batch):
            tensors = collate([ids[i] for i in batch], [starts[i] for i in batch], pad_id)
            input_ids, attention_mask, completion_mask = (t.to(device) for t in tensors)
            logps[batch] = completion_logps(model, input_ids, attention_mask, completion_mask,
                                            chunk_size=cfg.logprobs.chunk_size).float().cpu()
            progress.advance(task, len(batch))
    return logps


def eval_preference(model, tokenizer, rows: dict, cfg: Recipe, out: Path) -> dict:
    from safetensors.torch import save_file

    vocab = model.get_input_embeddings().weight.shape[0]
    if max((max(r) for r in rows["input_ids"]), default=0) >= vocab:
        raise UserError(f"the test split has token ids beyond the model's vocabulary ({vocab}): it was prepared "
                        f"with another tokenizer; re-run `rdro prepare` with this model")
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    logratios = policy_logps(model, rows, pad_id, cfg) - rows["ref_logps"]
    labels = torch.as_tensor(rows["label"], dtype=torch.uint8)
    save_file({"logratios": logratios.contiguous(), "labels": labels}, str(out / "logratios.safetensors"))
    metrics = preference_metrics(logratios.numpy(), labels.numpy().astype(bool), rows["pair_id"])
    reference = preference_metrics(np.zeros(len(labels)), labels.numpy().astype(bool), rows["pair_id"])
    return {"rows": len(labels), "preferred": int(labels.sum()), "non_preferred": int(len(labels) - labels.sum()),
            **metrics, "reference": reference}


def eval_generate(model, tokenizer, prompts: list[dict], cfg: Recipe, out: Path, *, generator: str) -> dict:
    texts = [p["prompt_text"] or generation.chat_prompt(tokenizer, p["instruction"]) for p in prompts]
    outputs = generation.generate(model, tokenizer, texts, cfg, "generate")
    records = [{"instruction": p["instruction"], "output": o, "generator": generator, "dataset": p["dataset"]}
               for p, o in zip(prompts, outputs, strict=True)]
    (out / "generations.json").write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    words = [len(o.split()) for o in outputs]
    return {"prompts": len(records), "file": "generations.json", "generator": generator,
            "mean_output_words": float(np.mean(words)) if words else 0.0}


def eval_exact_match(model, tokenizer, rows: list[dict], cfg: Recipe, out: Path) -> dict:
    outputs = generation.generate(model, tokenizer, [generation.chat_prompt(tokenizer, r["prompt"]) for r in rows], cfg,
                       "exact_match", greedy=True)
    records = []
    for row, output in zip(rows, outputs, strict=True):
        extracted = extract_answer(output, cfg.eval.answer_pattern)
        records.append({**row, "output": output, "extracted": extracted,
                        "correct": extracted is not None and extracted == row["answer"].strip()})
    _write_jsonl(out / "exact_match.jsonl", records)
    correct = sum(r["correct"] for r in records)
    return {"examples": len(records), "correct": correct, "accuracy": correct / len(records),
            "file": "exact_match.jsonl"}


def eval_bbh(model, tokenizer, tasks: dict, cfg: Recipe, out: Path) -> dict:
    results, records = {}, []
    for name, task in tasks.items():
        questions = [BBH_QUESTION.format(input=e["input"]) for e in task["examples"]]
        prompts = [generation.chat_prompt(tokenizer, f"{task['fewshot']}\n\n{q}" if task["fewshot"] else q)
                   for q in questions]
        outputs = generation.generate(model, tokenizer, prompts, cfg, f"bbh: {name}", greedy=True)
        correct = 0
        for example, output in zip(task["examples"], outputs, strict=True):
            extracted, ok = bbh_correct(output, example["target"])
            correct += ok
            records.append({"task": name, **example, "output": output, "extracted": extracted, "correct": ok})
        results[name] = {"examples": len(outputs), "correct": correct, "accuracy": correct / len(outputs)}
    _write_jsonl(out / "bbh.jsonl", records)
    return {"tasks": results, "mean_accuracy": float(np.mean([r["accuracy"] for r in results.values()])),
            "file": "bbh.jsonl"}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def generator_name(model: str) -> str:
    """A readable AlpacaEval `generator`: the dir name, with the run's name for <run>/merged, <run>/train/final."""
    path = Path(model)
    if path.name == "merged":
        return f"{path.parent.name}-merged"
    if path.name == "final" and path.parent.name == "train":
        return f"{path.parent.parent.name}-final"
    return path.name or model


def examples(task: str, payload) -> int:
    if task == "preference":
        return len(payload["label"])
    if task == "bbh":
        return sum(len(t["examples"]) for t in payload.values())
    return len(payload)


@dataclass(frozen=True)
class Task:
    """One eval task: `read(cfg, data, logprobs) -> (payload, input fingerprints)` and
    `run(model, tokenizer, payload, cfg, out, **extra) -> results` (eval.json's entry)."""

    read: Callable
    run: Callable


TASKS = {"preference": Task(read_preference, eval_preference), "generate": Task(read_generate, eval_generate),
         "exact_match": Task(read_exact_match, eval_exact_match), "bbh": Task(read_bbh, eval_bbh)}
