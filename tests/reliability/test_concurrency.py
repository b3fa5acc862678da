"""One writer per output (issue 13.2): two launches of `prepare`, `logprobs` and `train` against one output.
Exactly one runs; the other exits 2 with one line naming the lock holder's PID; the winner's result equals
a solo run's.

`prepare` and `logprobs` finish in about a second once started, less than two interpreters' start-up can
differ, so the first launch is paused (SIGSTOP) as soon as it holds the lock and resumed after the second
was refused: the overlap is certain, not a matter of timing. `train` runs long enough to launch both at
the same instant and let them race for the lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import systematic_rows, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from rdro_cli.cli import app
from rdro_cli.store import integrity, locks, manifests

pytestmark = pytest.mark.slow

RDRO = str(Path(sys.executable).parent / "rdro")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TRAIN = ["--set", "train.max_steps=6", "--set", "train.save_every=2", "--set", "train.batch_size=4",
         "--set", "train.learning_rate=0.001"]


def _in_process(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]


@pytest.fixture(scope="module")
def solo(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("concurrency")
    source = write_jsonl(root / "rows.jsonl", systematic_rows(40))
    w = {"root": root, "model": tiny_llama}
    w["prepare"] = ["prepare", "--dataset", source, "--model", tiny_llama]
    _in_process(*w["prepare"], "--out", root / "solo" / "data")
    w["data"] = root / "solo" / "data"
    w["logprobs"] = ["logprobs", "--data", w["data"], "--model", tiny_llama, "--set", "logprobs.shard_rows=8"]
    _in_process(*w["logprobs"], "--out", root / "solo" / "logprobs")
    w["train"] = ["train", "--data", w["data"], "--logprobs", root / "solo" / "logprobs", "--model", tiny_llama, *TRAIN]
    _in_process(*w["train"], "--out", root / "solo" / "train")
    return w


def _start(args: list) -> subprocess.Popen:
    return subprocess.Popen([RDRO, *map(str, args)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _lock_holder(out: Path) -> int | None:
    try:
        return json.loads(locks.lock_path(out).read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def _refused_by(stderr: str, out: Path, stage: str, pid: int) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert str(out) in lines[0] and f"in use by `rdro {stage}` (pid {pid}" in lines[0], lines[0]


def _paused_winner(args: list, out: Path, stage: str) -> None:
    """Launch 1 takes the lock and is paused; launch 2 is refused naming it; launch 1 then finishes."""
    first = _start(args)
    try:
        deadline = time.time() + 180
        while _lock_holder(out) != first.pid:
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline, "launch 1 never took the lock"
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run([RDRO, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        _refused_by(second.stderr, out, stage, first.pid)
        temporaries = [t.name for t in out.parent.glob(f"{out.name}.tmp-*")]
        assert all(t.endswith(f"-{first.pid}") for t in temporaries), temporaries  # the refused launch wrote nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]


def test_two_prepare_launches_one_runs_and_equals_a_solo_run(solo, tmp_path):
    import datasets

    out = tmp_path / "data"
    _paused_winner([*solo["prepare"], "--out", out], out, "prepare")
    assert manifests.read_manifest(out)["fingerprint"] == manifests.read_manifest(solo["data"])["fingerprint"]
    for split in ("train", "test"):
        assert datasets.load_from_disk(str(out))[split].to_dict() == \
            datasets.load_from_disk(str(solo["data"]))[split].to_dict()
    assert integrity.artifact_problem(out) is None and not locks.lock_path(out).exists()


def test_two_logprobs_launches_one_runs_and_equals_a_solo_run(solo, tmp_path):
    out = tmp_path / "logprobs"
    _paused_winner([*solo["logprobs"], "--out", out], out, "logprobs")
    for split in ("train", "test"):
        assert (out / f"{split}.safetensors").read_bytes() == \
            (solo["root"] / "solo" / "logprobs" / f"{split}.safetensors").read_bytes()
    assert integrity.artifact_problem(out) is None


def test_two_train_launches_at_once_one_runs_and_equals_a_solo_run(solo, tmp_path):
    out = tmp_path / "train"
    args = [*solo["train"], "--out", out]
    launches = [_start(args), _start(args)]  # the same instant: they race for the lock
    results = [(p, *p.communicate(timeout=600)) for p in launches]
    winners = [r for r in results if r[0].returncode == 0]
    losers = [r for r in results if r[0].returncode != 0]
    assert len(winners) == 1 and len(losers) == 1, [(p.returncode, err[-500:]) for p, _, err in results]
    assert losers[0][0].returncode == 2
    _refused_by(losers[0][2], out, "train", winners[0][0].pid)
    reference = solo["root"] / "solo" / "train"
    weights, expected = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert (weights[name] - tensor).abs().max().item() <= 1e-6, name

    def metrics(path):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert metrics(out) == metrics(reference)
    assert integrity.artifact_problem(out) is None
