"""train: learning on a systematic fixture, every loss, resume = uninterrupted, 2 processes = 1 process with
twice the batch, accumulation = a bigger batch, saved models reload, and one-line refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import systematic_rows, write_jsonl
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from rdro_cli.cli import app
from rdro_cli.lm import batching, completion_head
from rdro_cli.losses import density_ratio, registry
from rdro_cli.recipe import load_recipe
from rdro_cli.store import integrity
from rdro_cli.training import checkpoints

REPO = Path(__file__).resolve().parent.parent
COMMON = ["model.dtype=float32", "train.learning_rate=1e-3", "train.batch_size=8", "train.warmup_ratio=0.1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _train(run: Path, out: Path, model: Path, *sets: str, loss: str = "rdro", flags=(), logprobs=None):
    args = ["train", "--model", model, "--data", run / "data", "--logprobs", logprobs or run / "logprobs",
            "--out", out, "--loss", loss, *flags]
    for item in [*COMMON, *sets]:
        args += ["--set", item]
    return _cli(*args)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _make_run(root: Path, rows: list[dict], model: Path, test_fraction: str) -> Path:
    source = write_jsonl(root / "rows.jsonl", rows)
    code, _, err = _cli("prepare", "--dataset", source, "--model", model, "--out", root / "data",
                        "--test-fraction", test_fraction)
    assert code == 0, err
    # kto's mismatched-pair log-probs too, so one logprobs artifact serves every loss
    code, _, err = _cli("logprobs", "--model", model, "--data", root / "data", "--out", root / "logprobs",
                        "--set", "loss.name=kto", "--set", "model.dtype=float32")
    assert code == 0, err
    return root


@pytest.fixture(scope="module")
def systematic_run(tmp_path_factory, tiny_llama) -> Path:
    return _make_run(tmp_path_factory.mktemp("train-run"), systematic_rows(128), tiny_llama, "0.25")


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory, tiny_llama) -> Path:
    topics = ["the sky", "a cat", "the sea", "a tree", "the sun", "a book", "the moon", "a bird"]
    rows = [{"prompt": [{"role": "user", "content": f"what is {topics[i % 8]} {i % 5}?"}],
             "chosen": [{"role": "assistant", "content": f"yes good answer about {topics[i % 8]}"}],
             "rejected": [{"role": "assistant", "content": f"no bad answer {topics[i % 8]} what"}]}
            for i in range(40)]
    return _make_run(tmp_path_factory.mktemp("paired-run"), rows, tiny_llama, "0.2")


def _test_logratios(run: Path, model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy minus reference completion log-probs of the held-out split, and its labels."""
    import datasets
    from transformers import AutoModelForCausalLM

    test = datasets.load_from_disk(str(run / "data"))["test"]
    ref = load_file(str(run / "logprobs" / "test.safetensors"))["ref_logps"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        batch = batching.collate(test["input_ids"], test["completion_start"], 0)
        policy = completion_head.completion_logps(model, *batch, chunk_size=64)
    return policy - ref, torch.tensor(test["label"])


@pytest.mark.parametrize("weighting", ["batch", "balanced"])
def test_rdro_learns_the_systematic_preference_on_the_test_split(systematic_run, tiny_llama, weighting, tmp_path):
    out = tmp_path / "train"
    code, stdout, err = _train(systematic_run, out, tiny_llama, "train.max_steps=200",
                               f"loss.weighting={weighting}")
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == str(out)
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob("train*.tmp-*"))
    assert {p.name for p in out.iterdir()} == {".rdro-stage", "metrics.jsonl", "checkpoints", "final", "manifest.json"}
    assert {"model.safetensors", "config.json", "recipe.toml", "tokenizer.json"} <= {
        p.name for p in (out / "final").iterdir()}

    logratios, labels = _test_logratios(systematic_run, out / "final")
    preferred, non_preferred = logratios[labels].mean().item(), logratios[~labels].mean().item()
    print(f"\n{weighting}: test mean log-ratio preferred {preferred:.3f}, non-preferred {non_preferred:.3f}")
    assert preferred > non_preferred + 1.0

    manifest = json.loads((out / "manifest.json").read_text())
    data_manifest = json.loads((systematic_run / "data" / "manifest.json").read_text())
    alpha = data_manifest["preferred_fraction"]
    assert manifest["stage"] == "train" and manifest["alpha"] == pytest.approx(alpha)
    assert manifest["inputs"]["data"] == data_manifest["fingerprint"]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 201))
    last = rows[-1]
    assert last["bound"] == pytest.approx(math.log(1 / alpha), rel=1e-5)
    assert 0.0 <= last["frac_at_bound"] <= 1.0
    for key in ("epoch", "loss", "lr", "grad_norm", "tokens_per_s", "logratio_preferred",
                "logratio_non_preferred", "logratio_max"):
        assert isinstance(last[key], float), key
    assert rows[0]["lr"] < rows[20]["lr"] and rows[-1]["lr"] < rows[100]["lr"]  # warmup, then cosine decay

    # a complete run with the same inputs and recipe is skipped; the full model reloads
    code, stdout, err = _train(systematic_run, out, tiny_llama, "train.max_steps=200",
                               f"loss.weighting={weighting}")
    assert code == 0 and "up to date" in err
    cfg = load_recipe(out / "final" / "recipe.toml")
    assert cfg.loss.weighting == weighting and cfg.train.max_steps == 200


