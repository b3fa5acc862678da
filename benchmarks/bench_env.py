"""What the benchmarks run on: config-only model architectures (random weights) and the machine's CPU name.

"llama-cpu" is the CPU default: small enough for 2 cores, with a 32k vocabulary so the LM head and its
softmax weigh what they do in real models. The "-llama" variants carry Qwen2 shapes under the llama model
type: with a qwen2 config, transformers 5 loads a custom word-level tokenizer as a Qwen2Tokenizer and
rebuilds its pre-tokenizer.
"""

import math
import os
from pathlib import Path

ARCHS = {
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=176, vocab_size=4000, tie_word_embeddings=False),
    "llama-cpu": dict(model_type="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=688, vocab_size=32000, tie_word_embeddings=False),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1000000.0),
    # Qwen2 shapes (q/k/v bias, tied head, 152k vocab) under the llama model type: with a qwen2 config,
    # transformers 5 loads the benchmark's word-level tokenizer as a Qwen2Tokenizer and rebuilds its
    # pre-tokenizer, which breaks the identical-ids check; the computation is the same.
    "qwen2-0.5b-llama": dict(model_type="llama", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, attention_bias=True,
                             tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2-1.5b-llama": dict(model_type="llama", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                             num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, attention_bias=True,
                             tie_word_embeddings=True, rope_theta=1000000.0),
    "llama-7b-ish": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                         tie_word_embeddings=False),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def length_mix(n: int, seed: int):
    """kto-mix-14k-like rows: (generator, prompt lengths, completion lengths, labels). Prompt lengths are
    lognormal around 120 tokens, completions around 170, about 55% preferred; the generator is returned so
    callers draw their token ids from the same seeded stream."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    prompt_len = torch.empty(n, dtype=torch.float64).log_normal_(math.log(120), 0.75, generator=gen)
    completion_len = torch.empty(n, dtype=torch.float64).log_normal_(math.log(170), 0.6, generator=gen)
    labels = torch.rand(n, generator=gen) < 0.55
    return gen, prompt_len, completion_len, labels
