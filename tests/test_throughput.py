"""rdro_cli.throughput: the per-forward cost model (fit, measurement, cache, recipe override), its effect on
length grouping, the GPU peak table and the MFU formula."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rdro_cli.errors import UserError
from rdro_cli.lm import completion_head, throughput
from rdro_cli.lm.batching import length_groups
from rdro_cli.recipe import load_recipe


def test_fit_recovers_a_line_from_synthetic_timings():
    # t(T) = 2 ms + 1 us * T, at two token counts, three noiseless samples each
    samples = [(32, 0.002 + 32e-6)] * 3 + [(2048, 0.002 + 2048e-6)] * 3
    fixed, per_token = throughput.fit_forward_cost(samples)
    assert fixed == pytest.approx(0.002, rel=1e-9) and per_token == pytest.approx(1e-6, rel=1e-9)
    assert throughput.group_cost_tokens(fixed, per_token) == pytest.approx(2000.0, rel=1e-6)
    # least squares over noisy samples: hand-worked for three points on x = 0, 1, 2 with y = 1, 2, 4:
    # slope = sum((x-1)(y-7/3)) / sum((x-1)^2) = (4/3 + 5/3) / 2 = 1.5; intercept = 7/3 - 1.5 = 5/6
    fixed, per_token = throughput.fit_forward_cost([(0, 1.0), (1, 2.0), (2, 4.0)])
    assert per_token == pytest.approx(1.5) and fixed == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="two or more"):
        throughput.fit_forward_cost([(32, 1.0), (32, 2.0)])


def test_group_cost_is_clamped():
    assert throughput.group_cost_tokens(-0.001, 1e-6) == 0.0  # a negative intercept is noise: no fixed cost
    assert throughput.group_cost_tokens(0.01, 0.0) == throughput.MAX_GROUP_COST  # flat: all fixed cost
    assert throughput.group_cost_tokens(0.01, -1e-7) == throughput.MAX_GROUP_COST
    assert throughput.group_cost_tokens(1e9, 1e-9) == throughput.MAX_GROUP_COST


def test_measurement_times_the_forward_at_two_shapes_and_fits_it():
    calls, now = [], [0.0]

    def forward(ids, mask, completion):  # a device whose forward costs 20 ms + 10 us per token ...
        calls.append(tuple(ids.shape))
        assert mask.shape == ids.shape and completion[:, : ids.shape[1] // 2].sum() == 0
        assert int(ids.max()) < 100
        # ... on a virtual clock, plus a 1 s hiccup in one timed call of the big shape (the fastest call is taken)
        now[0] += 0.020 + 10e-6 * ids.numel() + (1.0 if len(calls) == 5 else 0.0)

    measured = throughput.measure_forward_cost(forward, 100, torch.device("cpu"), repeats=3,
                                               clock=lambda: now[0])
    assert calls == [(1, 32)] * 4 + [(8, 256)] * 4  # one warm-up and three timed calls per shape
    assert measured["fastest_s"] == {"1x32": pytest.approx(0.020 + 32e-5), "8x256": pytest.approx(0.020 + 2048e-5)}
    assert measured["per_token_s"] == pytest.approx(10e-6)
    assert measured["fixed_s"] == pytest.approx(0.020)
    assert measured["measured_group_cost"] == pytest.approx(2000) and measured["group_cost"] == pytest.approx(2000)


def test_measured_cost_never_goes_below_the_cpu_tuned_floor():
    now = [0.0]

    def forward(ids, mask, completion):  # CPU-like: 1 ms fixed, 10 us per token -> (2) = 100 tokens
        now[0] += 0.001 + 10e-6 * ids.numel()

    measured = throughput.measure_forward_cost(forward, 100, torch.device("cpu"), clock=lambda: now[0])
    assert measured["measured_group_cost"] == pytest.approx(100)
    assert measured["group_cost"] == throughput.MIN_GROUP_COST == 512


def test_measurement_of_a_real_tiny_model_runs():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rdro_cli.lm import throughput

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    wrapper = completion_head.CompletionLogps(model)
    measured = throughput.measure_forward_cost(wrapper, 300, torch.device("cpu"), repeats=1)
    assert set(measured["fastest_s"]) == {"1x32", "8x256"} and all(t > 0 for t in measured["fastest_s"].values())
    assert throughput.MIN_GROUP_COST <= measured["group_cost"] <= throughput.MAX_GROUP_COST
    assert 0 <= measured["measured_group_cost"] <= measured["group_cost"]


def test_forward_cost_is_cached_per_key_and_the_recipe_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("RDRO_CACHE_DIR", str(tmp_path))
    measured = []
    monkeypatch.setattr(throughput, "measure_forward_cost",
                        lambda forward, vocab, device: measured.append(vocab) or
                        {"fixed_s": 1.0, "per_token_s": 0.01, "group_cost": 100.0})
    key = dict(vocab=50, fingerprint="abc", dtype=torch.float32, device=torch.device("cpu"))
    cost, source = throughput.forward_cost("auto", None, **key)
    assert cost == 100.0 and source.startswith("measured") and measured == [50]
    cost, source = throughput.forward_cost("auto", None, **key)
    assert cost == 100.0 and source.startswith("cached") and measured == [50]  # not measured again
    files = list((tmp_path / "forward-cost").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["device"] == "cpu"
    # another dtype is another key
    throughput.forward_cost("auto", None, **{**key, "dtype": torch.bfloat16})
    assert measured == [50, 50] and len(list((tmp_path / "forward-cost").glob("*.json"))) == 2
    # a number in the recipe disables the measurement
    assert throughput.forward_cost(64.0, None, **key) == (64.0, "train.group_cost")
    assert measured == [50, 50]


def test_recipe_keys():
    cfg = load_recipe(None, ["train.group_cost=0", "train.packing=on", "train.compile=true",
                             "train.peak_flops=1e15"])
    assert (cfg.train.group_cost, cfg.train.packing, cfg.train.compile, cfg.train.peak_flops) == (0.0, "on", True,
                                                                                                1e15)
    assert load_recipe(None, []).train.group_cost == "auto"
    for bad in ("train.group_cost=-1", "train.group_cost=fast", "train.packing=maybe", "train.peak_flops=-1"):
        with pytest.raises(UserError, match=bad.split("=")[0]):
            load_recipe(None, [bad])


def test_a_large_fixed_cost_makes_one_group_and_a_small_one_keeps_todays_groups():
    lengths = [900, 600, 400, 300, 250, 200, 150, 100]
    # GPU-like: the measured cost of one forward is worth far more than any padding in a micro-batch
    assert length_groups(lengths, max_tokens=16384, group_cost=throughput.MAX_GROUP_COST) == [list(range(8))]
    assert length_groups(lengths, max_tokens=16384, group_cost=1e5) == [list(range(8))]
    # today's default and a small (CPU-like) measured cost split it; cost 0 = every distinct length alone
    today = length_groups(lengths, max_tokens=16384)
    assert today == length_groups(lengths, max_tokens=16384, group_cost=512) and len(today) > 1
    assert length_groups(lengths, max_tokens=16384, group_cost=0) == [[i] for i in range(8)]
    # a group never exceeds max_tokens, whatever the cost
    for g in length_groups(lengths, max_tokens=2000, group_cost=throughput.MAX_GROUP_COST):
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 2000


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12),
    ("NVIDIA A10", 125e12), ("NVIDIA B200", 2250e12), ("NVIDIA GH200 480GB", 989e12),
])
def test_peak_lookup(name, peak):
    assert throughput.peak_flops(name) == peak
    assert throughput.peak_flops(name, override=1e15) == 1e15


def test_peak_lookup_unknown():
    assert throughput.peak_flops("Tesla T4") is None
    assert throughput.peak_flops(None) is None
    assert throughput.peak_flops("Tesla T4", override=65e12) == 65e12


def test_mfu_formula():
    # 6 * 1e9 params * 10000 tokens / 0.5 s = 1.2e14 FLOP/s; on one 989 TFLOP/s device 12.13%, on 4 of them 3.03%
    assert throughput.mfu(10**9, 10_000, 0.5, 989e12) == pytest.approx(1.2e14 / 989e12)
    assert throughput.mfu(10**9, 10_000, 0.5, 989e12, processes=4) == pytest.approx(1.2e14 / 989e12 / 4)
    tied = torch.nn.Linear(4, 3, bias=False)
    model = torch.nn.ModuleDict({"a": tied, "b": torch.nn.Linear(3, 2)})
    model.c = tied  # a tied weight counts once
    assert throughput.count_parameters(model) == 12 + 6 + 2


def test_mfu_is_null_on_cpu():
    model = torch.nn.Linear(4, 4)
    assert throughput.mfu_scale(model, torch.device("cpu"), torch.bfloat16, 0.0, 1) is None
    assert throughput.mfu_scale(model, torch.device("cpu"), torch.bfloat16, 1e15, 1) is None
    assert throughput.step_mfu(None, 1000, 1.0) is None
    assert throughput.speed_text(1234.4, None) == "1,234 tok/s"
    assert throughput.speed_text(1234.4, 0.4123) == "1,234 tok/s, MFU 41.2%"


def test_mfu_scale_on_a_gpu(monkeypatch):
    model = torch.nn.Linear(10, 10)  # 110 parameters
    monkeypatch.setattr(throughput, "device_name", lambda device: "NVIDIA H200")
    cuda = torch.device("cuda")
    scale = throughput.mfu_scale(model, cuda, torch.bfloat16, 0.0, 2)
    assert scale == pytest.approx(6 * 110 / (989e12 * 2))
    assert throughput.step_mfu(scale, 1e12, 1.0) == round(6 * 110 * 1e12 / (989e12 * 2), 5)
    assert throughput.mfu_scale(model, cuda, torch.float32, 0.0, 1) is None  # no fp32 peaks in the table
    assert throughput.mfu_scale(model, cuda, torch.float32, 60e12, 1) == pytest.approx(6 * 110 / 60e12)
    monkeypatch.setattr(throughput, "device_name", lambda device: "Some Future GPU")
    assert throughput.mfu_scale(model, cuda, torch.bfloat16, 0.0, 1) is None
    assert not math.isnan(throughput.mfu(110, 1, 1.0, 1.0))


def test_measurement_leaves_the_random_state_alone():
    """A measured run must draw the same dropout masks as a run that read the cache (resume = uninterrupted):
    the measurement's forwards (in train mode, with dropout) must not advance the global RNG."""
    dropout = torch.nn.Dropout(0.5).train()

    def forward(ids, mask, completion):
        dropout(torch.ones(ids.shape))

    torch.manual_seed(0)
    before = torch.get_rng_state()
    throughput.measure_forward_cost(forward, 100, torch.device("cpu"), repeats=1)
    assert torch.equal(torch.get_rng_state(), before)
