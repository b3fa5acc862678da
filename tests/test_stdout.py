"""Shell scripts capture a stage's output path: `DATA=$(rdro prepare ...)` must be exactly the path, for
every stage, on the first run and on the re-run that finds everything up to date; all else is on stderr.

The stages run in one real process (imports paid once) with file descriptor 1 pointed at a file per command,
so that anything reaching the process's stdout is caught: rdro's own prints and any library's, Python or C.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import systematic_rows, write_jsonl

REPO = Path(__file__).resolve().parent.parent
RUNNER = r"""
import json, os, sys, tempfile
from rdro_cli.cli import app

captured = []
for args in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile() as out:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(out.fileno(), 1)
        try:
            code = app(args, standalone_mode=False) or 0
        except SystemExit as exit:
            code = exit.code
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        out.seek(0)
        captured.append({"args": args, "code": code, "stdout": out.read().decode()})
    print(f"--- done: {args[0]}", file=sys.stderr, flush=True)
json.dump(captured, open(sys.argv[2], "w"))
"""


@pytest.mark.slow
def test_stdout_is_exactly_the_artifact_path_for_every_stage(tmp_path, tiny_llama):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    source = write_jsonl(tmp_path / "rows.jsonl", systematic_rows(24))
    f32 = ["--set", "model.dtype=float32"]
    lora = ["--set", "lora.enabled=true", "--set", "lora.r=4", "--set", "lora.target_modules=q_proj,v_proj"]
    stages = [
        (run / "data", ["prepare", "--dataset", source, "--model", tiny_llama, "--out", run / "data",
                        "--test-fraction", "0.25"]),
        (run / "logprobs", ["logprobs", "--data", run / "data", "--model", tiny_llama, "--out", run / "logprobs",
                            *f32]),
        (run / "train", ["train", "--data", run / "data", "--logprobs", run / "logprobs", "--model", tiny_llama,
                         "--out", run / "train", "--set", "train.max_steps=2", "--set", "train.batch_size=4",
                         *f32, *lora]),
        (run / "merged", ["merge", "--adapter", run / "train" / "final", "--out", run / "merged"]),
        (run / "eval", ["eval", "--model", run / "merged", "--data", run / "data", "--logprobs", run / "logprobs",
                        "--out", run / "eval", *f32]),
        (run / "report" / "report.md", ["report", "--run", run, "--out", run / "report"]),
    ]
    commands = [[str(a) for a in args] for _, args in stages] * 2  # the second round finds all up to date
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result_file = tmp_path / "captured.json"
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands), str(result_file)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    for noise in ("FutureWarning", "DeprecationWarning", "Traceback"):
        assert noise not in result.stderr, f"{noise} on stderr:\n{result.stderr}"
    assert result.stderr.count("is up to date") >= 5  # the second round: prepare ... eval (report redraws)
    captured = json.loads(result_file.read_text())
    paths = [path for path, _ in stages] * 2
    for path, entry in zip(paths, captured, strict=True):
        assert entry["code"] == 0, entry
        assert entry["stdout"] == f"{path}\n", f"rdro {entry['args'][0]} stdout: {entry['stdout']!r}"
        assert path.exists()
