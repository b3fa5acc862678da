"""rdro_cli.modeling: the chunked completion log-prob head against HF's full forward, loading, fingerprints,
batching. Tiny models are built from configs in a tmp dir; nothing touches the Hub."""

import math
import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rdro_cli.errors import UserError  # noqa: E402
from rdro_cli.lm import batching, completion_head, fast_paths, loading
from rdro_cli.lm.batching import collate, mismatched_ids, token_budget_batches
from rdro_cli.lm.completion_head import completion_logps
from rdro_cli.lm.fingerprints import model_fingerprint
from rdro_cli.lm.loading import load_model
from rdro_cli.store import digests  # noqa: E402

VOCAB = 300
SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def _build(kind: str):
    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen2_tied": 2, "gemma2": 3, "granite": 4}[kind])
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **SMALL))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=False, **SMALL))
    if kind == "qwen2_tied":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, **SMALL))
    if kind == "gemma2":
        # A small softcap so that tanh is far from linear on these logits.
        return Gemma2ForCausalLM(
            Gemma2Config(
                vocab_size=VOCAB,
                head_dim=8,
                final_logit_softcapping=0.5,
                attn_implementation="eager",
                **SMALL,
            )
        )
    if kind == "granite":
        return GraniteForCausalLM(GraniteConfig(vocab_size=VOCAB, logits_scaling=2.0, **SMALL))
    raise ValueError(kind)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for kind in ("llama", "qwen2", "qwen2_tied", "gemma2", "granite"):
        model = _build(kind)
        with torch.no_grad():  # random init makes logits tiny; spread them so log-probs are not all ~log(1/V)
            model.get_output_embeddings().weight.mul_(20.0)
        model.save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths, starts = [9, 14, 6, 12, 11], [3, 1, 5, 7, 2]
    rows = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
    return collate(rows, starts, pad_id=0)


