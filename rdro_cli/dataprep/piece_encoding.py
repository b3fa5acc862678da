"""Token ids of templated texts with each piece between two added tokens encoded once per batch, and
completion texts without a decode where the tokenizer's decoding is lossless (`prepare`'s hot path)."""

from __future__ import annotations

import json
import re

_CHECKED_TEXTS = 4  # texts (two rows) of every batch also encoded the plain way: a check on the pieces


class PieceEncoder:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, with each piece of text between two added
    tokens encoded once per batch.

    A fast tokenizer cuts its input at added tokens (`<|im_start|>`, `<|im_end|>`, ...) before it normalises,
    pre-tokenises or merges anything, and encodes each piece on its own; so the ids of a text are the ids of
    its pieces with the added tokens' ids between them. A templated prompt and its full conversation share
    every piece up to the generation prompt, and a batch shares the template's own pieces (a default system
    prompt, role headers), so each is encoded once: about half the tokenizer work of encoding the prompt and
    the conversation separately. Used only where that cut is exactly what the tokenizer does (added tokens
    matched verbatim, no whitespace stripping around them, no pre-tokenizer that treats the first piece of a
    text differently); otherwise, and for any batch whose first rows' ids differ from the plain encoding,
    the plain call. `exact` says which."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend, self.pattern, self.ids, self.lossless = backend, None, {}, False
        if backend is None or getattr(backend, "encode_special_tokens", False):
            return
        added = list(backend.get_added_tokens_decoder().items())
        plain = all(not (t.normalized or t.lstrip or t.rstrip or t.single_word) for _, t in added)
        pipeline = backend.to_str()
        if not added or not plain or "Metaspace" in pipeline or "prepend_scheme" in pipeline:
            return
        self.ids = {t.content: i for i, t in added}
        # byte-level BPE with no normaliser decodes ids back to exactly the text they were encoded from
        config = json.loads(pipeline)
        self.lossless = (config.get("normalizer") is None and (config.get("decoder") or {}).get("type") == "ByteLevel"
                         and not getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.ids, key=len, reverse=True)) + ")")

    def plain(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.pattern is None:
            return self.plain(texts)
        split = [self.pattern.split(text) for text in texts]  # text, token, text, token, ..., text
        pieces = list(dict.fromkeys(piece for parts in split for piece in parts[::2] if piece))
        encoded = dict(zip(pieces, (e.ids for e in self.backend.encode_batch(pieces, add_special_tokens=False)),
                           strict=True))
        out = []
        for parts in split:
            ids = []
            for k, part in enumerate(parts):
                if k % 2:
                    ids.append(self.ids[part])
                elif part:
                    ids += encoded[part]
            out.append(ids)
        if out[:_CHECKED_TEXTS] != self.plain(texts[:_CHECKED_TEXTS]):
            self.pattern = None  # not this tokenizer's rule after all: the plain call from here on
            return self.plain(texts)
        return out

    def completion_texts(self, texts: list[tuple[str, str]], ids: list[list[int]], exact: list[bool]) -> list[str]:
        """`decode(ids[i])` for every row. Where `exact[i]` (row i's ids are its conversation's after its
        prompt's, and the prompt text is a prefix of the conversation text) and the tokenizer decodes
        losslessly, that is the conversation text after the prompt, taken as it is; checked on the first rows."""
        if not self.lossless or self.pattern is None:
            return decode_batch(self.tokenizer, ids)
        out = [full[len(prompt):] if ok else None for (prompt, full), ok in zip(texts, exact, strict=True)]
        undecoded = [i for i, text in enumerate(out) if text is None]
        for i, text in zip(undecoded, decode_batch(self.tokenizer, [ids[i] for i in undecoded]), strict=True):
            out[i] = text
        checked = [i for i, ok in enumerate(exact) if ok][:_CHECKED_TEXTS // 2]
        if [out[i] for i in checked] != decode_batch(self.tokenizer, [ids[i] for i in checked]):
            self.lossless = False
            return decode_batch(self.tokenizer, ids)
        return out


def decode_batch(tokenizer, ids: list[list[int]]) -> list[str]:
    """`[tokenizer.decode(x) for x in ids]`, straight through the Rust backend when that is the same thing
    (no clean-up of tokenization spaces): transformers' per-token Python conversion costs more than the
    decoding itself."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode_batch(ids, skip_special_tokens=False)
    return tokenizer.batch_decode(ids)


_ENCODERS: dict[int, PieceEncoder] = {}


def encoder(tokenizer) -> PieceEncoder:
    """One PieceEncoder per tokenizer object in a process (a worker keeps its own)."""
    if id(tokenizer) not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[id(tokenizer)] = PieceEncoder(tokenizer)
    return _ENCODERS[id(tokenizer)]
