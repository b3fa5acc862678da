"""Seeded synthetic feedback rows for prepare's exactness test and benchmark (nothing from the Hub).

    python scripts/synthetic_feedback.py OUT.jsonl --rows 100000 [--seed 0] [--mixed]

Rows are conversational (`prompt` / `completion` message lists, `label`) with a kto-mix-14k-like length
mix: prompt word counts lognormal around 75 words (sigma 0.75), completions around 130 (sigma 0.6), about
55% preferred, words drawn Zipf-like from a seeded 30k-word vocabulary. `mixed=True` adds the shapes the
exactness test needs: multi-turn prompts with a system message, plain-string rows, paired
(chosen/rejected) rows, unicode, exact duplicate rows and prompts shared between rows, and a few very long
rows (truncation). The same (n, seed, mixed) always gives the same rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

_UNICODE = ["café", "naïve", "日本語", "Ünïcödé", "emoji🙂", "Ελληνικά", "русский", "中文", "ﬁ", "e\u0301"]


def _vocabulary(rng: np.random.Generator, size: int = 30_000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "qu", "ng", "ch", "ea"]
    lengths = rng.integers(1, 5, size=size)
    picks = rng.integers(0, len(syllables), size=(size, 4))
    words = {"".join(syllables[j] for j in picks[i, : lengths[i]]) for i in range(size)}
    return sorted(words)


def rows(n: int, seed: int = 0, *, mixed: bool = False):
    """Yield `n` row dicts (JSON-ready)."""
    rng = np.random.default_rng(seed)
    words = np.array(_vocabulary(rng), dtype=object)
    cdf = np.cumsum(1.0 / np.arange(1, len(words) + 1))
    cdf /= cdf[-1]
    punct = np.array(["", "", "", "", ",", ".", "?", "!"], dtype=object)

    def text(mean_words: float, sigma: float) -> str:
        count = int(min(max(1, rng.lognormal(np.log(mean_words), sigma)), 6 * mean_words))
        drawn = words[np.minimum(np.searchsorted(cdf, rng.random(count)), len(words) - 1)] + punct[rng.integers(0, len(punct), count)]
        if mixed and rng.random() < 0.05:
            drawn[rng.integers(0, count)] = _UNICODE[rng.integers(0, len(_UNICODE))]
        return " ".join(drawn)

    previous: list[dict] = []
    for _ in range(n):
        if mixed and previous and rng.random() < 0.03:  # an exact duplicate of an earlier row
            yield previous[rng.integers(0, len(previous))]
            continue
        if mixed and previous and rng.random() < 0.05:  # an earlier prompt with a new completion
            prompt = previous[rng.integers(0, len(previous))]["prompt"]
            prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        else:
            prompt = [{"role": "user", "content": text(75, 0.75)}]
            if mixed and rng.random() < 0.1:
                prompt = [{"role": "system", "content": text(12, 0.5)}, {"role": "user", "content": text(30, 0.5)},
                          {"role": "assistant", "content": text(40, 0.5)}, *prompt]
            if mixed and rng.random() < 0.02:
                prompt[-1] = {"role": "user", "content": text(600, 0.1)}  # long: truncated prompts
        label = bool(rng.random() < 0.55)
        kind = rng.random() if mixed else 1.0
        if kind < 0.1:
            row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": text(130, 0.6)}],
                   "rejected": [{"role": "assistant", "content": text(130, 0.6)}]}
        elif kind < 0.15:
            row = {"prompt": prompt[-1]["content"], "completion": text(130, 0.6), "label": label}
        else:
            row = {"prompt": prompt, "completion": [{"role": "assistant", "content": text(130, 0.6)}],
                   "label": label}
        if mixed and len(previous) < 2000:
            previous.append(row)
        yield row


def write_jsonl(path: Path, n: int, seed: int = 0, *, mixed: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows(n, seed, mixed=mixed):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed", action="store_true")
    args = parser.parse_args()
    print(write_jsonl(args.out, args.rows, args.seed, mixed=args.mixed))


if __name__ == "__main__":
    main()