def _naive_logps(model, input_ids, attention_mask, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    token_logps = logits[:, :-1].log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return (token_logps * completion_mask[:, 1:]).sum(1)


def _grads(model, fn, batch, weights):
    model.zero_grad(set_to_none=True)
    (fn(model, *batch) * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _chunked(chunk_size):
    return lambda model, *batch: completion_logps(model, *batch, chunk_size=chunk_size)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen2_tied", "gemma2", "granite"])
def test_completion_logps_matches_full_forward(model_dirs, kind):
    model = load_model(model_dirs[kind], dtype="float32")
    batch = _batch()
    with torch.inference_mode():
        expected = _naive_logps(model, *batch)
        got = completion_logps(model, *batch, chunk_size=3)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert expected.abs().min() > 1.0  # the comparison is not between near-zero numbers
    # 1e-5 absolute, plus 1e-6 relative: rows reach |s| ~ 75, where one float32 ulp is already 7.6e-6.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    # Different chunkings (one chunk, one token per chunk) give the same numbers.
    with torch.no_grad():
        torch.testing.assert_close(
            completion_logps(model, *batch, chunk_size=10_000), expected, atol=1e-5, rtol=1e-6
        )
        torch.testing.assert_close(
            completion_logps(model, *batch, chunk_size=1), expected, atol=1e-5, rtol=1e-6
        )


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen2_tied", "gemma2", "granite"])
def test_gradients_match_full_forward(model_dirs, kind):
    model = load_model(model_dirs[kind], dtype="float32")
    batch = _batch(seed=1)
    weights = torch.randn(5, generator=torch.Generator().manual_seed(5))
    expected = _grads(model, _naive_logps, batch, weights)
    got = _grads(model, _chunked(3), batch, weights)
    assert expected.keys() == got.keys()
    if kind == "qwen2_tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_gradients_match_with_lora(model_dirs, target_modules):
    """Only adapter parameters train; with lm_head adapted the head is a peft module (the generic path)."""
    base = load_model(model_dirs["llama"], dtype="float32")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(base, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = _batch(seed=2)
    weights = torch.randn(5, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(
            completion_logps(model, *batch, chunk_size=3), _naive_logps(model, *batch), atol=1e-5, rtol=1e-6
        )
    expected = _grads(model, _naive_logps, batch, weights)
    got = _grads(model, _chunked(3), batch, weights)
    assert expected.keys() == got.keys() == trainable
    for name in expected:
        assert expected[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_head_sees_at_most_chunk_size_rows(model_dirs, monkeypatch):
    model = load_model(model_dirs["llama"], dtype="float32")
    batch = _batch()
    n_tokens = int(batch[2][:, 1:].sum())
    completion_logps(model, *batch, chunk_size=4)  # first call runs the one-off 16-token head check
    calls = []
    real = completion_head._chunk_logits

    def spy(hidden_chunk, weight, bias):
        calls.append(hidden_chunk.shape)
        return real(hidden_chunk, weight, bias)

    head_inputs = []
    monkeypatch.setattr(completion_head, "_chunk_logits", spy)
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: head_inputs.append(args[0].shape))
    try:
        completion_logps(model, *batch, chunk_size=4).sum().backward()
    finally:
        hook.remove()
    chunks = -(-n_tokens // 4)
    assert len(calls) == 2 * chunks  # forward, then recomputation in backward
    assert all(len(shape) == 2 and shape[0] <= 4 for shape in calls)
    assert sum(shape[0] for shape in calls) == 2 * n_tokens
    assert head_inputs == []  # the lm_head module (which would see [batch, seq, hidden]) is never called


def test_generic_head_path_is_chunked(model_dirs):
    base = load_model(model_dirs["llama"], dtype="float32")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    batch = _batch()
    completion_logps(model, *batch, chunk_size=4)
    seen = []
    head = model.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        completion_logps(model, *batch, chunk_size=4).sum().backward()
    finally:
        hook.remove()
    assert seen and all(len(s) == 2 and s[0] <= 4 for s in seen)


def test_completion_logps_module_wrapper(model_dirs):
    """The nn.Module form that DDP/FSDP wrap gives the same numbers."""
    model = load_model(model_dirs["qwen2"], dtype="float32")
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            completion_head.CompletionLogps(model, chunk_size=5)(*batch),
            completion_logps(model, *batch),
            atol=1e-5,
            rtol=1e-6,
        )


def test_completion_mask_at_position_zero_is_rejected(model_dirs):
    model = load_model(model_dirs["llama"], dtype="float32")
    input_ids, attention_mask, completion_mask = _batch()
    completion_mask[0, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        completion_logps(model, input_ids, attention_mask, completion_mask)


def test_unsupported_logit_transform_is_refused(model_dirs, monkeypatch):
    """An architecture scaling its logits in a way we do not know of is refused, not silently wrong."""
    model = load_model(model_dirs["granite"], dtype="float32")
    monkeypatch.setattr(completion_head, "_logit_transform", lambda causal_lm: (1.0, None))
    with pytest.raises(UserError, match="not supported yet"):
        completion_logps(model, *_batch())


def test_token_budget_batches():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (200,), generator=g).tolist() + [500, 90]
    for budget in (64, 100, 256):
        batches = token_budget_batches(lengths, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
        assert [len(b) for b in batches if lengths[b[0]] > budget] == [1] * sum(x > budget for x in lengths)
        shuffled = token_budget_batches(lengths, budget, shuffle=True, seed=3)
        assert sorted(map(tuple, shuffled)) == sorted(map(tuple, batches))
        assert shuffled == token_budget_batches(lengths, budget, shuffle=True, seed=3)
    assert token_budget_batches([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert token_budget_batches([], 8) == []


def test_collate_masks():
    input_ids, attention_mask, completion_mask = collate([[5, 6, 7, 8], [9, 10]], [2, 1], pad_id=0)
    assert input_ids.dtype == torch.long and input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert attention_mask.dtype == torch.long and attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert completion_mask.dtype == torch.bool
    assert completion_mask.tolist() == [[False, False, True, True], [False, True, False, False]]
    with pytest.raises(ValueError):
        collate([[1, 2]], [2], pad_id=0)  # empty completion


def test_mismatched_ids():
    assert mismatched_ids([1, 2, 3], [7, 8, 9, 10], 10) == ([1, 2, 3, 7, 8, 9, 10], 3)
    assert mismatched_ids([1, 2, 3], [7, 8, 9, 10], 5) == ([1, 2, 3, 7, 8], 3)
    assert mismatched_ids([1, 2, 3, 4, 5], [7, 8], 4) == ([3, 4, 5, 7], 3)


def test_model_fingerprint_stable_changes_and_cached(model_dirs, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("RDRO_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = tmp_path / "m"
    shutil.copytree(model_dirs["llama"], model_dir)
    calls = []
    real = digests.digest_file
    monkeypatch.setattr(digests, "digest_file", lambda p, a=digests.ALGORITHM: calls.append(p) or real(p, a))

    first = model_fingerprint(model_dir)
    assert len(calls) == 1 and (tmp_path / "cache" / "file_digests.json").is_file()
    assert model_fingerprint(str(model_dir)) == first
    assert len(calls) == 1  # second call served from the cache

    # Same size, different bytes (and a later mtime): re-hashed, different fingerprint.
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    old_mtime = weights.stat().st_mtime_ns
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(time.time_ns(), old_mtime + 1_000_000_000))
    changed = model_fingerprint(model_dir)
    assert changed != first and len(calls) == 2

    # config.json takes part too.
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text().replace("32", "33", 1))
    assert model_fingerprint(model_dir) not in (first, changed)


def test_load_model_refuses_pickle_unless_allowed(model_dirs, tmp_path):
    model = load_model(model_dirs["llama"], dtype="float32")
    pickle_dir = tmp_path / "pickled"
    model.config.save_pretrained(pickle_dir)
    torch.save(model.state_dict(), pickle_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match="model.allow_pickle = true"):
        load_model(pickle_dir)
    loaded = load_model(pickle_dir, allow_pickle=True, dtype="float32")
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_load_model_dtypes_and_errors(model_dirs, tmp_path):
    assert load_model(model_dirs["qwen2"], dtype="bfloat16").dtype == torch.bfloat16
    assert load_model(model_dirs["qwen2"]).dtype == (
        torch.bfloat16 if torch.cuda.is_available() else torch.float32
    )
    with pytest.raises(UserError, match="unknown model dtype"):
        load_model(model_dirs["qwen2"], dtype="fp8")
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing" / "dir")
    with pytest.raises(UserError, match="'no-such-org/no-such-model'.*local directory"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(UserError, match="local directory"):
        model_fingerprint("no-such-org/no-such-model")
    with pytest.raises(UserError, match="local directory"):
        loading.load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(UserError, match="does not exist"):
        loading.load_tokenizer(tmp_path / "missing" / "dir")


def test_length_groups_are_the_cheapest_contiguous_split_of_sorted_rows():
    import itertools
    import random

    from rdro_cli.lm.batching import length_groups

    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 1024) for _ in range(rng.randint(1, 9))]
        max_tokens, cost = rng.choice([1024, 4096, 16384]), rng.choice([0, 64, 512])
        groups = length_groups(lengths, max_tokens=max_tokens, group_cost=cost)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= max_tokens

        def total(split, lengths=lengths, cost=cost):
            return sum(len(g) * max(lengths[i] for i in g) + cost for g in split)

        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        best = math.inf
        for cuts in itertools.product([0, 1], repeat=len(order) - 1):  # every contiguous split
            split, current = [], [order[0]]
            for flag, i in zip(cuts, order[1:], strict=True):
                if flag:
                    split.append(current)
                    current = []
                current.append(i)
            split.append(current)
            if all(len(g) == 1 or len(g) * lengths[g[0]] <= max_tokens for g in split):
                best = min(best, total(split))
        assert total(groups) == best
    # a typical mixed batch pads far less than one batch padded to its longest row
    lengths = [900, 600, 400, 300, 250, 200, 150, 100]
    groups = length_groups(lengths, max_tokens=16384)
    assert sum(len(g) * max(lengths[i] for i in g) for g in groups) < 0.7 * len(lengths) * max(lengths)


# ---------------------------------------------------------------------------------------------------------
# Packing (train.packing): one row, position_ids restarting per row, no padding


def test_pack_builds_positions_boundaries_and_row_index():
    packed = batching.pack([[5, 6, 7], [8, 9], [1, 2, 3, 4]], [1, 1, 2], pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert packed.completion_mask.tolist() == [[False, True, True, False, True, False, False, True, True]]
    assert packed.row_index.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 9] and packed.cu_seqlens.dtype == torch.int32
    assert (packed.rows, packed.tokens) == (3, 9)
    assert int(batching.batch_tokens(packed)) == 9
    # bucketed: a padding segment of its own (positions from 0, row index = rows, never a completion)
    bucketed = batching.pack([[5, 6, 7], [8, 9], [1, 2, 3, 4]], [1, 1, 2], pad_id=0, bucket=True)
    assert bucketed.input_ids.shape == (1, 16) and bucketed.input_ids[0, 9:].tolist() == [0] * 7
    assert bucketed.position_ids[0, 9:].tolist() == list(range(7))
    assert bucketed.row_index[9:].tolist() == [3] * 7 and not bucketed.completion_mask[0, 9:].any()
    assert bucketed.cu_seqlens.tolist() == [0, 3, 5, 9, 16] and bucketed.tokens == 9
    with pytest.raises(ValueError, match="completion_start"):
        batching.pack([[1, 2]], [2], pad_id=0)


def test_bucket_lengths():
    assert [batching.bucket_length(n) for n in (1, 16, 17, 24, 25, 33, 48, 49, 100, 1000, 1025)] == \
        [16, 16, 24, 24, 32, 48, 48, 64, 128, 1024, 1536]
    sizes = {batching.bucket_length(n) for n in range(1, 8193)}
    assert len(sizes) == 19 and all(batching.bucket_length(n) < 1.5 * n + 16 for n in range(1, 8193))
    ids, mask, completion = collate([[1, 2, 3], [4, 5]], [1, 1], pad_id=0, bucket=True)
    assert ids.shape == (2, 16) and mask.sum() == 5 and completion.sum() == 3


def _packed_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths, starts = [9, 14, 6, 12, 11], [3, 1, 5, 7, 2]
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths], starts


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen2_tied", "gemma2", "granite"])
@pytest.mark.parametrize("bucket", [False, True])
def test_packed_logps_and_gradients_equal_the_padded_path(model_dirs, kind, bucket):
    """sdpa (eager for gemma2) on CPU builds a block-diagonal causal mask from the restarting position_ids:
    exact, in fp32, against the padded path, for the values and for every parameter's gradient."""
    model = load_model(model_dirs[kind], dtype="float32")
    rows, starts = _packed_rows(seed=3)
    padded = collate(rows, starts, pad_id=0)
    packed = batching.pack(rows, starts, pad_id=0, bucket=bucket)
    assert packed.input_ids.shape[1] == (64 if bucket else sum(len(r) for r in rows))
    weights = torch.randn(5, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = completion_logps(model, *padded, chunk_size=3)
        got = completion_head.packed_completion_logps(model, packed, chunk_size=3)
    assert expected.abs().min() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    grads_padded = _grads(model, _chunked(3), padded, weights)
    model.zero_grad(set_to_none=True)
    (completion_head.packed_completion_logps(model, packed, chunk_size=3) * weights).sum().backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads_packed.keys() == grads_padded.keys()
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], atol=1e-5, rtol=1e-4, msg=name)
    # the wrapper takes a PackedBatch as its one argument (one forward call, as DDP/FSDP need)
    with torch.no_grad():
        torch.testing.assert_close(completion_head.CompletionLogps(model, chunk_size=3)(packed), expected, atol=1e-5,
                                   rtol=1e-6)


def test_packing_selection(model_dirs, monkeypatch):
    model = load_model(model_dirs["llama"], dtype="float32")
    assert fast_paths.attention_implementation(model) == "sdpa"
    assert fast_paths.use_packing("auto", model) is False  # sdpa's mask would be dense: keep length groups
    assert fast_paths.use_packing("on", model) is True
    assert fast_paths.use_packing("off", model) is False
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    assert fast_paths.use_packing("auto", model) is True  # varlen kernels: packing is free
    monkeypatch.setattr(fast_paths, "packing_supported", lambda: False)  # an older transformers
    assert fast_paths.use_packing("auto", model) is False
    with pytest.raises(UserError, match="train.packing = on needs"):
        fast_paths.use_packing("on", model)


def test_packing_that_mixes_rows_is_refused(model_dirs, monkeypatch):
    """An architecture whose attention ignores the restarting position_ids would let rows see each other."""
    model = load_model(model_dirs["llama"], dtype="float32")
    rows, starts = _packed_rows()
    real = completion_head._last_hidden_state

    def ignores_positions(body, input_ids, attention_mask, position_ids=None):
        return real(body, input_ids, attention_mask)  # one causal sequence over all rows

    monkeypatch.setattr(completion_head, "_last_hidden_state", ignores_positions)
    with pytest.raises(UserError, match="set train.packing = off"):
        completion_head.packed_completion_logps(model, batching.pack(rows, starts, pad_id=0))
