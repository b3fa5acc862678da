"""Progress where stderr is not a terminal (a log file, nohup, CI): plain lines while the work happens.

Before: every stage's rich bar wrote nothing to a redirected stderr until the stage ended (a 43 s train
run: 0 bytes until exit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import systematic_rows, write_jsonl

from rdro_cli import progress

RDRO = str(Path(sys.executable).parent / "rdro")


def test_plain_progress_prints_a_line_per_interval_with_rate_eta_and_fields(monkeypatch, capsys):
    clock = {"now": 100.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(progress, "console", progress.Console(stderr=True, width=1000))
    bar = progress.PlainProgress(("loss",), every=10.0)
    with bar:
        task = bar.add_task("train rdro", total=100, completed=20, loss="")  # a resumed run: 20 done
        for step in range(21, 101):
            clock["now"] += 0.5  # 2 steps/s
            bar.update(task, advance=1, loss=f"loss {1 / step:.4f}")
    lines = capsys.readouterr().err.strip().splitlines()
    # one line at the start, then one every 10 s (every 20 steps), the last at the end
    assert lines[0] == "train rdro: 20/100 (20.0%) 0.00/s elapsed 0:00:00"
    assert lines[1] == "train rdro: 40/100 (40.0%) 2.00/s elapsed 0:00:10 eta 0:00:30 loss 0.0250"
    assert lines[-1] == "train rdro: 100/100 (100.0%) 2.00/s elapsed 0:00:40 eta 0:00:00 loss 0.0100"
    assert len(lines) == 5  # 20 (start), 40, 60, 80, 100


def test_plain_progress_is_used_off_a_terminal_and_stays_silent_when_disabled(monkeypatch, capsys):
    assert not progress.console.is_terminal  # pytest captures stderr
    bar = progress.task_progress("speed")
    assert isinstance(bar, progress.PlainProgress)
    bar.disable = True
    with bar:
        bar.advance(bar.add_task("x", total=3), 3)
    assert capsys.readouterr().err == ""


def test_logs_are_wide():
    assert progress.console.width >= 1000  # tables are never cut at 80 columns in a log


@pytest.mark.slow
def test_train_writes_progress_lines_to_a_redirected_stderr_while_it_runs(tmp_path, tiny_llama):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RDRO_PROGRESS_EVERY": "0", "HF_HUB_OFFLINE": "1"}
    source = write_jsonl(tmp_path / "rows.jsonl", systematic_rows(64))
    common = ["--set", f"output.dir={json.dumps(str(tmp_path / 'run'))}", "--model", str(tiny_llama)]
    for stage in (["prepare", "--dataset", str(source)], ["logprobs"]):
        with (tmp_path / f"{stage[0]}.log").open("w") as log:
            subprocess.run([RDRO, *stage, *common], env=env, stdout=subprocess.PIPE, stderr=log, check=True)
        assert f"{stage[0]}" in (tmp_path / f"{stage[0]}.log").read_text()
    logprobs_log = (tmp_path / "logprobs.log").read_text()
    assert "logprobs: 0/" in logprobs_log and "rows/s" in logprobs_log

    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([RDRO, "train", *common, "--set", "train.max_steps=40", "--set",
                                 "train.batch_size=4", "--set", "model.dtype=float32"],
                                env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        seen_while_running = False
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if "train rdro: 3/40" in log_path.read_text():
                seen_while_running = proc.poll() is None
                break
            time.sleep(0.02)
        stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log_path.read_text()[-2000:]
    assert seen_while_running, "no progress line reached the log while training ran"
    text = log_path.read_text()
    step_lines = [line for line in text.splitlines() if line.startswith("train rdro: ")]
    assert len(step_lines) == 41  # the start, then every step (RDRO_PROGRESS_EVERY=0)
    assert "eta" in step_lines[5] and "loss " in step_lines[5] and "tok/s" in step_lines[5]
    assert stdout.strip() == str(tmp_path / "run" / "train")  # stdout: only the artifact path
