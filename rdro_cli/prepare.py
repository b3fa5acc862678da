"""prepare: a feedback dataset -> tokenised rows with an exact prompt/completion boundary.

Reads unpaired (`prompt`, `completion`, `label`) or paired (`prompt`, `chosen`, `rejected`) data from
a short name, a hub id, a local file or a `save_to_disk` directory (`rdro_cli.sources`); applies the
tokenizer's chat template and tokenises so that the completion starts exactly where the template puts it
(`rdro_cli.tokenising`), in `Dataset.map` worker processes that write to disk as they go, so memory does
not grow with the number of rows; draws a seeded test split grouped by prompt, counts exact duplicates
and fixes KL partners (`rdro_cli.splitting`, vectorised); and saves a `DatasetDict` plus a manifest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from rdro_cli.dataprep import dataset_files, splitting, tokenising
from rdro_cli.dataprep.rows import is_conversational, parse_row  # noqa: F401  (parse_row: prepare's row rules)
from rdro_cli.dataprep.sources import read_source
from rdro_cli.errors import UserError
from rdro_cli.lm import fingerprints, loading
from rdro_cli.progress import console
from rdro_cli.recipe import Recipe
from rdro_cli.store import digests, diskspace, durable, manifests, outputs

COUNTED = ("boundary_mismatch", "truncated_prompt", "truncated_completion")
BATCH_ROWS = 1000  # source rows per map batch (and per worker progress update)
CHUNK_ROWS = 100_000  # source rows per round of map workers (their memory ends with the chunk)
PROGRESS_DELAY_S = 1.0  # a progress bar appears once its work has taken this long
ARTIFACT_COLUMNS = ("input_ids", "completion_start", "label", "pair_id", "kl_partner", "prompt_text",
                    "completion_text", "prompt")


def _num_proc(cfg: Recipe, rows: int) -> int:
    """data.num_proc (0 = one per available core), never more workers than batches of rows."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = cfg.data.num_proc or cores
    return max(1, min(wanted, -(-rows // BATCH_ROWS)))


@contextlib.contextmanager
def _map_progress(progress, description: str, total: int):
    """Feed `Dataset.map`'s own row counter (what its workers report as they go) to a progress task.

    `datasets` drives a tqdm bar from the rows each worker has finished; standing in for that bar is the
    one way to see rows advance inside workers (if a datasets release renames it, progress only jumps).
    The task appears once the work has taken PROGRESS_DELAY_S: sub-second work leaves no bar, so a one-line error
    right after it stays one line in a log."""
    import datasets.arrow_dataset as arrow_dataset

    state = {"task": None, "done": 0, "started": time.monotonic()}

    def advance(n: int) -> None:
        state["done"] += n
        if state["task"] is None and time.monotonic() - state["started"] >= PROGRESS_DELAY_S:
            state["task"] = progress.add_task(description, total=total, completed=state["done"])
        elif state["task"] is not None:
            progress.advance(state["task"], n)

    class Counter:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            advance(n)

        def close(self):
            pass

    original = getattr(arrow_dataset, "hf_tqdm", None)
    if original is not None:
        arrow_dataset.hf_tqdm = Counter
    try:
        yield
    finally:
        if original is not None:
            arrow_dataset.hf_tqdm = original


@contextlib.contextmanager
def _interrupt_here_only():
    """Ctrl-C in a terminal signals the whole process group, `Dataset.map`'s workers too: each would print a
    KeyboardInterrupt traceback. Workers forked inside this block inherit a handler that ignores SIGINT; this
    process raises KeyboardInterrupt as usual, the map's pool terminates the workers, and the CLI prints one
    line. (Workers of other start methods ignore it from their first batch: `tokenising.tokenise_batch`.)"""
    main = os.getpid()

    def handler(signum, frame):
        if os.getpid() == main:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # ignored or someone else's
        yield
        return
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _tokenise(split, name: str, tokenizer, settings, work: Path, cfg: Recipe, progress):
    """Every row of one source split through `tokenising.tokenise_batch`, written under `work`; the split's
    tokenised rows and the Arrow files that hold them, in order.

    A split is mapped CHUNK_ROWS source rows at a time, each chunk by a fresh set of workers: a worker's
    memory (the source pages it has read, memory-mapped) then ends with its chunk, not with the split."""
    import datasets

    dataset = split.dataset
    parts = []
    with _map_progress(progress, f"tokenising {name}", len(dataset)), _interrupt_here_only():
        for k, start in enumerate(range(0, max(len(dataset), 1), CHUNK_ROWS)):
            stop = min(len(dataset), start + CHUNK_ROWS)
            part = dataset.select(range(start, stop)) if (start, stop) != (0, len(dataset)) else dataset
            num_proc = _num_proc(cfg, len(part))
            if num_proc > 1:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
            parts.append(part.map(
                tokenising.tokenise_batch, batched=True, batch_size=BATCH_ROWS, with_indices=True,
                fn_kwargs={"tokenizer": tokenizer, "settings": settings, "offset": start},
                remove_columns=part.column_names, features=tokenising.features(),
                num_proc=num_proc if num_proc > 1 else None, cache_file_name=str(work / f"tokenised-{name}-{k}.arrow"),
                new_fingerprint=f"rdro-tokenised-{name}-{k}", load_from_cache_file=False, desc=f"tokenising {name}",
            ))
    files = [f["filename"] for part in parts for f in part.cache_files]
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), files


def _column(dataset, name: str) -> np.ndarray:
    return dataset.data.column(name).to_numpy()


def _lengths(dataset) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.data.column("input_ids")).to_numpy(zero_copy_only=False)


def _source_split_rows(tokenised: dict, sources: dict, cfg: Recipe) -> dict[str, tuple[str, np.ndarray]]:
    """For train and test: (which tokenised source split, its source-row indices), ascending."""
    train_name, test_name = cfg.data.train_split, cfg.data.test_split
    if train_name not in sources:
        raise UserError(f"dataset has no {train_name!r} split (found: {', '.join(sources)}); set data.train_split")
    n_train = len(sources[train_name].dataset)
    if not n_train:
        raise UserError(f"{cfg.data.dataset}: no rows in the {train_name!r} split")
    if test_name in sources:
        picked = {"train": (train_name, np.arange(n_train)),
                  "test": (test_name, np.arange(len(sources[test_name].dataset)))}
    else:
        # one prompt per source row (a paired row's two halves share it)
        src, prompt_hash = _column(tokenised[train_name], "_src"), _column(tokenised[train_name], "_prompt_hash")
        per_row = np.zeros(n_train, dtype=np.int64)
        per_row[src] = prompt_hash
        train_rows, test_rows = splitting.grouped_test_split(per_row, cfg.data.test_fraction, cfg.data.seed)
        picked = {"train": (train_name, train_rows), "test": (train_name, test_rows)}
    if cfg.data.limit:
        picked = {k: (source, rows[: cfg.data.limit]) for k, (source, rows) in picked.items()}
    return picked


def _length_stats(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {"length_p50": float(p50), "length_p90": float(p90), "length_p99": float(p99),
            "length_max": int(lengths.max()), "tokens": int(lengths.sum())}


def _select(tokenised, source_rows: np.ndarray, first_pair_id: int, cfg: Recipe, name: str):
    """The kept output rows of one split, their pair ids and KL partners, and the split's counts."""
    src = _column(tokenised, "_src")
    position = np.searchsorted(source_rows, src)
    member = (position < len(source_rows)) & (source_rows[np.minimum(position, len(source_rows) - 1)] == src)
    flags = {key: _column(tokenised, f"_{key}")[member]
             for key in (*COUNTED, "dropped", "control_text", "control_unprotected")}
    rows = np.flatnonzero(member & ~_column(tokenised, "_dropped"))
    duplicate = splitting.duplicates(_column(tokenised, "_duplicate_hash")[rows])
    n_duplicates = int(duplicate.sum())
    if cfg.data.drop_duplicates:
        rows = rows[~duplicate]
    if not len(rows):
        raise UserError(f"{cfg.data.dataset}: every {name} row was dropped (completions empty after "
                        f"truncation to data.max_length={cfg.data.max_length}); raise data.max_length")
    paired = _column(tokenised, "_paired")[rows]
    pair_id = np.where(paired, np.searchsorted(source_rows, src[rows]) + first_pair_id, -1)
    kl_partner = splitting.kl_partners(_column(tokenised, "_prompt_hash")[rows], cfg.data.seed)
    labels = _column(tokenised, "label")[rows]
    preferred = int(labels.sum())
    counts = {"source_rows": len(source_rows), "rows": len(rows), "preferred": preferred,
              "non_preferred": len(rows) - preferred, "pairs": len(np.unique(pair_id[pair_id >= 0])),
              **{key: int(flags[key].sum()) for key in COUNTED},
              "dropped_empty_completion": int(flags["dropped"].sum()),
              "duplicate_rows": n_duplicates, "dropped_duplicates": n_duplicates if cfg.data.drop_duplicates else 0,
              "control_token_text": int(flags["control_text"].sum()),
              "control_token_text_as_tokens": int(flags["control_unprotected"].sum()),
              "max_token_id": int(_column(tokenised, "_max_id")[rows].max()),
              **_length_stats(_lengths(tokenised)[rows])}
    return rows, pair_id, kl_partner, counts


def _artifact_batches(files: list[str], src: np.ndarray, rows: np.ndarray, pair_id: np.ndarray,
                      kl_partner: np.ndarray, schema, progress, name: str):
    """The artifact's record batches (of `schema`) of one split: the kept `rows` (ascending positions in the
    tokenised split) of the tokenised files, read a batch at a time, with their pair ids and KL partners."""
    import pyarrow as pa

    if len(rows) > 1 and not (np.diff(rows) > 0).all():
        raise RuntimeError("artifact rows must be ascending")
    task = progress.add_task(f"writing {name}", total=len(rows))
    start = 0
    for batch in dataset_files.read_batches(files):
        stop = start + batch.num_rows
        # the files are the tokenised split itself, in its order: checked row by row on the source index
        if not np.array_equal(batch.column("_src").to_numpy(), src[start:stop]):
            raise RuntimeError(f"tokenised files out of order at row {start}")
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            taken = batch.take(pa.array(rows[lo:hi] - start))
            extra = {"pair_id": pa.array(pair_id[lo:hi], pa.int64()), "kl_partner": pa.array(kl_partner[lo:hi], pa.int64())}
            yield pa.RecordBatch.from_arrays([extra[c] if c in extra else taken.column(c) for c in ARTIFACT_COLUMNS],
                                             schema=schema)
            progress.advance(task, hi - lo)
        start = stop
    if start != len(src):
        raise RuntimeError(f"tokenised files hold {start} rows, expected {len(src)}")


def _artifact_features():
    import datasets

    return datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "completion_start": datasets.Value("int32"), "label": datasets.Value("bool"),
        "pair_id": datasets.Value("int64"), "kl_partner": datasets.Value("int64"),
        "prompt_text": datasets.Value("string"), "completion_text": datasets.Value("string"),
        "prompt": datasets.Value("string"),
    })


