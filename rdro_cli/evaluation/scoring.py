"""Pure scoring: the AUC of the log-ratio (Mann–Whitney, ties count half), pair accuracy, the preference
numbers of eval.json, and answer extraction for exact match and BIG-Bench Hard. numpy only, so `report` stays
free of torch.
"""

from __future__ import annotations

import re

import numpy as np


def auc(scores, labels) -> float | None:
    """P(score of a preferred row > score of a non-preferred row), ties counting half (Mann–Whitney U / n⁺n⁻).

    None when either class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    positive, negative = scores[labels], np.sort(scores[~labels])
    if len(positive) == 0 or len(negative) == 0:
        return None
    below = np.searchsorted(negative, positive, side="left")
    not_above = np.searchsorted(negative, positive, side="right")
    return float((below + 0.5 * (not_above - below)).sum() / (len(positive) * len(negative)))


ANSWER_PHRASE = re.compile(r"the answer is\s*:?\s*(.*)", re.IGNORECASE | re.DOTALL)
OPTION = re.compile(r"\(([A-Za-z])\)|([A-Za-z])$")


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
