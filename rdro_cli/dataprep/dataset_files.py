"""Arrow files read and written a record batch at a time, and the `save_to_disk` layout around them.

`datasets` memory-maps the Arrow files it reads, and every page a process touches that way counts in its
resident memory until the mapping goes: copying a million-row dataset through `Dataset.map` or
`save_to_disk` keeps gigabytes resident. Here the inputs are read with plain file reads (`pyarrow.OSFile`),
one record batch at a time, and the output is one Arrow stream file per split with the `state.json`,
`dataset_info.json` and `dataset_dict.json` that `datasets.load_from_disk` reads, so memory stays at a
batch whatever the row count.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

SHARD = "data-00000-of-00001.arrow"


def read_batches(filenames: Iterable[str]) -> Iterator:
    """The record batches of `datasets` cache files (Arrow IPC streams), in order, read without mmap."""
    import pyarrow as pa

    for filename in filenames:
        with pa.OSFile(str(filename), "rb") as source:
            yield from pa.ipc.open_stream(source)


def write_split(directory: Path, features, batches: Iterable, fingerprint: str) -> int:
    """One split of a `save_to_disk` DatasetDict from record batches of `features`' schema; its row count."""
    import datasets
    import pyarrow as pa

    directory.mkdir(parents=True)
    schema = features.arrow_schema  # carries the features as datasets' own metadata
    rows = 0
    with pa.OSFile(str(directory / SHARD), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
            rows += batch.num_rows
    state = {"_data_files": [{"filename": SHARD}], "_fingerprint": fingerprint, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    info = asdict(datasets.DatasetInfo(features=features))
    (directory / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2),
                                                 encoding="utf-8")
    return rows


def write_dict_index(directory: Path, splits: list[str]) -> None:
    """The file that makes `directory` a DatasetDict for `datasets.load_from_disk`."""
    (directory / "dataset_dict.json").write_text(json.dumps({"splits": splits}), encoding="utf-8")