# ---------------------------------------------------------------- the stage


def run(cfg: Recipe, *, out: Path | None = None, force: bool = False) -> Path:
    started = time.time()
    out = Path(out or cfg.run_dir / "data")
    outputs.claim(out, "prepare", inputs=outputs.local_paths(cfg.data.dataset, cfg.model.name, _template_file(cfg)))
    import datasets

    from rdro_cli.progress import task_progress

    datasets.disable_progress_bars()
    # The work files (Arrow, about the artifact's size) sit beside the output, on the disk that has to hold
    # it anyway (not in a small /tmp); named like atomic_dir's temporaries, so a killed run's are cleaned up.
    # A full disk anywhere in here is one line about the output.
    with diskspace.writing(out), tempfile.TemporaryDirectory(prefix=f"{out.name}.tmp-work", suffix=f"-{os.getpid()}",
                                                             dir=out.parent) as work_dir:
        work = Path(work_dir)
        sources, source_fp = read_source(cfg.data.dataset, work)
        if cfg.data.train_split not in sources:
            raise UserError(f"dataset has no {cfg.data.train_split!r} split (found: {', '.join(sources)}); "
                            f"set data.train_split")
        if not len(sources[cfg.data.train_split].dataset):
            raise UserError(f"{cfg.data.dataset}: no rows in the {cfg.data.train_split!r} split")
        tokenizer = loading.recipe_tokenizer(cfg)
        use_template = bool(tokenizer.chat_template)
        template = _template_name(cfg)
        if use_template:
            tokenising.check_template(tokenizer, template)
        train_source = sources[cfg.data.train_split]
        head = train_source.dataset.select(range(min(100, len(train_source.dataset))))
        conversational = any(is_conversational(example) for example in tokenising.parse_batch(
            head[:], list(range(len(head))), tokenising.Settings(train_source.where, train_source.raw, 2, 1, True))[0])
        if conversational and not use_template:
            raise UserError(f"{cfg.model.name}: tokenizer has no chat template for conversational data; "
                            f"supply one with --chat-template FILE (model.chat_template)")
        template_fp = digests.fingerprint_json(tokenizer.chat_template or "")
        inputs = {"dataset": source_fp, "tokenizer": fingerprints.tokenizer_fingerprint(tokenizer),
                  "chat_template": template_fp}
        data_config = {k: getattr(cfg.data, k) for k in ("max_length", "max_prompt_length", "test_fraction", "seed",
                                                          "limit", "train_split", "test_split", "drop_duplicates")}
        data_config["test_split_by"] = "prompt"
        fingerprint = digests.fingerprint_json({"inputs": inputs, "config": data_config})
        if not force and manifests.is_done(out, fingerprint):
            console.print(f"prepare: {out} is up to date (use --force to recompute)", soft_wrap=True)
            return out
        outputs.refuse_replacing_used(out, "prepare", fingerprint, force=force)

        needed = {cfg.data.train_split, cfg.data.test_split} & set(sources)
        tokenised, files = {}, {}
        with task_progress() as progress:
            for name in sorted(needed, key=lambda s: s != cfg.data.train_split):
                split = sources[name]
                settings = tokenising.Settings(split.where, split.raw, cfg.data.max_length,
                                               cfg.data.max_prompt_length, use_template,
                                               tokenising.control_texts(tokenizer), template, os.getpid())
                tokenised[name], files[name] = _tokenise(split, name, tokenizer, settings, work, cfg, progress)
            # checked inside the progress context: a one-line error then leaves no bar behind in a log
            train_labels = _column(tokenised[cfg.data.train_split], "label")
            if len(np.unique(train_labels)) < 2:
                only = "preferred" if train_labels.all() else "non-preferred"
                raise UserError(f"{cfg.data.dataset}: every training row is {only}; RDRO needs both labels")
            picked = _source_split_rows(tokenised, sources, cfg)
            for name, (_, rows) in picked.items():
                if not len(rows):
                    raise UserError(f"{cfg.data.dataset}: the {name} split has no rows")
            counts, selected = {}, {}
            for name, (source, rows) in picked.items():
                first_pair_id = 0 if name == "train" else len(picked["train"][1])
                selected[name] = _select(tokenised[source], rows, first_pair_id, cfg, name)
                counts[name] = selected[name][3]
            if counts["train"]["preferred"] in (0, counts["train"]["rows"]):
                raise UserError(_one_label_left(cfg, counts["train"]))
        # int32 ids, and the texts beside them take about as much again
        need = 8 * sum(c.get("tokens", 0) for c in counts.values()) + 65536
        with diskspace.writing(out, need), durable.atomic_dir(out) as tmp, task_progress() as progress:
            features = _artifact_features()
            for name in picked:
                source = picked[name][0]
                batches = _artifact_batches(files[source], _column(tokenised[source], "_src"), *selected[name][:3],
                                            features.arrow_schema, progress, name)
                dataset_files.write_split(tmp / name, features, batches, f"{fingerprint[:16]}-{name}")
            dataset_files.write_dict_index(tmp, list(picked))
            preferred_fraction = counts["train"]["preferred"] / counts["train"]["rows"]
            manifests.write_manifest(
                tmp, stage="prepare", fingerprint=fingerprint, inputs=inputs, config=cfg.to_dict(),
                counts=counts, started=started, preferred_fraction=preferred_fraction,
                paired=any(c["pairs"] for c in counts.values()), tokenizer=cfg.model.name,
                dataset=cfg.data.dataset,
            )
    _print_summary(out, counts, preferred_fraction)
    return out


