"""Generation for eval: the chat template around a prompt, and batched generation with left padding (greedy
unless eval.do_sample), sorted by length.
"""

from __future__ import annotations

import torch

from rdro_cli.errors import UserError
from rdro_cli.lm.loading import device_of
from rdro_cli.recipe import Recipe


def chat_prompt(tokenizer, text: str) -> str:
    """`text` as one user message through the chat template (or as it is without a template)."""
    if not tokenizer.chat_template:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def generate(model, tokenizer, prompts: list[str], cfg: Recipe, description: str, *,
             greedy: bool = False) -> list[str]:
    """Batched `model.generate` with left padding; the decoded new tokens of each prompt, in order.

    Prompts are templated text, tokenised without added special tokens (as `prepare` does).
    """
    from transformers import GenerationConfig

    from rdro_cli.progress import task_progress

    sample = cfg.eval.do_sample and not greedy
    if tokenizer.pad_token is None:  # left padding needs some token; masked out, so eos does
        if tokenizer.eos_token is None:
            raise UserError("the tokenizer has neither a pad nor an eos token; batched generation needs one")
        tokenizer.pad_token = tokenizer.eos_token
    eos = model.generation_config.eos_token_id
    eos = [*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tokenizer.eos_token_id]
    options = dict(temperature=cfg.eval.temperature, top_k=0, top_p=1.0) if sample else {}
    config = GenerationConfig(max_new_tokens=cfg.eval.max_new_tokens, do_sample=sample,
                              pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=sorted({e for e in eos if e is not None}) or None, **options)
    if sample:
        torch.manual_seed(cfg.train.seed)
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    outputs: list[str] = [""] * len(prompts)
    with task_progress() as progress, torch.inference_mode():
        task = progress.add_task(description, total=len(prompts))
        for start in range(0, len(order), cfg.eval.batch_size):
            batch = order[start : start + cfg.eval.batch_size]
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device_of(model))
            generated = model.generate(**encoded, generation_config=config)
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                outputs[i] = text.strip()
            progress.advance(task, len(batch))
    return outputs
