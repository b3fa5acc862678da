"""Regenerate the demo's binary-feedback data (`rdro_cli/data/demo_*.jsonl`) from SmolLM2-135M-Instruct.

    python scripts/make_demo_data.py            # writes rdro_cli/data/demo_{train,test,heldout}.jsonl

The task is one-digit arithmetic phrased several ways ("What is 7 + 5? Answer with just the number.").
The model answers through its chat template; each sampled completion is labelled preferred when the
answer checker says it is right. That is RDRO's setting: the reference policy is the mixture of its
own preferred and non-preferred outputs.

Answer checker: the LAST integer in the completion (regex `(-?\\d+)\\D*$`, first capturing group)
must equal the true answer. The model usually restates the sum ("4 + 8 = 12"), so the first integer
would mostly be an operand; the last one is its answer.

Prompts are split by problem, not only by phrasing: the held-out problems (operand pairs, with
a + b and b + a kept together) never appear in training under any phrasing. `demo_test.jsonl` is
sampled from held-out prompts too, for the preference-AUC eval.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

# Phrasings, each with its operation. Kept short: every row also carries SmolLM2's default system
# prompt, and the demo trains on CPU.
TEMPLATES = [
    ("+", "What is {a} + {b}? Answer with just the number."),
    ("+", "{a} + {b} = ? Give only the number."),
    ("+", "Add {a} and {b}. Answer with just the number."),
    ("+", "What is the sum of {a} and {b}? Answer with just the number."),
    ("+", "How much is {a} plus {b}? Reply with just the number."),
    ("+", "Calculate {a} + {b}. Only write the number."),
    ("+", "Compute {a} + {b}. Reply with only the number."),
    ("+", "What is {a} plus {b}? Answer with just the number."),
    ("-", "What is {a} - {b}? Answer with just the number."),
    ("-", "Compute {a} - {b}. Reply with only the number."),
    ("-", "How much is {a} minus {b}? Reply with just the number."),
]
MAX_OPERAND = 9
HELDOUT_PROBLEM_FRACTION = 0.45
MAX_NEW_TOKENS = 12
ANSWER_REGEX = r"(-?\d+)\D*$"
_ANSWER = re.compile(ANSWER_REGEX)


def extract_answer(completion: str) -> int | None:
    match = _ANSWER.search(completion)
    return int(match.group(1)) if match else None


def is_correct(completion: str, answer: int) -> bool:
    return extract_answer(completion) == answer


def problems() -> list[tuple[str, int, int, int]]:
    """Every (op, a, b, answer) with one-digit operands; subtraction only where the answer is >= 0."""
    out = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            out.append(("+", a, b, a + b))
            if a >= b:
                out.append(("-", a, b, a - b))
    return out


def problem_key(op: str, a: int, b: int) -> tuple[str, int, int]:
    # a + b and b + a are the same fact: keep them on the same side of the split.
    return (op, min(a, b), max(a, b)) if op == "+" else (op, a, b)


def split_prompts(seed: int) -> tuple[list[dict], list[dict]]:
    """All (prompt, answer) items, split into train and held-out pools by problem."""
    rng = random.Random(seed)
    keys = sorted({problem_key(op, a, b) for op, a, b, _ in problems()})
    rng.shuffle(keys)
    heldout_keys = set(keys[: round(len(keys) * HELDOUT_PROBLEM_FRACTION)])
    train, heldout = [], []
    for op, a, b, answer in problems():
        for template_op, template in TEMPLATES:
            if template_op != op:
                continue
            item = {"prompt": template.format(a=a, b=b), "answer": answer}
            (heldout if problem_key(op, a, b) in heldout_keys else train).append(item)
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


def generate(model, tokenizer, prompts: list[str], samples: int, temperature: float | None,
             batch_size: int) -> list[list[str]]:
    """Completions per prompt (greedy when temperature is None), decoded up to EOS, stripped."""
    import torch

    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True)
            for p in chunk
        ]
        # The template already starts with <|im_start|>; no extra special tokens.
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = {"do_sample": False} if temperature is None else {
            "do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=samples,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        texts_out = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i in range(len(chunk)):
            out.append([t.strip() for t in texts_out[i * samples : (i + 1) * samples]])
        print(f"  {min(start + batch_size, len(prompts))}/{len(prompts)} prompts", file=sys.stderr, flush=True)
    return out


def labelled_rows(items: list[dict], completions: list[list[str]]) -> list[dict]:
    rows = []
    for item, texts in zip(items, completions, strict=True):
        for text in texts:
            rows.append({
                "prompt": [{"role": "user", "content": item["prompt"]}],
                "completion": [{"role": "assistant", "content": text}],
                "label": is_correct(text, item["answer"]),
            })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "rdro_cli" / "data")
    parser.add_argument("--model", type=Path, default=None,
                        help="converted checkpoint (default: scripts/demo_model.py's cache dir, converting if needed)")
    parser.add_argument("--train-prompts", type=int, default=400)
    parser.add_argument("--samples-per-prompt", type=int, default=5)
    parser.add_argument("--heldout-prompts", type=int, default=400)
    parser.add_argument("--test-prompts", type=int, default=60, help="held-out prompts sampled for demo_test")
    parser.add_argument("--test-samples-per-prompt", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train_pool, heldout_pool = split_prompts(args.seed)
    for name, want, pool in (("--train-prompts", args.train_prompts, train_pool),
                             ("--heldout-prompts", args.heldout_prompts, heldout_pool)):
        if want > len(pool):
            raise SystemExit(f"error: {name} {want} exceeds the {len(pool)} distinct prompts available")
    if args.test_prompts > args.heldout_prompts:
        raise SystemExit("error: --test-prompts must not exceed --heldout-prompts")
    train_items = train_pool[: args.train_prompts]
    heldout_items = heldout_pool[: args.heldout_prompts]
    test_items = heldout_items[: args.test_prompts]

    import torch
    from demo_model import ensure_model  # scripts/ is on sys.path when run as a script
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    torch.set_num_threads(args.threads)
    model_dir = args.model or ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    print(f"greedy on {len(heldout_items)} held-out prompts", file=sys.stderr)
    greedy = generate(model, tokenizer, [i["prompt"] for i in heldout_items], 1, None, args.batch_size)
    greedy_accuracy = sum(is_correct(g[0], i["answer"]) for i, g in zip(heldout_items, greedy, strict=True)) / len(heldout_items)

    torch.manual_seed(args.seed)
    print(f"sampling {args.samples_per_prompt} x {len(train_items)} train prompts", file=sys.stderr)
    train_rows = labelled_rows(train_items, generate(model, tokenizer, [i["prompt"] for i in train_items],
                                                     args.samples_per_prompt, args.temperature, args.batch_size))
    print(f"sampling {args.test_samples_per_prompt} x {len(test_items)} test prompts", file=sys.stderr)
    test_rows = labelled_rows(test_items, generate(model, tokenizer, [i["prompt"] for i in test_items],
                                                   args.test_samples_per_prompt, args.temperature, args.batch_size))
    random.Random(args.seed).shuffle(train_rows)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "demo_train.jsonl", train_rows)
    write_jsonl(args.out_dir / "demo_test.jsonl", test_rows)
    write_jsonl(args.out_dir / "demo_heldout.jsonl",
                [{"prompt": i["prompt"], "answer": str(i["answer"])} for i in heldout_items])

    def fraction(rows: list[dict]) -> float:
        return sum(r["label"] for r in rows) / len(rows)

    summary = {
        "model": str(model_dir),
        "distinct_prompts": {"train_pool": len(train_pool), "heldout_pool": len(heldout_pool)},
        "train_rows": len(train_rows), "train_preferred_fraction": round(fraction(train_rows), 4),
        "test_rows": len(test_rows), "test_preferred_fraction": round(fraction(test_rows), 4),
        "heldout_prompts": len(heldout_items),
        "heldout_greedy_accuracy": round(greedy_accuracy, 4),
        "temperature": args.temperature, "max_new_tokens": MAX_NEW_TOKENS, "answer_regex": ANSWER_REGEX,
        "wall_seconds": round(time.time() - started, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
