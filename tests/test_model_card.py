"""Model cards of train/final and merged/: written with huggingface_hub, parsed back with it, field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import systematic_rows, write_jsonl
from huggingface_hub import ModelCard

from rdro_cli.recipe import load_recipe
from rdro_cli.training import model_card

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


pytestmark = pytest.mark.usefixtures("one_thread")


def _load(directory: Path) -> tuple[dict, str]:
    card = ModelCard.load(directory / "README.md")
    return card.data.to_dict(), card.text


def test_card_of_a_hub_base_and_dataset_parses_back(tmp_path):
    cfg = load_recipe(None, [f"model.name={HUB_BASE}", "loss.name=rdro", "loss.weighting=balanced",
                             "train.learning_rate=5e-7", "lora.enabled=true", "lora.r=8"])
    metadata = model_card.training_metadata(cfg, adapter=True, steps=12, alpha=0.39, dataset="mix14k",
                                            processes=8)
    model_card.write(tmp_path, metadata, name="qwen-rdro")
    data, text = _load(tmp_path)
    assert data["base_model"] == HUB_BASE and data["library_name"] == "peft"
    assert data["datasets"] == ["trl-lib/kto-mix-14k"] and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["rdro-cli", "rdro", "binary-feedback", "alignment", "lora"]
    rdro = data["rdro"]
    assert rdro["method"] == "rdro" and rdro["dataset"] == "mix14k"
    assert rdro["loss"] == {"name": "rdro", "alpha": 0.39, "alpha_setting": "auto", "weighting": "balanced"}
    assert rdro["training"]["learning_rate"] == 5e-7 and rdro["training"]["steps"] == 12
    assert rdro["training"]["processes"] == 8 and rdro["lora"]["r"] == 8
    assert "model-index" not in data  # no eval results given
    assert f"[`{HUB_BASE}`](https://huggingface.co/{HUB_BASE})" in text and "| loss.weighting | `balanced` |" in text
    assert "eprint        = {2604.04410}" in text and "AutoPeftModelForCausalLM" in text


def test_local_base_and_dataset_stay_out_of_the_hub_fields(tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", systematic_rows(4))
    cfg = load_recipe(None, [f"model.name={tmp_path}", "loss.name=kto", "loss.beta=0.2"])
    metadata = model_card.training_metadata(cfg, adapter=False, steps=3, alpha=None, dataset=str(source))
    model_card.write(tmp_path, metadata, name="local")
    data, text = _load(tmp_path)
    assert "base_model" not in data and "datasets" not in data and data["library_name"] == "transformers"
    assert data["rdro"]["base_model"] == str(tmp_path) and data["rdro"]["dataset"] == str(source)
    assert data["rdro"]["loss"] == {"name": "kto", "beta": 0.2, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    assert "lora" not in data["rdro"] and "A fine-tune of" in text and "**KTO**" in text


def test_eval_results_become_the_model_index(tmp_path):
    cfg = load_recipe(None, [f"model.name={HUB_BASE}"])
    tasks = {"preference": {"auc": 0.8125, "pair_accuracy": 0.75}, "exact_match": {"accuracy": 0.5},
             "bbh": {"mean_accuracy": 0.25}, "generate": {"prompts": 3}}
    metadata = model_card.training_metadata(cfg, adapter=False, steps=1, alpha=0.5, dataset="ufg")
    model_card.write(tmp_path, metadata, name="run-x", eval_tasks=tasks)
    card = ModelCard.load(tmp_path / "README.md")
    results = [(r.task_name, r.metric_type, r.metric_value, r.dataset_type, r.dataset_split)
               for r in card.data.eval_results]
    ufg = "trl-lib/ultrafeedback-gpt-3.5-turbo-helpfulness"
    assert results == [("Preference on held-out feedback", "roc_auc", 0.8125, ufg, "test"),
                       ("Preference on held-out feedback", "accuracy", 0.75, ufg, "test"),
                       ("Exact match", "exact_match", 0.5, "local", None),
                       ("BIG-Bench Hard", "accuracy", 0.25, "local", None)]
    assert card.data.model_name == "run-x" and "| Preference on held-out feedback | AUC of the log-ratio | 0.8125 |" \
        in card.text


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.slow
def test_train_final_and_merged_cards_end_to_end(cli, tmp_path, tiny_llama):
    source = write_jsonl(tmp_path / "rows.jsonl", systematic_rows(24))
    run = tmp_path / "myrun"
    assert cli("prepare", "--dataset", source, "--model", tiny_llama, "--out", run / "data",
               "--test-fraction", "0.25")[0] == 0
    assert cli("logprobs", "--model", tiny_llama, "--data", run / "data", "--out", run / "logprobs",
               *_sets(["model.dtype=float32"]))[0] == 0
    common = ["model.dtype=float32", "train.max_steps=2", "train.batch_size=4", f"output.dir={run}"]
    lora = ["lora.enabled=true", "lora.r=4", "lora.target_modules=q_proj,v_proj"]
    code, _, err = cli("train", "--model", tiny_llama, *_sets([*common, *lora, "loss.alpha=0.3"]))
    assert code == 0, err
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    data, text = _load(run / "train" / "final")
    assert data["library_name"] == "peft" and "lora" in data["tags"] and "base_model" not in data
    assert data["rdro"]["training"]["steps"] == manifest["counts"]["steps"] == 2
    assert data["rdro"]["loss"]["alpha"] == manifest["alpha"] == 0.3
    assert data["rdro"]["dataset"] == str(source) and data["rdro"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert "# myrun" in text and "Model Card for Model ID" not in text  # not PEFT's empty template

    # an eval of the adapter is the merged model's eval too: it lands in merged/README.md
    code, _, err = cli("eval", "--model", run / "train" / "final", *_sets(["model.dtype=float32", f"output.dir={run}"]))
    assert code == 0, err
    auc = json.loads((run / "eval" / "eval.json").read_text())["tasks"]["preference"]["auc"]
    code, _, err = cli("merge", *_sets([f"output.dir={run}"]))
    assert code == 0, err
    card = ModelCard.load(run / "merged" / "README.md")
    merged = card.data.to_dict()
    assert merged["library_name"] == "transformers" and "merged" in merged["tags"] and "lora" not in merged["tags"]
    assert merged["rdro"]["merged_from"] == str(run / "train" / "final")
    assert merged["rdro"]["loss"]["alpha"] == 0.3 and merged["rdro"]["training"]["steps"] == 2
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("roc_auc", auc)]
    assert "rdro merge --recipe recipe.toml" in card.text and "AutoModelForCausalLM" in card.text

    # a full-weights run: a transformers card, no lora block
    code, _, err = cli("train", "--model", tiny_llama, "--out", run / "train-full", *_sets(common))
    assert code == 0, err
    data, _ = _load(run / "train-full" / "final")
    assert data["library_name"] == "transformers" and "lora" not in data["rdro"] and "lora" not in data["tags"]


def test_merging_a_foreign_adapter_says_what_is_known(cli, tmp_path, tiny_llama):
    from test_merge import make_adapter

    adapter = make_adapter(tiny_llama, tmp_path / "adapter")  # PEFT's own template card, no rdro block
    code, _, err = cli("merge", "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 0, err
    data, text = _load(tmp_path / "merged")
    assert data["library_name"] == "transformers" and data["tags"] == ["rdro-cli", "merged"]
    assert data["rdro"]["merged_from"] == str(adapter) and data["rdro"]["base_model"] == str(tiny_llama)
    assert "carried no rdro model card" in text and "model-index" not in data


def test_every_loss_has_card_metadata_naming_real_recipe_keys():
    from rdro_cli.losses.registry import LOSSES
    from rdro_cli.recipe import LOSS_NAMES, LossSection

    assert set(LOSSES) == set(LOSS_NAMES) and all(spec.display for spec in LOSSES.values())
    for spec in LOSSES.values():
        assert all(hasattr(LossSection(), key) for key in spec.recipe_keys)
