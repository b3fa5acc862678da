"""prepare: a feedback dataset -> tokenised rows with an exact prompt/completion boundary.

Reads unpaired (`prompt`, `completion`, `label`) or paired (`prompt`, `chosen`, `rejected`) data from
a short name, a hub id, a local file or a `save_to_disk` directory; applies the tokenizer's chat
template; tokenises so that the completion starts exactly where the template puts it; truncates
(prompts keep their end, completions their start); and saves a `DatasetDict` plus a manifest.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from rdro_cli import artifacts, diskspace, modeling, outputs
from rdro_cli.errors import UserError
from rdro_cli.progress import console
from rdro_cli.recipe import Recipe

SHORT_NAMES = {
    "mix14k": "trl-lib/kto-mix-14k",
    "ufg": "trl-lib/ultrafeedback-gpt-3.5-turbo-helpfulness",
}
PACKAGED = {"demo": ("demo_train.jsonl", "demo_test.jsonl")}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_TRUE = {"true", "1", "yes", "y", "t", "preferred", "good", "desirable"}
_FALSE = {"false", "0", "no", "n", "f", "not_preferred", "bad", "undesirable"}


@dataclass
class Example:
    """One unpaired row before tokenisation; `messages` fields are lists of {role, content}."""

    prompt: list[dict] | str
    completion: list[dict] | str
    label: bool
    pair_id: int
    where: str


# ---------------------------------------------------------------- reading sources


def _read_jsonl(path: Path) -> list[tuple[dict, str]]:
    return [(row, f"{path}:{number}") for number, row in artifacts.read_jsonl(path)]


def _read_json(path: Path) -> dict[str, list[tuple[dict, str]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        if path.read_text(encoding="utf-8").lstrip().startswith("{"):
            return {"train": _read_jsonl(path)}  # JSON lines saved as .json
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        return {split: [(row, f"{path}:{split}[{i}]") for i, row in enumerate(rows)] for split, rows in data.items()}
    if isinstance(data, list):
        return {"train": [(row, f"{path}[{i}]") for i, row in enumerate(data)]}
    raise UserError(f"{path}: expected a list of rows or {{split: [rows]}}, got {type(data).__name__}")


def _read_csv(path: Path) -> list[tuple[dict, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        return [(dict(row), f"{path}:{reader.line_num}") for row in reader]


def _read_parquet(path: Path) -> list[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    return [(row, f"{path} row {i}") for i, row in enumerate(table.to_pylist())]


def _from_datasets(obj, label: str) -> dict[str, list[tuple[dict, str]]]:
    import datasets

    splits = obj if isinstance(obj, datasets.DatasetDict) else {"train": obj}
    return {name: [(row, f"{label} {name}[{i}]") for i, row in enumerate(split)] for name, split in splits.items()}


def _load_hub(dataset_id: str) -> dict[str, list[tuple[dict, str]]]:
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id)
    except Exception as err:  # offline, missing, gated: all mean "cannot get it from here"
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(
            f"cannot load hub dataset {dataset_id!r} ({reason}); on a machine with internet run "
            f"`python -c \"import datasets; datasets.load_dataset('{dataset_id}').save_to_disk('DIR')\"` "
            f"and pass --dataset DIR"
        ) from None
    return _from_datasets(loaded, dataset_id)


def read_source(spec: str) -> tuple[dict[str, list[tuple[dict, str]]], str]:
    """Rows per split (each with a 'where' label for errors) and the source's fingerprint."""
    if not spec:
        raise UserError("no dataset given: pass --dataset (mix14k, ufg, demo, a hub id or a local file)")
    if spec in PACKAGED:
        files = [Path(str(resources.files("rdro_cli") / "data" / name)) for name in PACKAGED[spec]]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UserError(f"packaged dataset {spec!r} is missing {missing[0]}; reinstall rdro-cli")
        return ({"train": _read_jsonl(files[0]), "test": _read_jsonl(files[1])},
                artifacts.fingerprint_files(files))
    path = Path(spec)
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:
            raise UserError(f"{path}: not a datasets save_to_disk directory ({err})") from None
        data_files = [p for p in path.rglob("*") if p.is_file()]
        return _from_datasets(loaded, str(path)), artifacts.fingerprint_files(data_files)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(f"{path}: dataset file not found")
        try:
            reader = {".jsonl": lambda p: {"train": _read_jsonl(p)}, ".json": _read_json,
                      ".csv": lambda p: {"train": _read_csv(p)}, ".parquet": lambda p: {"train": _read_parquet(p)}}
            if path.suffix not in reader:
                raise UserError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
            rows = reader[path.suffix](path)
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot read dataset file ({err})") from None
        return rows, artifacts.fingerprint_files([path])
    dataset_id = SHORT_NAMES.get(spec, spec)
    if "/" not in dataset_id:
        raise UserError(f"{spec!r} is neither a known short name ({', '.join([*SHORT_NAMES, *PACKAGED])}), "
                        f"a local file nor a hub id (owner/name)")
    rows = _load_hub(dataset_id)
    return rows, artifacts.fingerprint_json({"hub": dataset_id, "rows": {k: len(v) for k, v in rows.items()}})


