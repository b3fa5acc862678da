"""Templating and tokenisation of source rows, one `Dataset.map` batch at a time (in worker processes).

For each unpaired example the templated prompt P (with the generation prompt) and the templated full
conversation F are tokenised with batched fast-tokenizer calls. The completion starts at len(ids(P)) when
ids(P) is a prefix of ids(F) and P a prefix of F; otherwise (a template whose generation prompt differs
from the rendered assistant turn, or a BPE merge across the boundary) the boundary is kept exact as
ids(P) + ids(F[len(P):]) and the row counted as a boundary mismatch. Prompts keep their last
`max_prompt_length` tokens, completions their first `max_length - len(prompt)`; a row with no prompt or
no completion tokens left is dropped (counted). Each output row carries the per-row flags that `prepare`
sums into its counts, so no count needs a second pass over the text.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass, replace

from rdro_cli.dataprep import piece_encoding, rows
from rdro_cli.dataprep.sources import source_rows
from rdro_cli.errors import UserError

# Columns of the tokenised intermediate; those starting with "_" never reach the artifact.
FEATURES = {
    "input_ids": ("list", "int32"), "completion_start": "int32", "label": "bool", "prompt_text": "string",
    "completion_text": "string", "prompt": "string", "_src": "int64", "_paired": "bool",
    "_prompt_hash": "int64", "_duplicate_hash": "int64", "_boundary_mismatch": "bool",
    "_truncated_prompt": "bool", "_truncated_completion": "bool", "_dropped": "bool", "_control_text": "bool",
    "_control_unprotected": "bool", "_max_id": "int64",
}
_SENTINEL = "\ue000{}\ue001"  # private-use characters: stand-ins for message contents while rendering


@dataclass(frozen=True)
class Settings:
    """What a worker needs besides the tokenizer (picklable)."""

    where: tuple[str, str]
    raw: bool
    max_length: int
    max_prompt_length: int
    use_template: bool
    control_texts: tuple[str, ...] = ()
    template: str = "the chat template"  # how errors name it (its file, or whose it is)
    main_pid: int = 0  # the process that started the map: any other one running a batch is a worker


def features():
    import datasets

    return datasets.Features({
        name: datasets.Sequence(datasets.Value(kind[1])) if isinstance(kind, tuple) else datasets.Value(kind)
        for name, kind in FEATURES.items()
    })


def control_texts(tokenizer) -> tuple[str, ...]:
    """The text of the tokenizer's special added tokens (e.g. `<|im_end|>`)."""
    return tuple(sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content}))


def _messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _contents(example: rows.Example) -> list[str]:
    return [m["content"] for m in _messages(example.prompt, "user") + _messages(example.completion, "assistant")]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_template(tokenizer, template: str) -> None:
    """A chat template that is not valid Jinja is one line naming it, before any row is read."""
    import jinja2

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateSyntaxError as err:
        raise UserError(f"{template} is not a valid Jinja template (line {err.lineno}: {_one_line(err.message)}); "
                        f"fix it, or pass another with --chat-template FILE") from None
    except Exception:  # a template may refuse this made-up conversation: a refusal is reported on its row
        pass


def render(example: rows.Example, tokenizer, use_template: bool,
           template: str = "the chat template") -> tuple[str, str]:
    """(templated prompt with the generation prompt, templated full conversation). A template that raises
    (e.g. `raise_exception('Conversation roles must alternate ...')`) is one line naming the row."""
    if use_template:
        import jinja2

        prompt_msgs = _messages(example.prompt, "user")
        try:
            prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
            full_text = tokenizer.apply_chat_template(prompt_msgs + _messages(example.completion, "assistant"),
                                                      tokenize=False)
        except jinja2.TemplateError as err:
            raise UserError(f"{example.where}: {template} raised an error on this row: "
                            f"{_one_line(err.message or type(err).__name__)}; fix the row or the template "
                            f"(--chat-template FILE)") from None
        return prompt_text, full_text
    return example.prompt, example.prompt + example.completion + (tokenizer.eos_token or "")


