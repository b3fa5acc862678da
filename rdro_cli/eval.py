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
import re
import time
from pathlib import Path

import numpy as np
import torch

from rdro_cli import artifacts, diskspace, outputs
from rdro_cli.errors import UserError
from rdro_cli.metrics import auc
from rdro_cli.modeling import ADAPTER_CONFIG, TOKENIZER_FILES
from rdro_cli.recipe import Recipe

ANSWER_PHRASE = re.compile(r"the answer is\s*:?\s*(.*)", re.IGNORECASE | re.DOTALL)
OPTION = re.compile(r"\(([A-Za-z])\)|([A-Za-z])$")
BBH_QUESTION = "Q: {input}\nA: Let's think step by step."


# ---------------------------------------------------------------------------------------------------------
# Scoring (pure functions)


def pair_accuracy(logratios, labels, pair_ids) -> tuple[float | None, int]:
    """(fraction of pairs whose preferred row has the larger log-ratio, ties half; number of whole pairs)."""
    chosen, rejected = {}, {}
    for r, label, pair in zip(np.asarray(logratios, dtype=np.float64).tolist(), labels, pair_ids, strict=True):
        if pair >= 0:
            (chosen if label else rejected)[int(pair)] = r
    pairs = sorted(chosen.keys() & rejected.keys())
    if not pairs:
        return None, 0
    wins = sum(1.0 if chosen[p] > rejected[p] else 0.5 if chosen[p] == rejected[p] else 0.0 for p in pairs)
    return wins / len(pairs), len(pairs)