# ---------------------------------------------------------------- parsing rows


def _parse_label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise UserError(f"{where}: label {value!r} is not boolean-like (use true/false or 1/0)")


def _parse_text(value, column: str, where: str, role: str | None = None) -> list[dict] | str:
    """A plain string or a list of {role, content} messages; empty text is an error."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: {column} is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for message in value:
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise UserError(f"{where}: {column} messages need string 'role' and 'content' fields")
        if not any(m["content"].strip() for m in value):
            raise UserError(f"{where}: {column} is empty")
        if role and value[-1]["role"] != role:
            raise UserError(f"{where}: {column} must end with a {role!r} message, got {value[-1]['role']!r}")
        return value
    if value is None or value == []:
        raise UserError(f"{where}: {column} is empty")
    raise UserError(f"{where}: {column} must be a string or a list of {{role, content}} messages, "
                    f"got {type(value).__name__}")


def _columns(row: dict) -> str:
    # repr: a column name may hold anything, newlines included, and the error must stay one line
    return ", ".join(repr(str(name)) for name in row) or "none"


def parse_row(row, where: str, pair_id: int) -> list[Example]:
    """One source row -> one unpaired example, or two for a paired (chosen/rejected) row."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with prompt/completion/label, got {type(row).__name__}")
    if "prompt" not in row:
        raise UserError(f"{where}: missing column 'prompt' (found: {_columns(row)})")
    prompt = _parse_text(row["prompt"], "prompt", where)
    if "chosen" in row or "rejected" in row:
        missing = [c for c in ("chosen", "rejected") if c not in row]
        if missing:
            raise UserError(f"{where}: paired row is missing column {missing[0]!r}")
        return [Example(prompt, _parse_text(row[c], c, where, "assistant"), c == "chosen", pair_id, where)
                for c in ("chosen", "rejected")]
    missing = [c for c in ("completion", "label") if c not in row]
    if missing:
        raise UserError(f"{where}: missing column {missing[0]!r} (found: {_columns(row)}); "
                        f"expected prompt/completion/label or prompt/chosen/rejected")
    completion = _parse_text(row["completion"], "completion", where, "assistant")
    return [Example(prompt, completion, _parse_label(row["label"], where), -1, where)]


def parse_split(rows: list[tuple[dict, str]], first_pair_id: int = 0) -> list[Example]:
    examples = []
    for index, (row, where) in enumerate(rows):
        examples += parse_row(row, where, first_pair_id + index)
    return examples


# ---------------------------------------------------------------- tokenisation


def _messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _prompt_key(example: Example) -> str:
    return json.dumps(example.prompt, sort_keys=True)


def _raw_prompt(example: Example) -> str:
    if isinstance(example.prompt, str):
        return example.prompt
    users = [m["content"] for m in example.prompt if m["role"] == "user"]
    return users[-1] if users else example.prompt[-1]["content"]