def _template_file(cfg: Recipe) -> str | None:
    """model.chat_template when it names a file; None when it is the template's text (often longer than a file
    name may be, so never looked up as a path) or not set."""
    value = cfg.model.chat_template
    return None if not value or "{{" in value or "{%" in value else value


def _template_name(cfg: Recipe) -> str:
    """The chat template as messages name it: its file, the recipe key holding its text, or the model's own."""
    if not cfg.model.chat_template:
        return f"{cfg.model.name}'s chat template"
    file = _template_file(cfg)
    return f"chat template {file}" if file else "the chat template in model.chat_template"


def _one_label_left(cfg: Recipe, counts: dict) -> str:
    """Why the kept training rows hold one label when the source's training split holds both."""
    only = "preferred" if counts["preferred"] else "non-preferred"
    causes, fixes = [], []
    if cfg.data.limit:
        causes.append(f"data.limit={cfg.data.limit} keeps the first {cfg.data.limit} source rows of each split "
                      f"(in file order)")
        fixes.append("raise data.limit (0 = all rows) or shuffle the file")
    if counts["dropped_empty_completion"]:
        causes.append(f"{counts['dropped_empty_completion']} row(s) had no completion tokens left within "
                      f"data.max_length={cfg.data.max_length}")
        fixes.append("raise data.max_length")
    if counts["dropped_duplicates"]:
        causes.append(f"{counts['dropped_duplicates']} exact duplicate row(s) were dropped (data.drop_duplicates)")
        fixes.append("set data.drop_duplicates = false")
    if not causes:
        causes.append("the held-out test split took every row of the other label")
        fixes.append("add rows of both labels, or give the source a test split of its own")
    return (f"{cfg.data.dataset}: the training split has only {only} rows: {'; '.join(causes)}; RDRO needs both "
            f"labels: {', or '.join(fixes)}")