def preference_metrics(logratios, labels, pair_ids) -> dict:
    logratios = np.asarray(logratios, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    accuracy, pairs = pair_accuracy(logratios, labels, pair_ids)

    def mean(values):
        return float(values.mean()) if len(values) else None

    return {"mean_logratio_preferred": mean(logratios[labels]),
            "mean_logratio_non_preferred": mean(logratios[~labels]),
            "auc": auc(logratios, labels), "pair_accuracy": accuracy, "pairs": pairs}


def extract_answer(output: str, pattern: str) -> str | None:
    """The answer in a generated output: the regex's first group (or whole match); the stripped output
    when `pattern` is empty; None when the pattern does not match."""
    if not pattern:
        return output.strip()
    match = re.search(pattern, output)
    if match is None:
        return None
    return (match.group(1) if match.re.groups else match.group(0)).strip()


def bbh_extract(output: str) -> str:
    """What follows "the answer is" up to the end of its line; without the phrase, the first non-empty line.

    Text after a new "Q:" (a model continuing the few-shot pattern with its own next question) is ignored.
    """
    text = output.split("\nQ:")[0]
    match = ANSWER_PHRASE.search(text)
    tail = match.group(1) if match else text
    lines = [line.strip() for line in tail.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def bbh_normalise(answer: str) -> str:
    """"(a)", "A", "A." and "(A) yes" all become "(A)"; anything else is trimmed of a final period,
    whitespace-collapsed and case-folded."""
    text = " ".join(answer.replace("**", "").split()).strip().rstrip(".").strip()
    option = OPTION.match(text)
    if option:
        return f"({(option.group(1) or option.group(2)).upper()})"
    return text.casefold()


def bbh_correct(output: str, target: str) -> tuple[str, bool]:
    extracted = bbh_extract(output)
    return extracted, bbh_normalise(extracted) == bbh_normalise(str(target))


# ---------------------------------------------------------------------------------------------------------
# Inputs: each reader checks its files before any model is loaded and returns (payload, input fingerprints)


def _data_dir(cfg: Recipe, data: Path | None) -> tuple[Path, dict]:
    directory = Path(data or cfg.run_dir / "data")
    return directory, artifacts.require_input(directory, "prepare")


def _test_split(directory: Path, cfg: Recipe):
    import datasets

    test = datasets.load_from_disk(str(directory))["test"]
    return test.select(range(min(cfg.eval.limit, len(test)))) if cfg.eval.limit else test


def read_preference(cfg: Recipe, data: Path | None, logprobs: Path | None) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    data_dir, data_manifest = _data_dir(cfg, data)
    logprobs_dir = Path(logprobs or cfg.run_dir / "logprobs")
    manifest = artifacts.require_input(logprobs_dir, "logprobs")
    artifacts.check_inputs_match(logprobs_dir, manifest, {"data": data_manifest["fingerprint"]},
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
        fingerprint = {"generate_prompts": artifacts.fingerprint_files([path])}
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
    for number, row in artifacts.read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
            raise UserError(f'{path}:{number}: expected {{"prompt": "...", "answer": ...}}')
        rows.append({"prompt": row["prompt"], "answer": str(row["answer"])})
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows[: cfg.eval.limit or None], {"exact_match_file": artifacts.fingerprint_files([path])}


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
    return tasks, {"bbh": artifacts.fingerprint_files(used)}


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


READERS = {"preference": read_preference, "generate": read_generate, "exact_match": read_exact_match,
           "bbh": read_bbh}


# ---------------------------------------------------------------------------------------------------------
# The model


def resolve_model(cfg: Recipe) -> str:
    """eval.model, else <run>/merged when complete and made from the current adapter, else <run>/train/final."""
    if cfg.eval.model:
        return cfg.eval.model
    merged, final = cfg.run_dir / "merged", cfg.run_dir / "train" / "final"
    manifest = artifacts.read_manifest(merged)
    if manifest is not None and manifest.get("stage") == "merge":
        if (final / ADAPTER_CONFIG).is_file():
            from rdro_cli.modeling import model_fingerprint

            if manifest.get("inputs", {}).get("adapter") != model_fingerprint(final):
                _console().print(f"eval: {merged} was merged from an older adapter; evaluating {final} "
                                 f"(re-run `rdro merge` to refresh it)")
                return str(final)
        return str(merged)
    if final.is_dir():
        return str(final)
    raise UserError(f"no model to evaluate: neither {merged} nor {final} exists; "
                    f"pass --model DIR or run `rdro train` first")


def _adapter_base(directory: Path, cfg: Recipe) -> str:
    recorded = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if recorded and Path(recorded).expanduser().is_dir():
        return recorded
    base = cfg.model.name or recorded
    if not base:
        raise UserError(f"{directory}: the adapter does not record its base model; set model.name")
    return base


def check_model(name: str, cfg: Recipe) -> dict:
    """Input fingerprints of the model (and an adapter's base); one-line errors for unusable dirs."""
    from rdro_cli.modeling import model_fingerprint

    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise UserError(f"{name}: a file; pass the model directory (with config.json)")
    if local.is_dir():
        artifacts.require_finished_model(local)
        if not any((local / f).is_file() for f in ("config.json", ADAPTER_CONFIG)):
            raise UserError(f"{name}: not a model directory (no config.json or {ADAPTER_CONFIG})")
        if not any((local / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(f"{name}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); save the tokenizer "
                            f"next to the model with tokenizer.save_pretrained(DIR)")
        if (local / ADAPTER_CONFIG).is_file():
            base = _adapter_base(local, cfg)
            return {"model": model_fingerprint(local),
                    "base": model_fingerprint(base, revision=cfg.model.revision or None)}
        return {"model": model_fingerprint(local)}
    return {"model": model_fingerprint(name, revision=cfg.model.revision or None)}


def _training_manifest(model: Path) -> dict | None:
    """The train manifest a model directory came from: `<train>/final`, or a merge of such an adapter."""
    manifest = artifacts.read_manifest(model)
    if manifest and manifest.get("stage") == "merge" and manifest.get("adapter"):
        model = Path(manifest["adapter"])
    if model.name != "final":
        return None
    manifest = artifacts.read_manifest(model.parent)
    return manifest if manifest and manifest.get("stage") == "train" else None


def provenance_warnings(model_name: str, inputs: dict) -> list[str]:
    """What eval should say when the model was trained by rdro on another prepare artifact than the one it
    scores (whose test split may then hold its training prompts), or against other reference log-probs."""
    local = Path(model_name).expanduser()
    manifest = _training_manifest(local) if local.is_dir() else None
    if manifest is None:
        return []
    found = []
    trained = manifest.get("inputs", {})
    if inputs.get("data") and trained.get("data") and trained["data"] != inputs["data"]:
        found.append(f"{model_name} was trained on another prepare artifact (data {trained['data'][:12]}) than "
                     f"the one scored here ({inputs['data'][:12]}); its test split may hold prompts the model "
                     f"was trained on")
    if inputs.get("logprobs") and trained.get("logprobs") and trained["logprobs"] != inputs["logprobs"]:
        found.append(f"{model_name} was trained against other reference log-probs (logprobs "
                     f"{trained['logprobs'][:12]}) than the ones its preference log-ratios are taken against "
                     f"here ({inputs['logprobs'][:12]})")
    return found


def load_eval_model(name: str, cfg: Recipe):
    """(model in eval mode on the accelerator if any, tokenizer); an adapter dir is loaded with peft on its base."""
    from rdro_cli.modeling import load_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    local = Path(name).expanduser()
    is_adapter = (local / ADAPTER_CONFIG).is_file()
    revision = None if local.is_dir() else cfg.model.revision or None
    tokenizer = load_tokenizer(name, revision=revision, trust_remote_code=cfg.model.trust_remote_code)
    options = dict(dtype=cfg.model.dtype, device=device, trust_remote_code=cfg.model.trust_remote_code,
                   allow_pickle=cfg.model.allow_pickle)
    if is_adapter:
        from peft import PeftModel

        from rdro_cli.peft_compat import building_peft_model

        base = _adapter_base(local, cfg)
        with building_peft_model():
            model = PeftModel.from_pretrained(load_model(base, revision=cfg.model.revision or None, **options),
                                              str(local)).eval()
    else:
        model = load_model(name, revision=revision, **options)
    return model, tokenizer


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _console():
    from rdro_cli.progress import console

    return console


# ---------------------------------------------------------------------------------------------------------
# Shared by generate / exact_match / bbh


def chat_prompt(tokenizer, text: str) -> str:
    """`text` as one user message through the chat template (or as it is without a template)."""
    if not tokenizer.chat_template:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def generate(model, tokenizer, prompts: list[str], cfg: Recipe, description: str, *,
             greedy: bool = False) -> list[str]:
    """Batched `model.generate` with left padding; the decoded new tokens of each prompt, in order.

    Prompts are templated text, tokenised without added special tokens (as `prepare` does).
    """
    from transformers import GenerationConfig

    from rdro_cli.progress import task_progress

    sample = cfg.eval.do_sample and not greedy
    if tokenizer.pad_token is None:  # left padding needs some token; masked out, so eos does
        if tokenizer.eos_token is None:
            raise UserError("the tokenizer has neither a pad nor an eos token; batched generation needs one")
        tokenizer.pad_token = tokenizer.eos_token
    eos = model.generation_config.eos_token_id
    eos = [*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tokenizer.eos_token_id]
    options = dict(temperature=cfg.eval.temperature, top_k=0, top_p=1.0) if sample else {}
    config = GenerationConfig(max_new_tokens=cfg.eval.max_new_tokens, do_sample=sample,
                              pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=sorted({e for e in eos if e is not None}) or None, **options)
    if sample:
        torch.manual_seed(cfg.train.seed)
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    outputs: list[str] = [""] * len(prompts)
    with task_progress() as progress, torch.inference_mode():
        task = progress.add_task(description, total=len(prompts))
        for start in range(0, len(order), cfg.eval.batch_size):
            batch = order[start : start + cfg.eval.batch_size]
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(_device(model))
            generated = model.generate(**encoded, generation_config=config)
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                outputs[i] = text.strip()
            progress.advance(task, len(batch))
    return outputs


# ---------------------------------------------------------------------------------------------------------
# Tasks: (model, tokenizer, payload from the reader, cfg, output dir) -> results for eval.json


def policy_logps(model, rows: dict, pad_id: int, cfg: Recipe) -> torch.Tensor:
    """s_pol for every row, batched by token budget over length-sorted rows, in row order."""
    from rdro_cli.modeling import collate, completion_logps, token_budget_batches
    from rdro_cli.progress import task_progress

    ids, starts = rows["input_ids"], rows["completion_start"]
    logps = torch.empty(len(ids), dtype=torch.float32)
    device = _device(model)
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
    texts = [p["prompt_text"] or chat_prompt(tokenizer, p["instruction"]) for p in prompts]
    outputs = generate(model, tokenizer, texts, cfg, "generate")
    records = [{"instruction": p["instruction"], "output": o, "generator": generator, "dataset": p["dataset"]}
               for p, o in zip(prompts, outputs, strict=True)]
    (out / "generations.json").write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    words = [len(o.split()) for o in outputs]
    return {"prompts": len(records), "file": "generations.json", "generator": generator,
            "mean_output_words": float(np.mean(words)) if words else 0.0}


def eval_exact_match(model, tokenizer, rows: list[dict], cfg: Recipe, out: Path) -> dict:
    outputs = generate(model, tokenizer, [chat_prompt(tokenizer, r["prompt"]) for r in rows], cfg,
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
        prompts = [chat_prompt(tokenizer, f"{task['fewshot']}\n\n{q}" if task["fewshot"] else q)
                   for q in questions]
        outputs = generate(model, tokenizer, prompts, cfg, f"bbh: {name}", greedy=True)
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


# ---------------------------------------------------------------------------------------------------------
# The stage


def _examples(task: str, payload) -> int:
    if task == "preference":
        return len(payload["label"])
    if task == "bbh":
        return sum(len(t["examples"]) for t in payload.values())
    return len(payload)


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
        payloads[task], task_inputs = READERS[task](cfg, data, logprobs)
        inputs.update(task_inputs)
    warnings = provenance_warnings(model_name, inputs)
    for warning in warnings:
        _console().print(f"eval: warning: {warning}", soft_wrap=True)
    settings = {"eval": dataclasses.asdict(cfg.eval), "dtype": cfg.model.dtype, "model": model_name}
    fingerprint = artifacts.fingerprint_json({"inputs": inputs, "settings": settings})
    if not force and artifacts.is_done(out, fingerprint):
        _console().print(f"eval: {out} is up to date (use --force to recompute)", soft_wrap=True)
        return out

    model, tokenizer = load_eval_model(model_name, cfg)
    if "preference" in payloads:
        from rdro_cli.modeling import require_tokenizer

        require_tokenizer(tokenizer, payloads["preference"]["tokenizer"], model=model_name,
                          data=data or cfg.run_dir / "data")
    runners = {"preference": eval_preference, "generate": eval_generate, "exact_match": eval_exact_match,
               "bbh": eval_bbh}
    results = {}
    # eval writes per-example records: a few KiB per example is a generous estimate
    need = 4096 * sum(_examples(task, payload) for task, payload in payloads.items()) + 16384  # + manifest
    with diskspace.writing(out, need), artifacts.atomic_dir(out) as tmp:
        for task in tasks:
            extra = {"generator": generator_name(model_name)} if task == "generate" else {}
            results[task] = runners[task](model, tokenizer, payloads[task], cfg, tmp, **extra)
        (tmp / "eval.json").write_text(json.dumps({"model": model_name, "tasks": results,
                                                   **({"warnings": warnings} if warnings else {})}, indent=2)
                                       + "\n", encoding="utf-8")
        counts = {task: _examples(task, payload) for task, payload in payloads.items()}
        artifacts.write_manifest(tmp, stage="eval", fingerprint=fingerprint, inputs=inputs, config=cfg.to_dict(),
                                 counts=counts, started=started, model=model_name)
    _print_table(out, model_name, results)
    return out
