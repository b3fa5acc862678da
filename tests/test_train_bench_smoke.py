"""Smoke test of benchmarks/train_bench.py: the --quick configuration (tiny model, 2 steps) end to end.

Checks the closing JSON line's keys and that the contenders optimise the same objective (first-batch loss);
never speed or memory targets, which depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "train_bench.py"
KEYS = {"speedup_vs_trl", "speedup_vs_trl_best", "speedup_vs_plain", "memory_ratio_vs_trl",
        "memory_ratio_vs_plain", "first_loss_abs_diff", "tokens_per_s", "seconds_per_step", "peak_memory_mb",
        "first_loss", "logprobs_stage", "tokens_per_s_amortised", "targets_met"}


def _run(contenders: str) -> dict:
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--contenders", contenders],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    return json.loads(last)


@pytest.mark.slow
def test_quick_run_of_every_installed_contender():
    """One --quick run (CI time): every contender when TRL is installed (`make setup` installs it), else rdro
    and the plain loop only, and then the TRL columns are empty."""
    try:
        import trl  # noqa: F401
    except ImportError:
        summary = _run("ad")
        assert KEYS <= summary.keys()
        assert all(summary["tokens_per_s"][c] > 0 and summary["peak_memory_mb"][c] > 0 for c in "ad")
        assert summary["tokens_per_s"]["b"] is None and summary["speedup_vs_trl"] is None
        assert summary["speedup_vs_plain"] > 0 and summary["first_loss_abs_diff"] < 1e-5
        return
    summary = _run("abcd")
    assert KEYS <= summary.keys()
    assert all(summary["tokens_per_s"][c] > 0 and summary["peak_memory_mb"][c] > 0 for c in "abcd")
    assert summary["speedup_vs_trl"] > 0 and summary["speedup_vs_plain"] > 0
    assert summary["first_loss_abs_diff"] < 1e-5
    assert summary["settings"]["b"]["rows_match"] and summary["settings"]["c"]["rows_match"]
    assert summary["settings"]["b"]["kl_passes"] and summary["settings"]["b"]["reference_in_memory"]
    assert not summary["settings"]["c"]["kl_passes"] and not summary["settings"]["c"]["reference_in_memory"]
