"""logprobs: exact numbers against a plain HF computation, resume, refusals, multi-process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, build_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rdro_cli import logprobs as logprobs_stage
from rdro_cli.errors import UserError
from rdro_cli.recipe import load_recipe


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_llama):
    from typer.testing import CliRunner

    from rdro_cli.cli import app

    out = tmp_path_factory.mktemp("lp") / "data"
    result = CliRunner().invoke(app, ["prepare", "--dataset", str(FIXTURES / "mix14k_sample.jsonl"),
                                      "--model", str(tiny_llama), "--out", str(out), "--test-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    return out


def _naive(model, ids: list[int], start: int) -> float:
    """Plain per-row reference: full forward, full-vocab log_softmax, gather, sum over completion."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logps[start - 1:].sum())


def _cfg(model, **sets):
    return load_recipe(None, [f"{k}={v}" for k, v in sets.items()], {"model.name": str(model)})


def test_ref_logps_equal_plain_computation_every_row(data_dir, tiny_llama, tmp_path):
    import datasets

    cfg = _cfg(tiny_llama, **{"loss.name": '"kto"', "logprobs.max_tokens_per_batch": 200,
                              "logprobs.chunk_size": 5, "logprobs.shard_rows": 5})  # partners across shards
    out = logprobs_stage.run(cfg, data=data_dir, out=tmp_path / "lp")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    data = datasets.load_from_disk(str(data_dir))
    for split in ("train", "test"):
        tensors = load_file(out / f"{split}.safetensors")
        rows = data[split]
        assert tensors["ref_logps"].dtype == torch.float32 and tensors["ref_logps"].shape == (len(rows),)
        for i, row in enumerate(rows):
            expected = _naive(model, row["input_ids"], row["completion_start"])
            assert tensors["ref_logps"][i].item() == pytest.approx(expected, abs=1e-5, rel=1e-6)
            partner = rows[row["kl_partner"]]
            kl_ids = row["input_ids"][: row["completion_start"]] + partner["input_ids"][partner["completion_start"]:]
            kl_expected = _naive(model, kl_ids, row["completion_start"])
            assert tensors["ref_kl_logps"][i].item() == pytest.approx(kl_expected, abs=1e-5, rel=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    data_fp = json.loads((data_dir / "manifest.json").read_text())["fingerprint"]
    assert manifest["stage"] == "logprobs" and manifest["inputs"]["data"] == data_fp
    assert manifest["counts"]["train"]["rows"] == len(data["train"])


def test_without_kto_only_ref_logps_are_written(data_dir, tiny_llama, tmp_path):
    out = logprobs_stage.run(_cfg(tiny_llama), data=data_dir, out=tmp_path / "lp")
    assert set(load_file(out / "train.safetensors")) == {"ref_logps"}


def test_killed_run_resumes_missing_shards_only_and_matches(data_dir, tiny_llama, tmp_path, monkeypatch):
    cfg = _cfg(tiny_llama, **{"logprobs.shard_rows": 3})
    reference = logprobs_stage.run(cfg, data=data_dir, out=tmp_path / "full")
    real_score, calls = logprobs_stage._score, []

    def dies_after_two_shards(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill between shards
        calls.append(1)
        return real_score(*args, **kwargs)

    monkeypatch.setattr(logprobs_stage, "_score", dies_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        logprobs_stage.run(cfg, data=data_dir, out=tmp_path / "lp")
    assert not (tmp_path / "lp").exists()  # no half artifact under the final name
    assert len(list((tmp_path / "lp.partial" / "shards").glob("*.safetensors"))) == 2
    calls.clear()
    monkeypatch.setattr(logprobs_stage, "_score", lambda *a, **k: calls.append(1) or real_score(*a, **k))
    logprobs_stage.run(cfg, data=data_dir, out=tmp_path / "lp")
    n_shards = json.loads((reference / "manifest.json").read_text())["shards"]
    assert len(calls) == n_shards - 2
    for split in ("train", "test"):
        assert (tmp_path / "lp" / f"{split}.safetensors").read_bytes() == (reference / f"{split}.safetensors").read_bytes()
    assert not (tmp_path / "lp.partial").exists()


def test_partial_run_for_other_inputs_is_refused(data_dir, tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    other = build_model(tmp_path / "other", AutoTokenizer.from_pretrained(tiny_llama), "llama", seed=1)
    cfg = _cfg(tiny_llama, **{"logprobs.shard_rows": 3})
    monkeypatch.setattr(logprobs_stage, "_score", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        logprobs_stage.run(cfg, data=data_dir, out=tmp_path / "lp")
    with pytest.raises(UserError, match="partial logprobs run for other inputs"):
        logprobs_stage.run(_cfg(other, **{"logprobs.shard_rows": 3}), data=data_dir, out=tmp_path / "lp")


def test_data_tokenised_for_another_tokenizer_is_refused(data_dir, tiny_qwen2, tmp_path):
    # The Qwen2 model dir loads the same files as a Qwen2Tokenizer, whose pre-tokenizer differs.
    with pytest.raises(UserError, match="tokenised with a different tokenizer.*re-run `rdro prepare"):
        logprobs_stage.run(_cfg(tiny_qwen2), data=data_dir, out=tmp_path / "lp")
    assert not (tmp_path / "lp").exists()


def test_up_to_date_is_skipped_and_missing_data_is_a_one_line_error(cli, data_dir, tiny_llama, tmp_path):
    args = ("logprobs", "--data", data_dir, "--model", tiny_llama, "--out", tmp_path / "lp")
    assert cli(*args)[0] == 0
    before = (tmp_path / "lp" / "manifest.json").read_text()
    code, _, stderr = cli(*args)
    assert code == 0 and "up to date" in stderr + _ and (tmp_path / "lp" / "manifest.json").read_text() == before
    code, _, stderr = cli("logprobs", "--data", tmp_path / "nope", "--model", tiny_llama, "--out", tmp_path / "x")
    assert code == 2 and "run `rdro prepare` first" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_processes_write_the_same_file_as_one(data_dir, tiny_llama, tmp_path):
    bin_dir = Path(sys.executable).parent
    one = tmp_path / "one"
    assert logprobs_stage.run(_cfg(tiny_llama, **{"logprobs.shard_rows": 3}), data=data_dir, out=one)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(bin_dir / "rdro"), "logprobs", "--data", str(data_dir), "--model", str(tiny_llama),
           "--out", str(tmp_path / "two"), "--set", "logprobs.shard_rows=3"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2
    for split in ("train", "test"):
        a, b = load_file(one / f"{split}.safetensors"), load_file(tmp_path / "two" / f"{split}.safetensors")
        assert torch.allclose(a["ref_logps"], b["ref_logps"], atol=1e-5, rtol=0)
