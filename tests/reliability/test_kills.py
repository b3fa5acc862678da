"""Kills: `rdro logprobs` and `rdro train` as real subprocesses, killed with SIGKILL at several points
(after some shards or checkpoints exist, and at seeded random times), then re-run with the same
command: the result equals an uninterrupted run's (file bytes for log-probs; weights and metrics for
train). SIGINT stops training cleanly: a checkpoint is saved, the exit code is 130, and the run resumes.
After every kill, no stage directory exists that a later stage would accept.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import systematic_rows, write_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

RDRO = str(Path(sys.executable).parent / "rdro")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
KILL_SEED = 20261123


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("kills")
    source = write_jsonl(root / "rows.jsonl", systematic_rows(160))
    subprocess.run([RDRO, "prepare", "--dataset", source, "--model", tiny_llama, "--out", root / "data",
                    "--test-fraction", "0.1"], env=ENV, check=True, capture_output=True)
    return root / "data"


def _start(args: list) -> subprocess.Popen:
    return subprocess.Popen([RDRO, *map(str, args)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 120) -> bool:
    """Polls until `condition()` holds (True) or the process ends first (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError("condition not reached")


def _finish(args: list) -> subprocess.CompletedProcess:
    result = subprocess.run([RDRO, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _refused_downstream(stage_dir: Path, cli_args: list) -> None:
    """A later stage pointed at a killed stage's dir refuses in one line (or the dir does not exist)."""
    result = subprocess.run([RDRO, *map(str, cli_args)], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert str(stage_dir) in result.stderr


def test_logprobs_killed_at_several_points_resumes_to_identical_bytes(data_dir, tiny_llama, tmp_path):
    args = ["logprobs", "--data", data_dir, "--model", tiny_llama, "--set", "logprobs.shard_rows=8",
            "--set", "logprobs.max_tokens_per_batch=256"]
    _finish([*args, "--out", tmp_path / "reference"])
    reference = {s: (tmp_path / "reference" / f"{s}.safetensors").read_bytes() for s in ("train", "test")}
    rng = random.Random(KILL_SEED)
    points = [("after 1 shard", 1, None), ("after 6 shards", 6, None), ("random time", None, rng.uniform(2.0, 6.0))]
    outcomes = []
    for label, shards, delay in points:
        out = tmp_path / f"lp-{len(outcomes)}"
        shard_dir = out.with_name(out.name + ".partial") / "shards"
        proc = _start([*args, "--out", out])
        if shards is not None:
            reached = _wait_for(proc, lambda d=shard_dir, n=shards: len(list(d.glob("*.safetensors"))) >= n)
        else:
            time.sleep(delay)
            reached = proc.poll() is None
        proc.kill()
        proc.wait()
        killed_with = len(list(shard_dir.glob("*.safetensors"))) if shard_dir.is_dir() else 0
        if not (out / "manifest.json").exists():
            assert not out.exists() or not (out / "manifest.json").exists()
            _refused_downstream(out, ["train", "--data", data_dir, "--logprobs", out, "--model", tiny_llama,
                                      "--out", tmp_path / f"train-{len(outcomes)}"])
        _finish([*args, "--out", out])
        for split, expected in reference.items():
            assert (out / f"{split}.safetensors").read_bytes() == expected, (label, split)
        outcomes.append((label, reached, killed_with))
    print("logprobs kill points (label, killed mid-run, shards on disk when killed):", outcomes)


def _train_args(data_dir, logprobs_dir, model, out):
    return ["train", "--data", data_dir, "--logprobs", logprobs_dir, "--model", model, "--out", out, "--resume",
            "--set", "train.max_steps=24", "--set", "train.save_every=4", "--set", "train.batch_size=4",
            "--set", "train.learning_rate=0.001", "--set", "train.keep_checkpoints=2"]


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def _weights(path: Path) -> dict:
    return load_file(path / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def train_reference(data_dir, tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-reference")
    _finish(["logprobs", "--data", data_dir, "--model", tiny_llama, "--out", root / "logprobs"])
    _finish(_train_args(data_dir, root / "logprobs", tiny_llama, root / "train"))
    return root / "logprobs", _weights(root / "train"), _metrics(root / "train")


def _assert_same_as_reference(out: Path, reference_weights: dict, reference_metrics: list[dict]) -> None:
    weights = _weights(out)
    assert set(weights) == set(reference_weights)
    for name, tensor in reference_weights.items():
        assert (weights[name] - tensor).abs().max().item() <= 1e-6, name
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, len(reference_metrics) + 1))
    assert metrics == reference_metrics


def test_train_killed_at_several_points_resumes_to_the_same_weights_and_metrics(data_dir, tiny_llama, tmp_path,
                                                                                train_reference):
    logprobs_dir, reference_weights, reference_metrics = train_reference
    rng = random.Random(KILL_SEED + 1)
    points = [("after the step-4 checkpoint", 4, None), ("after the step-12 checkpoint", 12, None),
              ("random time", None, rng.uniform(3.0, 9.0))]
    outcomes = []
    for label, at_step, delay in points:
        out = tmp_path / f"train-{len(outcomes)}"
        args = _train_args(data_dir, logprobs_dir, tiny_llama, out)
        proc = _start(args)
        if at_step is not None:
            reached = _wait_for(proc, lambda o=out, k=at_step: any(
                int(p.parent.name.split("-")[1]) >= k for p in (o / "checkpoints").glob("step-???????/state.json")))
        else:
            time.sleep(delay)
            reached = proc.poll() is None
        proc.kill()
        proc.wait()
        if not (out / "manifest.json").exists():
            _refused_downstream(out, ["merge", "--adapter", out / "final", "--out", tmp_path / "merged"])
            _refused_downstream(out, ["eval", "--model", out / "final", "--data", data_dir, "--logprobs",
                                      logprobs_dir, "--out", tmp_path / "eval"])
        _finish(args)
        _assert_same_as_reference(out, reference_weights, reference_metrics)
        outcomes.append((label, reached))
    print("train kill points (label, killed mid-run):", outcomes)


def test_sigint_checkpoints_exits_130_and_resumes(data_dir, tiny_llama, tmp_path, train_reference):
    logprobs_dir, reference_weights, reference_metrics = train_reference
    out = tmp_path / "train"
    args = _train_args(data_dir, logprobs_dir, tiny_llama, out)
    proc = _start(args)
    assert _wait_for(proc, lambda: (out / "metrics.jsonl").exists() and
                     len((out / "metrics.jsonl").read_text().splitlines()) >= 5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    states = [json.loads(p.read_text()) for p in (out / "checkpoints").glob("step-*[0-9]/state.json")]
    last_logged = len((out / "metrics.jsonl").read_text().splitlines())
    assert max(s["step"] for s in states) == last_logged  # the step it stopped at was checkpointed
    assert not (out / "manifest.json").exists()
    _finish(args)
    _assert_same_as_reference(out, reference_weights, reference_metrics)