def render_batch(examples: list[rows.Example], tokenizer, use_template: bool,
                 template: str = "the chat template") -> list[tuple[str, str]]:
    """`render` of every example, the template applied to the whole batch in two calls (the same texts; less
    per-call overhead in transformers); when the template raises, row by row to name the row."""
    if not use_template or not examples:
        return [render(example, tokenizer, use_template) for example in examples]
    import jinja2

    prompts = [_messages(example.prompt, "user") for example in examples]
    try:
        prompt_texts = tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
        full_texts = tokenizer.apply_chat_template(
            [p + _messages(example.completion, "assistant") for p, example in zip(prompts, examples, strict=True)],
            tokenize=False)
    except jinja2.TemplateError as err:
        for example in examples:
            render(example, tokenizer, use_template, template)  # raises, naming the first row it refuses
        raise UserError(f"{template} raised an error: {_one_line(err.message or type(err).__name__)}") from None
    return list(zip(prompt_texts, full_texts, strict=True))


def _with_contents(example: rows.Example, contents: list[str]) -> rows.Example:
    prompt = _messages(example.prompt, "user")
    n = len(prompt)
    new_prompt = [{**m, "content": c} for m, c in zip(prompt, contents[:n], strict=True)]
    completion = _messages(example.completion, "assistant")
    new_completion = [{**m, "content": c} for m, c in zip(completion, contents[n:], strict=True)]
    return replace(example, prompt=new_prompt if isinstance(example.prompt, list) else new_prompt[0]["content"],
                   completion=new_completion if isinstance(example.completion, list) else new_completion[0]["content"])


def _content_spans(rendered_with_sentinels: str, contents: list[str], rendered: str) -> list[tuple[int, int]] | None:
    """Character spans of each message content in `rendered`, found by rendering with sentinels in their
    place; None when the template changed a content (e.g. trimmed it), so the spans cannot be trusted."""
    spans, text, pos = [], [], 0
    for part in re.split("(\ue000\\d+\ue001)", rendered_with_sentinels):
        match = re.fullmatch("\ue000(\\d+)\ue001", part)
        piece = contents[int(match.group(1))] if match else part
        if match:
            spans.append((pos, pos + len(piece)))
        text.append(piece)
        pos += len(piece)
    return spans if "".join(text) == rendered else None


