"""train.report_to through accelerate's trackers: recipe validation, the train.tensorboard alias, a missing
package in one line, and TensorBoard end to end (the event files read back equal metrics.jsonl)."""

from __future__ import annotations

import json

import pytest
from conftest import systematic_rows, write_jsonl

from rdro_cli.errors import UserError
from rdro_cli.recipe import TRACKERS, RecipeError, load_recipe, recipe_from_dict
from rdro_cli.training import tracking

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tracker_names_are_accelerates():
    from accelerate.utils import LoggerType

    assert set(TRACKERS) == {t.value for t in LoggerType} - {"all"}


def test_unknown_tracker_is_refused_at_validation(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\nreport_to = ["tensorboard", "tensorbord"]\n')
    code, stdout, stderr = cli("validate", recipe)
    assert code == 2 and stdout == ""
    assert stderr.strip() == f"error: {recipe}: train.report_to: 'tensorbord' is not one of {', '.join(TRACKERS)}"
    assert load_recipe(None, ["train.report_to=wandb,mlflow"]).train.report_to == ["wandb", "mlflow"]


def test_train_tensorboard_is_an_alias_with_a_deprecation_line(capsys, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\ntensorboard = true\n")
    cfg = load_recipe(recipe)
    assert cfg.train.report_to == ["tensorboard"]
    assert capsys.readouterr().err.strip() == (f'{recipe}: train.tensorboard is deprecated; write train.report_to '
                                                f'= ["tensorboard"] instead (it is read as that for now)')
    assert load_recipe(None, ["train.tensorboard=true", "train.report_to=tensorboard"]).train.report_to == \
        ["tensorboard"]
    assert load_recipe(None, ["train.tensorboard=false"]).train.report_to == []
    assert "tensorboard" not in cfg.to_dict()["train"]  # manifests carry the new key only
    assert recipe_from_dict(cfg.to_dict()).train.report_to == ["tensorboard"]
    with pytest.raises(RecipeError, match="train.tensorboard: must be true or false"):
        load_recipe(None, ['train.tensorboard="yes"'])


def test_a_tracker_without_its_package_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(tracking, "_available", lambda: {"tensorboard"})
    cfg = load_recipe(None, ["train.report_to=tensorboard,comet_ml,wandb"])
    with pytest.raises(UserError) as err:
        tracking.accelerator_kwargs(cfg, tmp_path)
    assert str(err.value) == ("train.report_to: comet_ml, wandb needs its package: pip install comet-ml wandb "
                              "(or remove it from train.report_to)")
    assert tracking.accelerator_kwargs(load_recipe(), tmp_path) == {}


def test_hyperparameters_are_flat_scalars():
    flat = tracking.hyperparameters(load_recipe(None, ["loss.alpha=0.25", "eval.tasks=preference,generate"]))
    assert flat["loss.alpha"] == 0.25 and flat["eval.tasks"] == "preference,generate"
    assert flat["train.report_to"] == "" and flat["lora.enabled"] is False
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_tensorboard_event_files_hold_every_logged_step(cli, tmp_path, tiny_llama):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    source = write_jsonl(tmp_path / "rows.jsonl", systematic_rows(24))
    assert cli("prepare", "--dataset", source, "--model", tiny_llama, "--out", tmp_path / "data",
               "--test-fraction", "0.25")[0] == 0
    assert cli("logprobs", "--model", tiny_llama, "--data", tmp_path / "data", "--out", tmp_path / "logprobs",
               "--set", "model.dtype=float32")[0] == 0
    sets = ["model.dtype=float32", "train.max_steps=4", "train.batch_size=4", "train.learning_rate=1e-3",
            "train.report_to=tensorboard", "train.log_every=2"]
    code, _, err = cli("train", "--model", tiny_llama, "--data", tmp_path / "data", "--logprobs",
                       tmp_path / "logprobs", "--out", tmp_path / "train", *[a for s in sets for a in ("--set", s)])
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]

    events = EventAccumulator(str(tmp_path / "train" / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/frac_at_bound"} <= set(scalars)
    for name in ("loss", "lr", "grad_norm", "logratio_preferred", "bound"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
        assert [s for s, _ in logged] == [2, 4], name
        assert [v for _, v in logged] == pytest.approx([r[name] for r in rows], rel=1e-6), name
    # the resolved recipe is the run's hyper-parameter table (accelerate writes it next to the events)
    hparams = list((tmp_path / "train" / "tb").glob("*/hparams.yml"))
    assert len(hparams) == 1 and "train.report_to: tensorboard" in hparams[0].read_text()
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert manifest["config"]["train"]["report_to"] == ["tensorboard"]