def _tokenize_split(examples: list[Example], tokenizer, cfg: Recipe, counts: dict) -> dict[str, list]:
    """Templated prompt + completion ids with the boundary where the template puts it."""
    use_template = bool(tokenizer.chat_template)
    columns = {k: [] for k in ("input_ids", "completion_start", "label", "pair_id", "prompt_text",
                               "completion_text", "prompt", "prompt_key")}
    max_prompt, max_length = cfg.data.max_prompt_length, cfg.data.max_length
    for example in examples:
        if use_template:
            prompt_msgs = _messages(example.prompt, "user")
            prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
            full_text = tokenizer.apply_chat_template(
                prompt_msgs + _messages(example.completion, "assistant"), tokenize=False)
        else:
            prompt_text = example.prompt
            full_text = example.prompt + example.completion + (tokenizer.eos_token or "")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids or not full_text.startswith(prompt_text):
            # The template (or a merge across the boundary) breaks the prefix property: keep the
            # boundary exact by tokenising the completion on its own, and report the row.
            counts["boundary_mismatch"] += 1
            tail = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else full_text
            full_ids = prompt_ids + tokenizer(tail, add_special_tokens=False)["input_ids"]
        completion_ids = full_ids[len(prompt_ids):]
        completion_text = tokenizer.decode(completion_ids)
        if len(prompt_ids) > max_prompt:
            prompt_ids = prompt_ids[-max_prompt:]
            counts["truncated_prompt"] += 1
        if len(prompt_ids) + len(completion_ids) > max_length:
            completion_ids = completion_ids[: max_length - len(prompt_ids)]
            counts["truncated_completion"] += 1
        if not completion_ids or not prompt_ids:
            counts["dropped_empty_completion"] += 1
            continue
        columns["input_ids"].append(prompt_ids + completion_ids)
        columns["completion_start"].append(len(prompt_ids))
        columns["label"].append(example.label)
        columns["pair_id"].append(example.pair_id)
        columns["prompt_text"].append(prompt_text)
        columns["completion_text"].append(completion_text)
        columns["prompt"].append(_raw_prompt(example))
        columns["prompt_key"].append(_prompt_key(example))
    return columns


def _kl_partners(prompt_keys: list[str], seed: int) -> list[int]:
    """A fixed pairing: each row gets the completion of another row with a different prompt (KTO)."""
    n = len(prompt_keys)
    order = np.random.default_rng(seed).permutation(n)
    partners = [0] * n
    for position, row in enumerate(order):
        partner = int(order[(position + 1) % n])
        for step in range(2, min(n, 64)):  # skip neighbours that share the prompt
            if prompt_keys[partner] != prompt_keys[row]:
                break
            partner = int(order[(position + step) % n])
        partners[int(row)] = partner
    return partners


def _split_rows(rows: dict[str, list], cfg: Recipe) -> dict[str, list]:
    """train/test source rows; a seeded test split when the source has none."""
    train_name, test_name = cfg.data.train_split, cfg.data.test_split
    if train_name not in rows:
        raise UserError(f"dataset has no {train_name!r} split (found: {', '.join(rows)}); set data.train_split")
    train = rows[train_name]
    if not train:
        raise UserError(f"{cfg.data.dataset}: no rows in the {train_name!r} split")
    if test_name in rows:
        test = rows[test_name]
    else:
        order = np.random.default_rng(cfg.data.seed).permutation(len(train))
        n_test = max(1, round(len(train) * cfg.data.test_fraction))
        if len(train) - n_test < 1:
            raise UserError(f"dataset has only {len(train)} row(s): too few to hold out a test split")
        test = [train[i] for i in sorted(order[:n_test])]
        train = [train[i] for i in sorted(order[n_test:])]
    if cfg.data.limit:
        train, test = train[: cfg.data.limit], test[: cfg.data.limit]
    return {"train": train, "test": test}


def _length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {"length_p50": float(p50), "length_p90": float(p90), "length_p99": float(p99),
            "length_max": int(max(lengths)), "tokens": int(sum(lengths))}