def _encode_protected(tokenizer, text: str, spans: list[tuple[int, int]], control: re.Pattern) -> list[int]:
    """Token ids of `text` where control-token text inside `spans` (message contents) is plain text and
    the template's own control tokens stay control tokens: the text is cut at the template's control
    tokens, as the tokenizer itself does, and each piece tokenised with special-token matching off."""
    ids, pos = [], 0
    for match in control.finditer(text):
        if any(start < match.end() and match.start() < end for start, end in spans):
            continue
        if match.start() > pos:
            ids += tokenizer(text[pos:match.start()], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids.append(tokenizer.convert_tokens_to_ids(match.group()))
        pos = match.end()
    if pos < len(text):
        ids += tokenizer(text[pos:], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def _protect(example, texts, tokenizer, settings) -> tuple[list[int], list[int], bool] | None:
    """(prompt ids, full ids, boundary mismatch) for a row whose contents hold control-token text, that text as plain text."""
    contents = _contents(example)
    prompt_text, full_text = texts
    if settings.use_template:
        stand_in = _with_contents(example, [_SENTINEL.format(k) for k in range(len(contents))])
        prompt_sentinels, full_sentinels = render(stand_in, tokenizer, True, settings.template)
        prompt_spans = _content_spans(prompt_sentinels, contents, prompt_text)
        full_spans = _content_spans(full_sentinels, contents, full_text)
        if prompt_spans is None or full_spans is None:
            return None
    else:
        prompt_spans = [(0, len(example.prompt))]
        full_spans = [*prompt_spans, (len(example.prompt), len(example.prompt) + len(example.completion))]
    control = re.compile("|".join(re.escape(t) for t in sorted(settings.control_texts, key=len, reverse=True)))
    prompt_ids = _encode_protected(tokenizer, prompt_text, prompt_spans, control)
    full_ids = _encode_protected(tokenizer, full_text, full_spans, control)
    mismatch = full_ids[: len(prompt_ids)] != prompt_ids or not full_text.startswith(prompt_text)
    if mismatch:
        shift = len(prompt_text) if full_text.startswith(prompt_text) else 0
        tail = full_text[shift:]
        full_ids = prompt_ids + _encode_protected(tokenizer, tail, [(a - shift, b - shift) for a, b in full_spans],
                                                  control)
    return prompt_ids, full_ids, mismatch


def parse_batch(batch: dict, indices: list[int], settings: Settings) -> tuple[list[rows.Example], list[int]]:
    """The batch's examples and, for each, the index of its source row in the split."""
    examples, sources = [], []
    for index, (row, where) in zip(indices, source_rows(batch, indices, settings.where, settings.raw), strict=True):
        for example in rows.parse_row(row, where, pair_id=index):
            if not settings.use_template and rows.is_conversational(example):
                raise UserError(f"{where}: a conversational row, but the tokenizer has no chat template; "
                                f"supply one with --chat-template FILE (model.chat_template)")
            examples.append(example)
            sources.append(index)
    return examples, sources


def tokenise_batch(batch: dict, indices: list[int], *, tokenizer, settings: Settings, offset: int = 0) -> dict[str, list]:
    """A `Dataset.map(batched=True, with_indices=True)` function: source rows -> tokenised rows + flags.
    `offset`: the split's index of the mapped part's first row (prepare maps a split a chunk at a time)."""
    if settings.main_pid and os.getpid() != settings.main_pid:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a worker: Ctrl-C is the main process's to handle
    examples, sources = parse_batch(batch, [offset + i for i in indices], settings)
    texts = render_batch(examples, tokenizer, settings.use_template, settings.template)
    encoder = piece_encoding.encoder(tokenizer)
    encoded = encoder([text for pair in texts for text in pair])
    prompt_ids, full_ids = encoded[0::2], encoded[1::2]
    mismatch = [i for i, ((p_text, f_text), p, f) in enumerate(zip(texts, prompt_ids, full_ids, strict=True))
                if f[: len(p)] != p or not f_text.startswith(p_text)]
    if mismatch:
        # Keep the boundary exact by tokenising the completion on its own; the row is counted.
        tails = [texts[i][1][len(texts[i][0]):] if texts[i][1].startswith(texts[i][0]) else texts[i][1]
                 for i in mismatch]
        for i, tail in zip(mismatch, tokenizer(tails, add_special_tokens=False)["input_ids"], strict=True):
            full_ids[i] = prompt_ids[i] + tail
    mismatched = set(mismatch)
    control = [bool(settings.control_texts) and any(t in c for c in _contents(example) for t in settings.control_texts)
               for example in examples]
    unprotected = [False] * len(examples)
    for i in (i for i, flagged in enumerate(control) if flagged):
        protected = _protect(examples[i], texts[i], tokenizer, settings)
        if protected is None:
            unprotected[i] = True
            continue
        prompt_ids[i], full_ids[i], boundary = protected
        mismatched.add(i) if boundary else mismatched.discard(i)
    completion_ids = [f[len(p):] for p, f in zip(prompt_ids, full_ids, strict=True)]
    exact = [i not in mismatched and not control[i] for i in range(len(examples))]
    completion_texts = encoder.completion_texts(texts, completion_ids, exact)
    out = {name: [] for name in FEATURES}
    for i, example in enumerate(examples):
        prompt, completion = prompt_ids[i], completion_ids[i]
        truncated_prompt = len(prompt) > settings.max_prompt_length
        if truncated_prompt:
            prompt = prompt[-settings.max_prompt_length:]
        truncated_completion = len(prompt) + len(completion) > settings.max_length
        if truncated_completion:
            completion = completion[: settings.max_length - len(prompt)]
        dropped = not completion or not prompt
        out["input_ids"].append([] if dropped else prompt + completion)
        out["completion_start"].append(len(prompt))
        out["label"].append(example.label)
        out["prompt_text"].append(texts[i][0])
        out["completion_text"].append(completion_texts[i])
        out["prompt"].append(rows.raw_prompt(example))
        out["_src"].append(sources[i])
        out["_paired"].append(example.pair_id >= 0)
        out["_prompt_hash"].append(rows.hash64(rows.prompt_key(example)))
        out["_duplicate_hash"].append(rows.hash64(example.duplicate_key))
        out["_boundary_mismatch"].append(i in mismatched)
        out["_truncated_prompt"].append(truncated_prompt)
        out["_truncated_completion"].append(truncated_completion)
        out["_dropped"].append(dropped)
        out["_control_text"].append(control[i])
        out["_control_unprotected"].append(unprotected[i])
        out["_max_id"].append(-1 if dropped else max(max(prompt), max(completion)))
    return out
