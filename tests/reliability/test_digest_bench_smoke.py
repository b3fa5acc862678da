"""Smoke test of benchmarks/digest_bench.py --quick: the table and the JSON summary, not the speeds."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "digest_bench.py"


def test_digest_bench_quick_prints_a_table_and_a_json_summary_last():
    done = subprocess.run([sys.executable, str(BENCHMARK), "--quick"], capture_output=True, text=True,
                          timeout=120, cwd=BENCHMARK.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["mib"] == 8 and summary["repeats"] == 2
    assert set(summary["seconds"]) == {"read", "sha256", "xxh3_128", "cached"}
    assert all(v > 0 for v in summary["seconds"].values())
    assert summary["xxh3_speedup_over_sha256"] > 0
    assert "sha256 / contender" in done.stdout
