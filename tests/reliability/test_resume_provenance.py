"""What `--resume` does when there is nothing to refuse, and what the provenance checks record.

The refusals themselves (a finished run with no checkpoint, fewer steps, a damaged checkpoint, log-probs of
another model, a base with other weights, data replaced under a trained run) are rows of the bad-input table
(test_bad_inputs.py), which also checks that each leaves every file byte-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import build_model, systematic_rows, write_jsonl
from typer.testing import CliRunner

from rdro_cli.cli import app
from rdro_cli.lm import fingerprints

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = ["--set", "lora.enabled=true", "--set", "train.batch_size=4", "--set", "model.dtype=float32"]


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _card(model_dir: Path) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(model_dir / "README.md").data.to_dict()["rdro"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    """data and logprobs (reference: the tiny Llama) of a small systematic dataset."""
    root = tmp_path_factory.mktemp("provenance")
    source = write_jsonl(root / "rows.jsonl", systematic_rows(24))
    assert _cli("prepare", "--dataset", source, "--model", tiny_llama, "--out", root / "data")[0] == 0
    assert _cli("logprobs", "--data", root / "data", "--model", tiny_llama, "--out", root / "logprobs",
                "--set", "model.dtype=float32")[0] == 0
    return root


def _train(run: Path, out: Path, model: Path, *extra):
    return _cli("train", "--data", run / "data", "--logprobs", run / "logprobs", "--model", model, "--out", out,
                *TRAIN, *extra)


def test_resume_with_no_run_starts_one_and_says_so(run, tiny_llama, tmp_path):
    code, stdout, stderr = _train(run, tmp_path / "train", tiny_llama, "--max-steps", "2", "--resume")
    assert code == 0, stderr
    assert "--resume found no run" in stderr and "starting a new one" in stderr
    assert json.loads((tmp_path / "train" / "manifest.json").read_text())["counts"]["steps"] == 2


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over_and_says_so(run, tiny_llama, tmp_path):
    out = tmp_path / "train"
    out.mkdir()
    (out / ".rdro-stage").write_text('{"stage": "train"}\n')
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')  # what a kill at step 1 leaves
    code, _, stderr = _train(run, out, tiny_llama, "--max-steps", "2", "--resume")
    assert code == 0, stderr
    assert f"--resume found no checkpoint in {out}; starting from step 0" in stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 0.5  # the stale row was not kept


def test_resume_trains_a_finished_run_further_and_keeps_it_finished_throughout(run, tiny_llama, tmp_path):
    out = tmp_path / "train"
    assert _train(run, out, tiny_llama, "--max-steps", "2")[0] == 0
    code, _, stderr = _train(run, out, tiny_llama, "--max-steps", "3", "--resume")
    assert code == 0, stderr
    assert json.loads((out / "manifest.json").read_text())["counts"]["steps"] == 3
    assert _cli("verify", out)[0] == 0


def test_a_deliberate_other_reference_is_allowed_and_recorded(run, tiny_llama, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    twin = build_model(tmp_path / "twin", AutoTokenizer.from_pretrained(tiny_tokenizer_dir), "llama", seed=1)
    code, _, stderr = _train(run, tmp_path / "train", twin, "--max-steps", "2", "--set",
                             f"model.ref_name={json.dumps(str(tiny_llama))}")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    reference = {"name": str(tiny_llama), "fingerprint": fingerprints.model_fingerprint(tiny_llama)}
    assert manifest["reference"] == reference
    assert manifest["inputs"]["model"] == fingerprints.model_fingerprint(twin)
    card = _card(tmp_path / "train" / "final")
    assert card["reference_model"] == reference
    assert card["base_model"] == str(twin) and card["base_model_fingerprint"] == fingerprints.model_fingerprint(twin)


def test_the_same_reference_is_recorded_by_content_not_by_name(run, tiny_llama, tmp_path):
    copy = shutil.copytree(tiny_llama, tmp_path / "llama-copy")  # another path, the same weights: accepted
    code, _, stderr = _train(run, tmp_path / "train", copy, "--max-steps", "2")
    assert code == 0, stderr
    reference = json.loads((tmp_path / "train" / "manifest.json").read_text())["reference"]
    assert reference == {"name": str(tiny_llama), "fingerprint": fingerprints.model_fingerprint(copy)}


def test_merge_accepts_a_copy_of_the_base_it_was_trained_on(run, tiny_llama, tmp_path):
    assert _train(run, tmp_path / "train", tiny_llama, "--max-steps", "2")[0] == 0
    copy = shutil.copytree(tiny_llama, tmp_path / "llama-copy")
    code, _, stderr = _cli("merge", "--adapter", tmp_path / "train" / "final", "--base", copy, "--out",
                           tmp_path / "merged")
    assert code == 0, stderr
    assert json.loads((tmp_path / "merged" / "manifest.json").read_text())["inputs"]["base"] == \
        fingerprints.model_fingerprint(tiny_llama)


def test_eval_says_when_the_model_was_trained_on_other_data(run, tiny_llama, tmp_path):
    assert _train(run, tmp_path / "train", tiny_llama, "--max-steps", "2")[0] == 0
    other = write_jsonl(tmp_path / "other.jsonl", systematic_rows(20, seed=3))
    assert _cli("prepare", "--dataset", other, "--model", tiny_llama, "--out", tmp_path / "other-data")[0] == 0
    args = ["eval", "--model", tmp_path / "train" / "final", "--tasks", "generate", "--limit", "2", "--set",
            "eval.max_new_tokens=2"]
    code, _, stderr = _cli(*args, "--data", tmp_path / "other-data", "--out", tmp_path / "eval-other")
    assert code == 0, stderr
    assert "eval: warning:" in stderr and "was trained on another prepare artifact" in " ".join(stderr.split())
    warnings = json.loads((tmp_path / "eval-other" / "eval.json").read_text())["warnings"]
    assert len(warnings) == 1 and "test split may hold prompts the model was trained on" in warnings[0]
    code, _, stderr = _cli(*args, "--data", run / "data", "--out", tmp_path / "eval-same")
    assert code == 0, stderr
    assert "warning" not in stderr
    assert "warnings" not in json.loads((tmp_path / "eval-same" / "eval.json").read_text())


def test_eval_says_when_the_preference_log_ratios_use_other_reference_log_probs(run, tiny_llama, tiny_tokenizer_dir,
                                                                                tmp_path):
    from transformers import AutoTokenizer

    assert _train(run, tmp_path / "train", tiny_llama, "--max-steps", "2")[0] == 0
    twin = build_model(tmp_path / "twin", AutoTokenizer.from_pretrained(tiny_tokenizer_dir), "llama", seed=1)
    assert _cli("logprobs", "--data", run / "data", "--model", twin, "--out", tmp_path / "twin-logprobs")[0] == 0
    code, _, stderr = _cli("eval", "--model", tmp_path / "train" / "final", "--tasks", "preference", "--data",
                           run / "data", "--logprobs", tmp_path / "twin-logprobs", "--out", tmp_path / "eval")
    assert code == 0, stderr
    warnings = json.loads((tmp_path / "eval" / "eval.json").read_text())["warnings"]
    assert len(warnings) == 1 and "was trained against other reference log-probs" in warnings[0]
    assert "was trained against other reference log-probs" in " ".join(stderr.split())