def _print_summary(out: Path, counts: dict, preferred_fraction: float) -> None:
    from rich.table import Table

    table = Table(title=f"prepare -> {out}")
    for column in ("split", "rows", "preferred", "non-preferred", "pairs", "duplicates", "dropped", "truncated",
                   "boundary!=", "p50 len", "max len"):
        table.add_column(column, justify="right")
    for name, c in counts.items():
        table.add_row(name, str(c["rows"]), str(c["preferred"]), str(c["non_preferred"]), str(c["pairs"]),
                      str(c["duplicate_rows"]), str(c["dropped_empty_completion"] + c["dropped_duplicates"]),
                      str(c["truncated_prompt"] + c["truncated_completion"]),
                      str(c["boundary_mismatch"]), f"{c['length_p50']:.0f}", str(c["length_max"]))
    console.print(table)
    console.print(f"preferred fraction (train): {preferred_fraction:.4f}")
    duplicates = sum(c["duplicate_rows"] for c in counts.values())
    if duplicates:
        kept = "dropped (data.drop_duplicates = true)" if any(c["dropped_duplicates"] for c in counts.values()) \
            else "kept (set data.drop_duplicates = true to drop them)"
        console.print(f"exact duplicate rows: {duplicates}, {kept}")
    unprotected = sum(c["control_token_text_as_tokens"] for c in counts.values())
    if unprotected:
        console.print(f"warning: {unprotected} row(s) hold control-token text (e.g. <|im_end|>) in their content "
                      f"that the chat template alters, so it was tokenised as control tokens")