@pytest.mark.parametrize(("loss", "keys"), [("ddro", set()), ("kto", {"kl_ref_point"}), ("bco", {"delta"})])
def test_baselines_run_and_log_their_statistics(systematic_run, tiny_llama, tmp_path, loss, keys):
    out = tmp_path / "train"
    code, _, err = _train(systematic_run, out, tiny_llama, "train.max_steps=6", loss=loss)
    assert code == 0, err
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    base = {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "logratio_preferred",
            "logratio_non_preferred", "logratio_max"}
    assert set(rows[0]) == base | keys
    if loss == "bco":  # the running mean moves with the log-ratios and is kept in checkpoints
        assert rows[-1]["delta"] != rows[0]["delta"]
        state = json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())
        assert state["bco_count"] == 6 * 8 and state["bco_delta"] == pytest.approx(rows[-1]["delta"])
    if loss == "kto":
        assert all(r["kl_ref_point"] >= 0.0 for r in rows)


def test_dpo_runs_on_pairs_and_refuses_unpaired_data(paired_run, systematic_run, tiny_llama, tmp_path):
    out = tmp_path / "dpo"
    code, _, err = _train(paired_run, out, tiny_llama, "train.max_steps=8", "train.batch_size=4", loss="dpo")
    assert code == 0, err
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9)) and "reward_accuracy" in rows[0]
    assert rows[-1]["logratio_preferred"] > rows[-1]["logratio_non_preferred"]

    code, _, err = _train(systematic_run, tmp_path / "nope", tiny_llama, "train.max_steps=2", loss="dpo")
    assert code == 2
    assert "dpo needs paired data (prompt/chosen/rejected); this dataset is unpaired" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = _train(paired_run, tmp_path / "odd", tiny_llama, "train.batch_size=3", loss="dpo")
    assert code == 2 and "must be even" in err


