"""train with the throughput switches: packing equals length groups, the measured group cost is cached,
train.compile trains and matches eager, MFU is absent on CPU and reported where a peak is known."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import systematic_rows
from test_train import _make_run, _metrics, _train

from rdro_cli.lm import throughput

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_llama):
    return _make_run(tmp_path_factory.mktemp("throughput-run"), systematic_rows(48), tiny_llama, "0.25")


def test_packed_training_equals_length_grouped_training(small_run, tiny_llama, tmp_path):
    code, _, err = _train(small_run, tmp_path / "groups", tiny_llama, "train.max_steps=3", "train.packing=off",
                          "train.group_cost=0")
    assert code == 0, err
    assert "length groups, 0 padded tokens per extra forward (train.group_cost)" in err
    code, _, err = _train(small_run, tmp_path / "packed", tiny_llama, "train.max_steps=3", "train.packing=on")
    assert code == 0, err
    assert "packed rows (no padding)" in err
    groups, packed = _metrics(tmp_path / "groups"), _metrics(tmp_path / "packed")
    for a, b in zip(groups, packed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["logratio_max"] == pytest.approx(b["logratio_max"], abs=1e-5)
        assert "mfu" not in a and "mfu" not in b  # CPU: no MFU field
    # the packing switch does not change what is trained: a finished run is not redone for it
    code, _, err = _train(small_run, tmp_path / "packed", tiny_llama, "train.max_steps=3", "train.packing=off")
    assert code == 0 and "up to date" in err


def test_measured_group_cost_is_cached(small_run, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("RDRO_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = _train(small_run, tmp_path / "one", tiny_llama, "train.max_steps=1")
    assert code == 0, err
    assert "padded tokens per extra forward (measured, cached in" in err
    files = list((tmp_path / "cache" / "forward-cost").glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["key"]["device"] == "cpu" and record["key"]["dtype"] == "torch.float32"
    assert throughput.MIN_GROUP_COST <= record["group_cost"] <= throughput.MAX_GROUP_COST and set(record["fastest_s"]) == {"1x32", "8x256"}
    code, _, err = _train(small_run, tmp_path / "two", tiny_llama, "train.max_steps=1")
    assert code == 0, err
    assert "(cached in" in err and f"{record['group_cost']:,.0f} padded tokens" in err


def test_mfu_is_reported_where_the_peak_is_known(small_run, tiny_llama, tmp_path, monkeypatch):
    seen = {}

    def fake_scale(model, device, dtype, override, processes):  # what a GPU with a known peak gives
        seen.update(params=throughput.count_parameters(model), processes=processes, override=override)
        return 1e-4

    monkeypatch.setattr(throughput, "mfu_scale", fake_scale)
    code, _, err = _train(small_run, tmp_path / "mfu", tiny_llama, "train.max_steps=2", "train.peak_flops=5e12")
    assert code == 0, err
    assert seen["processes"] == 1 and seen["override"] == 5e12 and seen["params"] > 0
    for row in _metrics(tmp_path / "mfu"):
        assert row["mfu"] == pytest.approx(1e-4 * row["tokens_per_s"], rel=1e-3, abs=1e-5)


@pytest.mark.slow
def test_compiled_body_trains_and_matches_eager(small_run, tiny_llama, tmp_path):
    from torch._dynamo.utils import counters

    # one group per micro-batch (and lengths bucketed): few shapes, so the test compiles few graphs
    sets = ("train.max_steps=2", "train.group_cost=1e9")
    torch._dynamo.reset()
    code, _, err = _train(small_run, tmp_path / "eager", tiny_llama, *sets)
    assert code == 0, err
    counters.clear()
    code, _, err = _train(small_run, tmp_path / "compiled", tiny_llama, *sets, "train.compile=true")
    assert code == 0, err
    assert "lengths bucketed for train.compile" in err
    assert counters["stats"]["unique_graphs"] >= 1  # the body really ran compiled
    eager, compiled = _metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled")
    assert len(compiled) == 2
    for a, b in zip(eager, compiled, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    torch._dynamo.reset()