def _load_tokenizer(cfg: Recipe):
    if not cfg.model.name:
        raise UserError("no tokenizer: pass --model (a hub id or local dir) or set model.name")
    tokenizer = modeling.load_tokenizer(cfg.model.name, revision=cfg.model.revision or None,
                               trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.chat_template:
        template = Path(cfg.model.chat_template)
        tokenizer.chat_template = template.read_text() if template.is_file() else cfg.model.chat_template
    return tokenizer


# ---------------------------------------------------------------- the stage


def run(cfg: Recipe, *, out: Path | None = None, force: bool = False) -> Path:
    started = time.time()
    out = Path(out or cfg.run_dir / "data")
    outputs.claim(out, "prepare", inputs=outputs.local_paths(cfg.data.dataset, cfg.model.name, cfg.model.chat_template))
    rows, source_fp = read_source(cfg.data.dataset)
    splits = _split_rows(rows, cfg)
    parsed = {"train": parse_split(splits["train"]), "test": parse_split(splits["test"], len(splits["train"]))}
    for name, examples in parsed.items():
        if not examples:
            raise UserError(f"{cfg.data.dataset}: the {name} split has no rows")
    labels = {ex.label for ex in parsed["train"]}
    if len(labels) < 2:
        only = "preferred" if labels == {True} else "non-preferred"
        raise UserError(f"{cfg.data.dataset}: every training row is {only}; RDRO needs both labels")

    tokenizer = _load_tokenizer(cfg)
    is_conversational = any(isinstance(ex.prompt, list) or isinstance(ex.completion, list)
                            for ex in parsed["train"][:100])
    if is_conversational and not tokenizer.chat_template:
        raise UserError(f"{cfg.model.name}: tokenizer has no chat template for conversational data; "
                        f"supply one with --chat-template FILE (model.chat_template)")
    template_fp = artifacts.fingerprint_json(tokenizer.chat_template or "")
    inputs = {"dataset": source_fp, "tokenizer": modeling.tokenizer_fingerprint(tokenizer), "chat_template": template_fp}
    data_config = {k: getattr(cfg.data, k) for k in ("max_length", "max_prompt_length", "test_fraction", "seed",
                                                      "limit", "train_split", "test_split")}
    fingerprint = artifacts.fingerprint_json({"inputs": inputs, "config": data_config})
    if not force and artifacts.is_done(out, fingerprint):
        console.print(f"prepare: {out} is up to date (use --force to recompute)", soft_wrap=True)
        return out

    import datasets

    from rdro_cli.progress import task_progress

    datasets.disable_progress_bars()

    counts, columns = {}, {}
    with task_progress() as progress:
        for name, examples in parsed.items():
            task = progress.add_task(f"tokenising {name}", total=None)
            split_counts = dict.fromkeys(("boundary_mismatch", "truncated_prompt", "truncated_completion",
                                          "dropped_empty_completion"), 0)
            columns[name] = _tokenize_split(examples, tokenizer, cfg, split_counts)
            progress.update(task, completed=len(examples), total=len(examples))
            kept = columns[name]["label"]
            if not kept:
                raise UserError(f"{cfg.data.dataset}: every {name} row was dropped (completions empty after "
                                f"truncation to data.max_length={cfg.data.max_length}); raise data.max_length")
            columns[name]["kl_partner"] = _kl_partners(columns[name]["prompt_key"], cfg.data.seed)
            preferred = int(sum(kept))
            counts[name] = {"source_rows": len(splits[name]), "rows": len(kept), "preferred": preferred,
                            "non_preferred": len(kept) - preferred,
                            "pairs": len({p for p in columns[name]["pair_id"] if p >= 0}),
                            **split_counts, **_length_stats([len(ids) for ids in columns[name]["input_ids"]])}
    if counts["train"]["preferred"] in (0, counts["train"]["rows"]):
        raise UserError(f"{cfg.data.dataset}: after truncation the training split has only one label")

    # int32 ids, and the texts beside them take about as much again
    need = 8 * sum(len(ids) for cols in columns.values() for ids in cols["input_ids"]) + 65536
    with diskspace.writing(out, need), artifacts.atomic_dir(out) as tmp:
        features = datasets.Features({
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "completion_start": datasets.Value("int32"), "label": datasets.Value("bool"),
            "pair_id": datasets.Value("int64"), "kl_partner": datasets.Value("int64"),
            "prompt_text": datasets.Value("string"), "completion_text": datasets.Value("string"),
            "prompt": datasets.Value("string"),
        })
        dataset = datasets.DatasetDict({
            name: datasets.Dataset.from_dict({k: v for k, v in cols.items() if k != "prompt_key"}, features=features)
            for name, cols in columns.items()
        })
        dataset.save_to_disk(str(tmp))
        preferred_fraction = counts["train"]["preferred"] / counts["train"]["rows"]
        artifacts.write_manifest(
            tmp, stage="prepare", fingerprint=fingerprint, inputs=inputs, config=cfg.to_dict(), counts=counts,
            started=started, preferred_fraction=preferred_fraction, paired=any(
                c["pairs"] for c in counts.values()),
            tokenizer=cfg.model.name, dataset=cfg.data.dataset,
        )
    _print_summary(out, counts, preferred_fraction)
    return out


def _print_summary(out: Path, counts: dict, preferred_fraction: float) -> None:
    from rich.table import Table

    table = Table(title=f"prepare -> {out}")
    for column in ("split", "rows", "preferred", "non-preferred", "pairs", "dropped", "truncated", "boundary!=",
                   "p50 len", "max len"):
        table.add_column(column, justify="right")
    for name, c in counts.items():
        table.add_row(name, str(c["rows"]), str(c["preferred"]), str(c["non_preferred"]), str(c["pairs"]),
                      str(c["dropped_empty_completion"]), str(c["truncated_prompt"] + c["truncated_completion"]),
                      str(c["boundary_mismatch"]), f"{c['length_p50']:.0f}", str(c["length_max"]))
    console.print(table)
    console.print(f"preferred fraction (train): {preferred_fraction:.4f}")