def test_gradient_accumulation_equals_a_bigger_batch(systematic_run, tiny_llama, tmp_path):
    code, _, err = _train(systematic_run, tmp_path / "big", tiny_llama, "train.max_steps=5")
    assert code == 0, err
    code, _, err = _train(systematic_run, tmp_path / "acc", tiny_llama, "train.max_steps=5", "train.batch_size=4",
                          "train.gradient_accumulation_steps=2")
    assert code == 0, err
    big, acc = _metrics(tmp_path / "big"), _metrics(tmp_path / "acc")
    for a, b in zip(big, acc, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["logratio_max"] == pytest.approx(b["logratio_max"], abs=1e-5)


LORA = ["lora.enabled=true", "lora.r=4", "lora.dropout=0.1", "lora.target_modules=q_proj,v_proj,up_proj",
        "train.max_steps=8", "train.save_every=2", "train.keep_checkpoints=2"]


def _stop_at(monkeypatch, step: int, how):
    """Runs `how()` right after the metrics row of `step` is written (the loop's per-step hook)."""
    original = checkpoints.append_metrics

    def append(path, row):
        original(path, row)
        if row["step"] == step:
            how()

    monkeypatch.setattr(checkpoints, "append_metrics", append)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(systematic_run, tiny_llama, tmp_path,
                                                                 monkeypatch):
    code, _, err = _train(systematic_run, tmp_path / "straight", tiny_llama, *LORA)
    assert code == 0, err

    out = tmp_path / "resumed"
    # Ctrl-C during step 3: the step finishes, a checkpoint is written, exit 130
    _stop_at(monkeypatch, 3, lambda: signal.raise_signal(signal.SIGINT))
    code, _, err = _train(systematic_run, out, tiny_llama, *LORA)
    assert code == 130, err
    assert (out / "checkpoints" / "step-0000003" / "state.json").is_file()
    assert not (out / "manifest.json").exists() and [r["step"] for r in _metrics(out)] == [1, 2, 3]

    code, _, err = _train(systematic_run, out, tiny_llama, *LORA)  # no --resume: refused
    assert code == 2 and "--resume" in err

    # a crash after step 5 (last checkpoint: step 4) leaves a metrics row that the resume must redo
    _stop_at(monkeypatch, 5, lambda: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        _train(systematic_run, out, tiny_llama, *LORA, flags=["--resume"])
    monkeypatch.undo()
    code, _, err = _train(systematic_run, out, tiny_llama, *LORA, flags=["--resume"])
    assert code == 0, err

    straight, resumed = _metrics(tmp_path / "straight"), _metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == b["lr"]
    expected = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    got = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000006", "step-0000008"]

    # the saved adapter reloads with peft on its base and changed the model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out / "final")).eval()
    loaded = {k: v for k, v in adapted.state_dict().items() if "lora_B" in k}
    assert loaded and any(v.abs().sum() > 0 for v in loaded.values())

    # --resume with another recipe is refused
    shutil.rmtree(out / "final")
    (out / "manifest.json").unlink()
    code, _, err = _train(systematic_run, out, tiny_llama, *LORA, "train.learning_rate=2e-3", "train.seed=7",
                          flags=["--resume"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    lr = next(v.split("=")[1] for v in COMMON if v.startswith("train.learning_rate="))
    assert f"train.learning_rate: {float(lr)!r} -> 0.002" in err and "train.seed: 42 -> 7" in err


def test_resume_may_train_longer_and_change_cadence_but_nothing_else(systematic_run, tiny_llama, tmp_path):
    out = tmp_path / "run"
    code, _, err = _train(systematic_run, out, tiny_llama, *LORA)
    assert code == 0, err
    first = _metrics(out)
    # a finished run asked for more steps: without --resume refused (naming --resume), with it continued
    longer = [*LORA, "train.max_steps=12", "train.log_every=1", "train.save_every=3", "train.keep_checkpoints=3"]
    code, _, err = _train(systematic_run, out, tiny_llama, *longer)
    assert code == 2 and "finished run of 8 steps and 12 are asked for" in err and "--resume" in err
    code, _, err = _train(systematic_run, out, tiny_llama, *longer, flags=["--resume"])
    assert code == 0, err
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13)) and rows[:8] == first
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 12 and manifest["config"]["train"]["max_steps"] == 12
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000008", "step-0000009",
                                                                       "step-0000012"]
    code, _, err = _train(systematic_run, out, tiny_llama, *longer)  # same request again: up to date
    assert code == 0 and "up to date" in err
    # fewer steps than trained: refused on --resume
    (out / "manifest.json").unlink()
    code, _, err = _train(systematic_run, out, tiny_llama, *LORA, flags=["--resume"])
    assert code == 2 and "trained 12 steps, more than the 8 asked for" in err


def test_non_finite_loss_stops_naming_the_step(systematic_run, tiny_llama, tmp_path, monkeypatch):
    poisoned = {"on": False}

    def ddro_then_nan(logratios, labels):
        output = density_ratio.ddro_loss(logratios, labels)
        return output._replace(losses=output.losses * float("nan")) if poisoned["on"] else output

    monkeypatch.setitem(registry.LOSSES, "ddro", registry.LossSpec(ddro_then_nan))
    _stop_at(monkeypatch, 2, lambda: poisoned.update(on=True))
    out = tmp_path / "train"
    code, _, err = _train(systematic_run, out, tiny_llama, "train.max_steps=6", "train.save_every=2", loss="ddro")
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the progress bar
    assert len(errors) == 1 and "step 3: non-finite loss" in errors[0] and "step-0000002" in errors[0]
    assert (out / "checkpoints" / "step-0000002" / "state.json").is_file()
    assert not (out / "manifest.json").exists() and not (out / "final").exists()


def test_refuses_missing_or_mismatched_inputs(systematic_run, tiny_llama, tmp_path):
    code, _, err = _train(systematic_run, tmp_path / "a", tiny_llama, logprobs=tmp_path / "none")
    assert code == 2 and "run `rdro logprobs` first" in err

    other = tmp_path / "logprobs"
    shutil.copytree(systematic_run / "logprobs", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["inputs"]["data"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    integrity.reseal(other)  # a valid manifest for other data, not a damaged one
    code, _, err = _train(systematic_run, tmp_path / "b", tiny_llama, logprobs=other)
    assert code == 2 and "re-run `rdro logprobs" in err and len(err.strip().splitlines()) == 1

    manifest["inputs"]["data"] = json.loads((systematic_run / "data" / "manifest.json").read_text())["fingerprint"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    tensors = load_file(str(other / "train.safetensors"))
    save_file({"ref_logps": tensors["ref_logps"]}, str(other / "train.safetensors"))
    integrity.reseal(other)
    code, _, err = _train(systematic_run, tmp_path / "c", tiny_llama, loss="kto", logprobs=other)
    assert code == 2 and "ref_kl_logps" in err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_twice_the_batch(systematic_run, tiny_llama, tmp_path):
    # kto: its reference point is a mean over the global batch, the hardest case to get equal
    sets = ["train.max_steps=6", "train.batch_size=4"]
    args = [REPO / "recipes" / "accelerate" / "ddp-cpu-2.yaml"]
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", *map(str, args),
               "--main_process_port", str(_free_port()), str(Path(sys.executable).parent / "rdro"), "train",
               "--model", str(tiny_llama), "--data", str(systematic_run / "data"),
               "--logprobs", str(systematic_run / "logprobs"), "--out", str(tmp_path / "two"), "--loss", "kto"]
    for item in [*COMMON, *sets]:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    code, _, err = _train(systematic_run, tmp_path / "one", tiny_llama, "train.max_steps=6", loss="kto")
    assert code == 0, err
    two, one = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["counts"]["processes"] == 2
    assert [r["step"] for r in two] == list(range(1, 7))
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=True))
    print(f"\n2 processes x batch 4 vs 1 x batch 8 (kto): max loss difference {worst:.2e}")
    assert worst < 1e-5
    for a, b in zip(one, two, strict=True):
        assert a["kl_ref_point"] == pytest.approx(b["kl_ref_point"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_gradient_checkpointing_with_lora_gives_the_same_steps(systematic_run, tiny_llama, tmp_path):
    lora = ["lora.enabled=true", "lora.r=4", "lora.dropout=0.1", "lora.target_modules=q_proj,v_proj",
            "train.max_steps=3"]
    code, _, err = _train(systematic_run, tmp_path / "plain", tiny_llama, *lora)
    assert code == 0, err
    code, _, err = _train(systematic_run, tmp_path / "ckpt", tiny_llama, *lora, "train.gradient_checkpointing=true")
    assert code == 0, err
    for a, b in zip(_metrics(tmp_path / "plain"), _metrics(tmp_path / "ckpt"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("name", ["ddp-cpu-2.yaml", "zero3-8gpu.yaml", "fsdp-8gpu.yaml"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "recipes" / "accelerate" / name))
    assert config.num_processes == (2 if name.startswith("ddp") else 8)
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "zero3": "DEEPSPEED", "fsdp": "FSDP"}[
        name.split("-")[0]]
