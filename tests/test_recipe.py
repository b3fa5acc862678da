"""Recipe schema: every shipped recipe parses; all problems are reported at once, with where and key."""

from pathlib import Path

import pytest

from rdro_cli.errors import UserError
from rdro_cli.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


def test_there_are_shipped_recipes():
    names = {p.name for p in RECIPES}
    assert {"qwen2.5-7b.toml", "llama3.1-8b.toml", "tiny-cpu.toml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    cfg = load_recipe(path)
    assert isinstance(cfg, Recipe)
    assert cfg.model.name and cfg.data.dataset and cfg.output.dir


def test_reference_implementation_settings():
    for name in ("qwen2.5-7b.toml", "llama3.1-8b.toml"):
        cfg = load_recipe(Path(__file__).parent.parent / "recipes" / name)
        assert cfg.train.learning_rate == 5e-7
        assert cfg.train.batch_size * cfg.train.gradient_accumulation_steps * 8 == 128
        assert (cfg.train.epochs, cfg.train.lr_scheduler, cfg.train.warmup_ratio) == (1, "cosine", 0.1)
        assert (cfg.data.max_length, cfg.data.max_prompt_length) == (1024, 512)


def test_two_misspelt_keys_are_both_reported_with_suggestions(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[loss]\nnmae = "rdro"\n[train]\nlearning_rat = 1e-5\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert len(err.value.problems) == 2
    text = str(err.value)
    assert f"{path}: loss.nmae: unknown key (did you mean loss.name?)" in text
    assert f"{path}: train.learning_rat: unknown key (did you mean train.learning_rate?)" in text


def test_types_ranges_and_choices_all_at_once(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[loss]\nalpha = 1.5\nweighting = "fair"\nname = "ppo"\n[train]\nbatch_size = "8"\n'
                    'shuffle = 1\n[lora]\ntarget_modules = "q_proj"\n[modle]\nname = "x"\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    problems = "\n".join(err.value.problems)
    assert len(err.value.problems) == 6  # target_modules as a comma string is accepted
    assert 'loss.alpha: must be in (0, 1) or "auto"' in problems
    assert "loss.weighting: 'fair' is not one of batch, balanced" in problems
    assert "loss.name: 'ppo' is not one of rdro, ddro, kto, bco, dpo" in problems
    assert "train.batch_size: must be an integer, got '8'" in problems
    assert "train.shuffle: must be true or false, got 1" in problems
    assert "unknown section [modle] (did you mean [model]?)" in problems


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, "half"])
def test_alpha_outside_open_interval_is_rejected(alpha):
    value = f'"{alpha}"' if isinstance(alpha, str) else alpha
    with pytest.raises(RecipeError, match="loss.alpha"):
        load_recipe(None, [f"loss.alpha={value}"])


def test_overrides_set_then_flags_win(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[model]\nname = "a"\n[loss]\nalpha = 0.3\n')
    cfg = load_recipe(path, ["model.name=b", "loss.alpha=0.4", "eval.tasks=preference,bbh"], {"model.name": "c",
                                                                                              "data.limit": None})
    assert cfg.model.name == "c" and cfg.loss.alpha == 0.4 and cfg.eval.tasks == ["preference", "bbh"]
    assert cfg.data.limit == 0  # a flag left at None does not override


def test_cross_field_check_and_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="max_prompt_length: must be < data.max_length"):
        load_recipe(None, ["data.max_length=100", "data.max_prompt_length=100"])
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[loss\nname = 1\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(bad)


def test_round_trip_through_dict_and_toml(tmp_path):
    cfg = load_recipe(None, ["loss.alpha=0.25", "lora.enabled=true", 'model.chat_template="{{ a }}\\n"'])
    assert recipe_from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "saved.toml"
    path.write_text(cfg.to_toml())
    assert load_recipe(path) == cfg


def test_recipes_are_data_only(tmp_path):
    """A recipe is parsed as TOML, never executed: Python in a value stays a string."""
    path = tmp_path / "r.toml"
    marker = tmp_path / "pwned"
    path.write_text(f'[model]\nname = "__import__(\'os\').system(\'touch {marker}\')"\n')
    cfg = load_recipe(path)
    assert cfg.model.name.startswith("__import__") and not marker.exists()
