"""Where `prepare`'s rows come from: a short name, a hub id, a local file or a `save_to_disk` directory,
each split as an Arrow `datasets.Dataset` on disk (memory-mapped), never as Python lists.

Text files (JSONL, JSON, CSV) become one `_raw` column of JSON text plus `_n`, the row's line number
(JSONL, CSV) or index (JSON), because their rows may mix shapes (a string prompt here, messages there)
that one Arrow schema cannot hold; they are parsed in `prepare`'s worker processes. Arrow sources
(parquet, `save_to_disk`, the hub) keep their own columns and are located by index. A UTF-8 byte-order
mark at the start of a text file is accepted.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rdro_cli.errors import UserError
from rdro_cli.store import digests

SHORT_NAMES = {
    "mix14k": "trl-lib/kto-mix-14k",
    "ufg": "trl-lib/ultrafeedback-gpt-3.5-turbo-helpfulness",
}
PACKAGED = {"demo": ("demo_train.jsonl", "demo_test.jsonl")}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
RAW_FEATURES = {"_raw": "string", "_n": "int64"}


@dataclass
class SourceSplit:
    """One split of the source. A row's location is `where[0] + str(n) + where[1]` (n: line number or
    index); `raw` says the rows are JSON text in `_raw` (with `_n`) rather than native columns."""

    dataset: object
    where: tuple[str, str]
    raw: bool


def _jsonl_lines(path: str):
    with open(path, encoding="utf-8-sig") as handle:  # -sig: a leading BOM is not part of the first row
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield {"_raw": line, "_n": number}


def _csv_rows(path: str):
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield {"_raw": json.dumps(dict(row), ensure_ascii=False), "_n": reader.line_num}


def _json_rows(path: str, split: str | None):
    data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    for index, row in enumerate(data[split] if split is not None else data):
        raw = json.dumps(row, ensure_ascii=False)
        if not raw.isascii():
            try:
                raw.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the file): kept escaped, so Arrow holds
                raw = json.dumps(row)  # the row and the row parser names it in one line
        yield {"_raw": raw, "_n": index}


def _to_arrow(generator, work: Path, path: Path, **kwargs):
    import datasets

    features = datasets.Features({k: datasets.Value(v) for k, v in RAW_FEATURES.items()})
    try:
        loaded = datasets.Dataset.from_generator(generator, features=features, cache_dir=str(work / "source"),
                                                 gen_kwargs={"path": str(path), **kwargs})
        if loaded.column_names != list(RAW_FEATURES):  # a file with no rows has no columns either
            loaded = datasets.Dataset.from_dict({k: [] for k in RAW_FEATURES}, features=features)
        return loaded
    except Exception as err:  # datasets wraps what the generator raised
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            if isinstance(cause, UserError | UnicodeDecodeError | OSError):
                break
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, UnicodeDecodeError | OSError):
            raise UserError(f"{path}: cannot read dataset file ({cause})") from None
        if "corresponds to no data" in str(err):  # a file with no rows
            return datasets.Dataset.from_dict({k: [] for k in RAW_FEATURES}, features=features)
        raise


def _read_json(path: Path, work: Path) -> dict[str, SourceSplit]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except ValueError as err:
        if text.lstrip().startswith("{"):  # JSON lines saved as .json
            return {"train": SourceSplit(_to_arrow(_jsonl_lines, work, path), (f"{path}:", ""), True)}
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        return {split: SourceSplit(_to_arrow(_json_rows, work, path, split=split), (f"{path}:{split}[", "]"), True)
                for split in data}
    if isinstance(data, list):
        return {"train": SourceSplit(_to_arrow(_json_rows, work, path, split=None), (f"{path}[", "]"), True)}
    raise UserError(f"{path}: expected a list of rows or {{split: [rows]}}, got {type(data).__name__}")


def _read_parquet(path: Path, work: Path) -> dict[str, SourceSplit]:
    import datasets

    try:
        loaded = datasets.Dataset.from_parquet(str(path), cache_dir=str(work / "source"))
    except Exception as err:  # pyarrow raises several types for a corrupt file
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a readable parquet file ({reason})") from None
    return {"train": SourceSplit(loaded, (f"{path} row ", ""), False)}


def _from_datasets(obj, label: str) -> dict[str, SourceSplit]:
    import datasets

    splits = obj if isinstance(obj, datasets.DatasetDict) else {"train": obj}
    return {name: SourceSplit(split, (f"{label} {name}[", "]"), False) for name, split in splits.items()}


def _load_hub(dataset_id: str) -> dict[str, SourceSplit]:
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


def read_source(spec: str, work: Path) -> tuple[dict[str, SourceSplit], str]:
    """Each split of `spec` as Arrow (text files are converted under `work`) and the source's fingerprint."""
    if not spec:
        raise UserError("no dataset given: pass --dataset (mix14k, ufg, demo, a hub id or a local file)")
    if spec in PACKAGED:
        files = [Path(str(resources.files("rdro_cli") / "data" / name)) for name in PACKAGED[spec]]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UserError(f"packaged dataset {spec!r} is missing {missing[0]}; reinstall rdro-cli")
        return ({name: SourceSplit(_to_arrow(_jsonl_lines, work, f), (f"{f}:", ""), True)
                 for name, f in zip(("train", "test"), files, strict=True)}, digests.fingerprint_files(files))
    path = Path(spec)
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:
            raise UserError(f"{path}: not a datasets save_to_disk directory ({err})") from None
        data_files = [p for p in path.rglob("*") if p.is_file()]
        return _from_datasets(loaded, str(path)), digests.fingerprint_files(data_files)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(f"{path}: dataset file not found")
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        try:
            if path.suffix == ".jsonl":
                splits = {"train": SourceSplit(_to_arrow(_jsonl_lines, work, path), (f"{path}:", ""), True)}
            elif path.suffix == ".csv":
                splits = {"train": SourceSplit(_to_arrow(_csv_rows, work, path), (f"{path}:", ""), True)}
            elif path.suffix == ".json":
                splits = _read_json(path, work)
            else:
                splits = _read_parquet(path, work)
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot read dataset file ({err})") from None
        return splits, digests.fingerprint_files([path])
    dataset_id = SHORT_NAMES.get(spec, spec)
    if "/" not in dataset_id:
        raise UserError(f"{spec!r} is neither a known short name ({', '.join([*SHORT_NAMES, *PACKAGED])}), "
                        f"a local file nor a hub id (owner/name)")
    splits = _load_hub(dataset_id)
    return splits, digests.fingerprint_json({"hub": dataset_id, "rows": {k: len(v.dataset) for k, v in splits.items()}})


def source_rows(batch: dict, indices: list[int], where_parts: tuple[str, str], raw: bool):
    """(row, where) for each row of a `map` batch; a JSONL line that is not JSON is a one-line error."""
    prefix, suffix = where_parts
    if raw:
        for raw_text, n in zip(batch["_raw"], batch["_n"], strict=True):
            where = f"{prefix}{n}{suffix}"
            try:
                yield json.loads(raw_text), where
            except ValueError as err:
                raise UserError(f"{where}: not valid JSON ({err})") from None
    else:
        names = list(batch)
        for index, values in zip(indices, zip(*batch.values(), strict=True), strict=True):
            yield dict(zip(names, values, strict=True)), f"{prefix}{index}{suffix}"
