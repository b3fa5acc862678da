"""train with the issue-14 losses end to end on a tiny Llama: PRO and BPO run, KLDO's moving average is
checkpointed, resumed and reset every epoch, and preference MLE trains without any logprobs artifact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import systematic_rows, write_jsonl
from test_train import COMMON, _cli, _metrics, _train  # one CLI-driving helper set for train tests

from rdro_cli.training import checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


def _prepare(root: Path, rows: list[dict], model: Path, test_fraction: str) -> Path:
    code, _, err = _cli("prepare", "--dataset", write_jsonl(root / "rows.jsonl", rows), "--model", model,
                        "--out", root / "data", "--test-fraction", test_fraction)
    assert code == 0, err
    return root


def _logprobs(root: Path, model: Path) -> None:
    code, _, err = _cli("logprobs", "--model", model, "--data", root / "data", "--out", root / "logprobs",
                        "--set", "model.dtype=float32")
    assert code == 0, err


@pytest.fixture(scope="module")
def unpaired_run(tmp_path_factory, tiny_llama) -> Path:
    # 64 rows, 48 for training: 6 steps of 8 rows per epoch
    root = _prepare(tmp_path_factory.mktemp("losses-run"), systematic_rows(64), tiny_llama, "0.25")
    _logprobs(root, tiny_llama)
    return root


@pytest.fixture(scope="module")
def paired_data(tmp_path_factory, tiny_llama) -> Path:
    """Paired data WITHOUT a logprobs artifact (pmle needs none; bpo computes its own in its test)."""
    topics = ["the sky", "a cat", "the sea", "a tree", "the sun", "a book", "the moon", "a bird"]
    rows = [{"prompt": [{"role": "user", "content": f"what is {topics[i % 8]} {i % 5}?"}],
             "chosen": [{"role": "assistant", "content": f"yes good answer about {topics[i % 8]}"}],
             "rejected": [{"role": "assistant", "content": f"no bad answer {topics[i % 8]} what"}]}
            for i in range(40)]
    return _prepare(tmp_path_factory.mktemp("paired-losses"), rows, tiny_llama, "0.2")


def test_pro_runs_and_separates_the_classes(unpaired_run, tiny_llama, tmp_path):
    out = tmp_path / "pro"
    code, _, err = _train(unpaired_run, out, tiny_llama, "train.max_steps=6", "loss.pro_alpha=2.5", loss="pro")
    assert code == 0, err
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"logratio_preferred", "logratio_non_preferred", "logratio_max"} <= set(rows[0])
    assert rows[-1]["logratio_preferred"] > rows[-1]["logratio_non_preferred"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["loss"]["pro_weighting"] == "balanced" and manifest["loss"] == "pro"


def test_kldo_moving_average_is_checkpointed_and_reset_every_epoch(unpaired_run, tiny_llama, tmp_path):
    out = tmp_path / "kldo"
    code, _, err = _train(unpaired_run, out, tiny_llama, "train.epochs=2", "train.save_every=3",
                          "train.keep_checkpoints=10", loss="kldo")
    assert code == 0, err
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))  # 2 epochs of 6 steps
    # at the first step of each epoch m starts again from that batch's mean of exp(beta r): m = exp(LME)
    for step in (1, 7):
        row = rows[step - 1]
        assert row["kldo_ema"] == pytest.approx(math.exp(row["kldo_log_mean_exp"]), rel=1e-6)  # float32
    # in between it is a moving average, not the batch mean
    assert any(abs(r["kldo_ema"] - math.exp(r["kldo_log_mean_exp"])) > 1e-3 * r["kldo_ema"] for r in rows[1:6])
    # a checkpoint within an epoch holds the m its last step used (the log rounds it to float32) ...
    for step in (3, 9):
        state = json.loads((out / "checkpoints" / f"step-{step:07d}" / "state.json").read_text())
        assert state["kldo_ema"] == pytest.approx(rows[step - 1]["kldo_ema"], rel=1e-6)
    # ... and one at an epoch's end holds m already reset for the next epoch
    for step in (6, 12):
        assert json.loads((out / "checkpoints" / f"step-{step:07d}" / "state.json").read_text())["kldo_ema"] == 0.0


def test_kldo_resumed_run_equals_an_uninterrupted_one(unpaired_run, tiny_llama, tmp_path, monkeypatch):
    sets = ["train.max_steps=5", "train.save_every=2", "loss.kldo_estimator=ma"]
    code, _, err = _train(unpaired_run, tmp_path / "straight", tiny_llama, *sets, loss="kldo")
    assert code == 0, err
    original = checkpoints.append_metrics

    def crash_after_three(path, row):
        original(path, row)
        if row["step"] == 3:
            raise RuntimeError("killed")

    monkeypatch.setattr(checkpoints, "append_metrics", crash_after_three)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        _train(unpaired_run, out, tiny_llama, *sets, loss="kldo")
    monkeypatch.undo()
    code, _, err = _train(unpaired_run, out, tiny_llama, *sets, loss="kldo", flags=["--resume"])
    assert code == 0, err
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 6))
    for a, b in zip(straight, resumed, strict=True):
        # steps 3-5 resume from step 2's checkpoint: equal only if m came back with it
        assert a["kldo_ema"] == pytest.approx(b["kldo_ema"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_bpo_runs_on_pairs(paired_data, tiny_llama, tmp_path):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "data").symlink_to(paired_data / "data")
    _logprobs(run, tiny_llama)
    out = tmp_path / "bpo"
    code, _, err = _train(run, out, tiny_llama, "train.max_steps=6", "train.batch_size=4",
                          "loss.bpo_divergence=sba", "loss.bpo_lam=0.5", loss="bpo")
    assert code == 0, err
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7)) and "reward_accuracy" in rows[0]
    assert rows[-1]["logratio_preferred"] > rows[-1]["logratio_non_preferred"]


def test_pmle_trains_without_a_logprobs_artifact(paired_data, tiny_llama, tmp_path):
    assert not (paired_data / "logprobs").exists()
    out = tmp_path / "pmle"
    code, _, err = _train(paired_data, out, tiny_llama, "train.max_steps=8", "train.batch_size=4",
                          "loss.pmle_gamma=1.0", loss="pmle")
    assert code == 0, err
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    # the logged "log-ratios" are s_pol itself (no reference): negative sums of token log-probs
    assert rows[0]["logratio_preferred"] < 0 and rows[0]["logratio_non_preferred"] < 0
    margin = [r["logratio_preferred"] - r["logratio_non_preferred"] for r in rows]
    assert margin[-1] > margin[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["logprobs"] is None and manifest["loss"] == "pmle"
    # up to date on a second call, still without logprobs
    code, _, err = _train(paired_data, out, tiny_llama, "train.max_steps=8", "train.batch_size=4",
                          "loss.pmle_gamma=1.0", loss="pmle")
    assert code == 0 and "up to date" in err
    # a loss that needs the reference still refuses the missing artifact, in one line
    code, _, err = _train(paired_data, tmp_path / "dpo", tiny_llama, "train.max_steps=2", "train.batch_size=4",
                          loss="dpo")
    assert code == 2 and "run `rdro logprobs` first" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_kldo_two_processes_match_one_process_with_twice_the_batch(unpaired_run, tiny_llama, tmp_path):
    # KLDO's counts, log-mean-exp and moving average are global-batch statistics: gathered across processes
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "accelerate"), "launch", "--config_file",
               str(repo / "recipes" / "accelerate" / "ddp-cpu-2.yaml"), "--main_process_port", str(port),
               str(bin_dir / "rdro"), "train", "--model", str(tiny_llama), "--data", str(unpaired_run / "data"),
               "--logprobs", str(unpaired_run / "logprobs"), "--out", str(tmp_path / "two"), "--loss", "kldo"]
    for item in [*COMMON, "train.max_steps=5", "train.batch_size=4"]:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    code, _, err = _train(unpaired_run, tmp_path / "one", tiny_llama, "train.max_steps=5", loss="kldo")
    assert code == 0, err
    two, one = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [r["step"] for r in two] == list(range(1, 6))
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["kldo_ema"] == pytest.approx(b["kldo_ema"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
