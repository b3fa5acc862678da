"""Build a tiny byte-level BPE tokenizer (with a ChatML template) and a tiny Llama or Qwen2 model from
configs, fully offline. Used by the test suite and by `recipes/tiny-cpu.toml` for quick smoke runs.

    python scripts/tiny_model.py runs/tiny-model [--arch llama|qwen2] [--hidden 32] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus(files: list[Path] = ()) -> list[str]:
    texts = []
    for path in files:
        texts += Path(path).read_text(encoding="utf-8").splitlines()
    words = "yes no the a good bad answer question what is why how user assistant system".split()
    rng = random.Random(0)
    texts += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    texts += [f"What is {a} + {b}? Answer with just the number. {a + b}" for a in range(20) for b in range(10)]
    return texts


def build_tokenizer(path: Path, texts: list[str], *, chat_template: str | None = CHATML, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `texts`, saved with transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, tokenizer, arch: str = "llama", *, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised causal LM saved as safetensors next to its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--corpus", type=Path, nargs="*", default=[], help="extra text/jsonl files for BPE")
    args = parser.parse_args()
    if (args.out / "config.json").is_file():
        print(args.out)
        return
    tokenizer = build_tokenizer(args.out, corpus(args.corpus))
    build_model(args.out, tokenizer, args.arch, hidden=args.hidden, layers=args.layers)
    (args.out / "tiny_model.json").write_text(json.dumps(vars(args), default=str))
    print(args.out)


if __name__ == "__main__":
    main()
