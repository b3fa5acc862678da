"""Smoke test of benchmarks/logprobs_bench.py: a tiny --quick run end to end (subprocesses included).

Only the report's shape and the per-row agreement are checked; the speed and memory targets are not
(they are measured by the full benchmark on an idle machine, not in CI).
"""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "logprobs_bench.py"


def test_logprobs_bench_quick_prints_a_json_summary_last():
    done = subprocess.run([sys.executable, str(BENCHMARK), "--quick"], capture_output=True, text=True,
                          timeout=300, cwd=BENCHMARK.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("speedup", "memory_ratio", "memory_increase_ratio", "max_rel_diff", "stage_tokens_per_s",
                "naive_tokens_per_s", "stage_peak_rss_mb", "naive_peak_rss_mb", "stage_peak_memory_mb",
                "naive_peak_memory_mb", "device", "model", "rows", "tokens", "naive_batch_rows",
                "max_tokens_per_batch", "chunk_size"):
        assert key in summary, key
    assert summary["device"] == "cpu" and summary["dtype"] == "float32"
    assert summary["model"]["vocab"] > 0 and summary["rows"] == 16
    for contender in ("stage", "naive"):
        assert summary[f"{contender}_tokens_per_s"] > 0
        assert summary[f"{contender}_peak_rss_mb"] > 0
    assert summary["speedup"] > 0 and summary["memory_ratio"] > 0
    # both contenders score the same rows: float32 sums agree to the 1e-4 relative
    assert summary["max_rel_diff"] <= 1e-4 and summary["agrees"] is True
    assert "stage / naive" in done.stdout
