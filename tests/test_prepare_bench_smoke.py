"""Smoke test of benchmarks/prepare_bench.py: a --quick run end to end (rdro prepare, TRL's KTO preparation
and the logprobs/train start-up, each in a subprocess). Only the report's shape is checked; the targets are
measured by the full benchmark (benchmarks/README.md), not in CI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "prepare_bench.py"


@pytest.mark.slow
def test_prepare_bench_quick_prints_a_json_summary_last(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARK), "--quick", "--work", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, cwd=BENCHMARK.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for contender in ("rdro_500", "trl"):
        r = summary[contender]
        assert r["rows"] == 500 and r["rows_per_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
    for stage in ("logprobs_startup", "train_startup"):
        r = summary[stage]
        assert r["rows"] == 500 and 0 < r["first_step_s"] < r["wall_s"] and r["peak_rss_mb"] > r["model_rss_mb"] > 0
    assert summary["rdro_over_trl_rows_per_s"] > 0 and "tokenizer" in summary and "machine" in summary
    # the same-run baseline: the previous implementation, from this checkout's git history when it has it
    if "previous" in summary:
        r = summary["previous"]
        assert r["rows"] == 500 and r["rows_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert summary["rdro_over_previous_rows_per_s"] > 0 and "rdro/previous rows/s" in done.stdout
        previous = json.loads((tmp_path / "prepared-previous" / "manifest.json").read_text())
        assert sum(c["source_rows"] for c in previous["counts"].values()) == 500
    else:
        assert "previous implementation" in done.stderr and "not run" in done.stderr
    assert "rdro/trl rows/s" in done.stdout
    manifest = json.loads((tmp_path / "prepared-500" / "manifest.json").read_text())
    assert sum(c["source_rows"] for c in manifest["counts"].values()) == 500
