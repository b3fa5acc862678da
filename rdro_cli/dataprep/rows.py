"""One source row -> validated unpaired examples: the column and label rules of `prepare`.

Pure Python and picklable, so the same rules run in `prepare`'s worker processes. Every error is one line
that starts with the row's location (`file:line`, `file[index]`, ...).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from rdro_cli.errors import UserError

_TRUE = {"true", "1", "yes", "y", "t", "preferred", "good", "desirable"}
_FALSE = {"false", "0", "no", "n", "f", "not_preferred", "bad", "undesirable"}


@dataclass
class Example:
    """One unpaired row before tokenisation; `messages` fields are lists of {role, content}.

    `duplicate_key` identifies the source content: (prompt, completion, label) for an unpaired row,
    (prompt, chosen, rejected, side) for each half of a paired row, so a pair is a duplicate only as a whole.
    """

    prompt: list[dict] | str
    completion: list[dict] | str
    label: bool
    pair_id: int
    where: str
    duplicate_key: str = ""


def _parse_label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise UserError(f"{where}: label {value!r} is not boolean-like (use true/false or 1/0)")


def _check_encodable(text: str, column: str, where: str) -> None:
    """JSON may hold a lone UTF-16 surrogate (`"\\ud800"`): a Python str, but no text UTF-8 (a tokenizer, Arrow)
    can hold."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError(f"{where}: {column} holds a lone UTF-16 surrogate ({text[err.start]!r} at character "
                        f"{err.start}), which is not valid text; fix the row (or the tool that wrote it)") from None


def _empty(value) -> bool:
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def _parse_text(value, column: str, where: str, role: str | None = None) -> list[dict] | str:
    """A plain string or a list of {role, content} messages; empty text is an error."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: {column} is empty")
        _check_encodable(value, column, where)
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for k, message in enumerate(value, start=1):
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise UserError(f"{where}: {column} messages need string 'role' and 'content' fields")
            for name in ("role", "content"):
                _check_encodable(message[name], f"{column} (message {k} {name})", where)
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


def _key(*parts) -> str:
    return json.dumps(parts, sort_keys=True, ensure_ascii=False)


def parse_row(row, where: str, pair_id: int) -> list[Example]:
    """One source row -> one unpaired example, or two for a paired (chosen/rejected) row.

    A row is paired when its `chosen` or `rejected` holds something, or when it has those columns and no
    `completion` or `label`: an export where every row has every column (CSV, parquet) leaves them empty
    (or null) on its unpaired rows, and those rows stay unpaired."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with prompt/completion/label, got {type(row).__name__}")
    if "prompt" not in row:
        raise UserError(f"{where}: missing column 'prompt' (found: {_columns(row)})")
    prompt = _parse_text(row["prompt"], "prompt", where)
    pair_columns = [c for c in ("chosen", "rejected") if c in row]
    if any(not _empty(row[c]) for c in pair_columns) or (pair_columns and "completion" not in row
                                                          and "label" not in row):
        missing = [c for c in ("chosen", "rejected") if c not in row]
        if missing:
            raise UserError(f"{where}: paired row is missing column {missing[0]!r}")
        chosen, rejected = (_parse_text(row[c], c, where, "assistant") for c in ("chosen", "rejected"))
        return [Example(prompt, text, side == "chosen", pair_id, where, _key(prompt, chosen, rejected, side))
                for side, text in (("chosen", chosen), ("rejected", rejected))]
    missing = [c for c in ("completion", "label") if c not in row]
    if missing:
        raise UserError(f"{where}: missing column {missing[0]!r} (found: {_columns(row)}); "
                        f"expected prompt/completion/label or prompt/chosen/rejected")
    completion = _parse_text(row["completion"], "completion", where, "assistant")
    label = _parse_label(row["label"], where)
    return [Example(prompt, completion, label, -1, where, _key(prompt, completion, label))]


def is_conversational(example: Example) -> bool:
    return isinstance(example.prompt, list) or isinstance(example.completion, list)


def prompt_key(example: Example) -> str:
    """The identity of a prompt: rows with equal keys share a test split and are never KL partners."""
    return json.dumps(example.prompt, sort_keys=True)


def raw_prompt(example: Example) -> str:
    """The last user turn (what evaluation shows as "the prompt")."""
    if isinstance(example.prompt, str):
        return example.prompt
    users = [m["content"] for m in example.prompt if m["role"] == "user"]
    return users[-1] if users else example.prompt[-1]["content"]


def hash64(text: str) -> int:
    """A signed 64-bit digest (an Arrow int64), stable across processes unlike `hash()`."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)
