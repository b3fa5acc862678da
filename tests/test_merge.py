"""merge: merged outputs equal the adapter model's, plain transformers loading, pass-through, base checks."""

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from rdro_cli import merge
from rdro_cli.recipe import load_recipe

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def make_adapter(base: Path, out: Path, *, seed: int = 1) -> Path:
    """A LoRA adapter on `base` with random non-zero A and B (init_lora_weights=False), plus tokenizer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / "recipe.toml").write_text('[model]\nname = "base"\n')
    return out


def adapter_logits(adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    base_name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_name), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def plain_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_merged_model_equals_adapter_model(cli, tmp_path, request, arch):
    base = request.getfixturevalue(arch)
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    code, stdout, stderr = cli("merge", "--adapter", adapter, "--out", out)  # base from adapter_config
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    assert not (out / "adapter_config.json").exists()
    assert {"config.json", "generation_config.json", "tokenizer.json", "recipe.toml", "manifest.json"} <= {
        p.name for p in out.iterdir()}
    assert list(out.glob("*.safetensors"))

    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    expected = adapter_logits(adapter, ids)
    got = plain_logits(out, ids)  # plain transformers, no peft
    assert (got - expected).abs().max().item() < 1e-5
    assert (got - plain_logits(base, ids)).abs().max().item() > 1e-3  # the adapter really changed something

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "merge" and set(manifest["inputs"]) == {"adapter", "base"}
    assert manifest["counts"]["lora_modules"] == 2 * len(TARGETS)

    code, stdout, stderr = cli("merge", "--adapter", adapter, "--out", out)
    assert code == 0 and "up to date" in stderr and stdout == f"{out}\n"  # stdout: only the path


def test_default_paths_from_the_run_dir_and_sharded_output(tmp_path, tiny_llama, monkeypatch):
    run = tmp_path / "run"
    adapter = make_adapter(tiny_llama, (run / "train" / "final"))
    monkeypatch.setattr(merge, "MAX_SHARD_SIZE", "40KB")
    cfg = load_recipe(None, [f"output.dir={json.dumps(str(run))}"], {"model.name": str(tiny_llama)})
    out = merge.run(cfg)
    assert out == run / "merged"
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    assert (plain_logits(out, ids) - adapter_logits(adapter, ids)).abs().max().item() < 1e-5


def test_full_model_passes_through(cli, tiny_llama):
    code, stdout, stderr = cli("merge", "--adapter", tiny_llama)
    assert code == 0
    assert stdout.strip() == str(tiny_llama)
    assert "already a full model" in stderr and str(tiny_llama) in " ".join(stderr.split())


@pytest.mark.parametrize("change, words", [({"hidden": 48}, "in the base but"),
                                           ({"layers": 1}, "which the base does not have"),
                                           ({"layers": 3}, "num_hidden_layers 2 vs 3")])
def test_mismatched_base_is_refused_in_one_line(cli, tmp_path, tiny_llama, change, words):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    other = build_model(tmp_path / "other", AutoTokenizer.from_pretrained(tiny_llama), "llama", **change)
    code, stdout, stderr = cli("merge", "--adapter", adapter, "--base", other, "--out", tmp_path / "merged")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "--base" in stderr and words in stderr
    assert not (tmp_path / "merged").exists()


def test_missing_adapter_dir_is_one_line(cli, tmp_path):
    code, _, stderr = cli("merge", "--adapter", tmp_path / "nope")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "rdro train" in stderr
