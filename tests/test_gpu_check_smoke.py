"""Smoke test of benchmarks/gpu_check.sh --quick (every part on CPU with tiny shapes) and of
benchmarks/packing_check.py --quick. Checks the JSON lines the device run will be read from; never speeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_packing_check_quick_is_exact():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "packing_check.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["attn_implementation"] == "sdpa" and result["dtype"] == "float32"
    assert result["tokens"] < result["padded_tokens"]  # the rows differ in length: padding to save
    for way in ("groups", "packed"):
        assert result[f"{way}_max_rel_logp_diff"] <= 1e-5
        assert result[f"{way}_max_rel_grad_diff"] <= 1e-4
        assert result[f"{way}_seconds"] > 0
    assert result["exact_within_tolerance"] is True


@pytest.mark.bench  # every part of the device script on CPU: ~5-10 minutes here, so not in CI
def test_gpu_check_quick_writes_one_json_line_per_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    log = (tmp_path / "log.txt").read_text()
    assert done.returncode == 0, done.stdout[-2000:] + log[-4000:]
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    parts = {line["part"]: line for line in lines}
    assert list(parts) == ["env", "packing", "train_bench", "mfu", "logprobs", "fsdp"]
    for name, line in parts.items():
        assert line["rc"] == 0 and line["result"] is not None, (name, log[-4000:])
    assert parts["env"]["result"]["packing_supported"] is True and parts["env"]["result"]["cuda"] is False
    assert parts["packing"]["result"]["exact_within_tolerance"] is True
    bench = parts["train_bench"]["result"]
    assert all(bench["tokens_per_s"][c] > 0 for c in "acd") and bench["tokens_per_s"]["b"] is None
    mfu = parts["mfu"]["result"]
    assert mfu["full"]["mfu"] > 0 and mfu["lora"]["mfu"] > 0
    assert mfu["full"]["metrics_mfu"] is None  # rdro train logs no MFU on CPU
    assert parts["logprobs"]["result"]["agrees"] is True
    fsdp = parts["fsdp"]["result"]
    assert fsdp["steps_first"] == fsdp["steps_resumed"] == [1, 2, 3, 4]
    assert fsdp["max_abs_loss_diff"] < 1e-5 and fsdp["final_written"] and fsdp["manifest_written"]
    assert fsdp["distributed_type"] == "MULTI_GPU"  # --quick: the DDP config at 1 process (FSDP needs CUDA)
