"""Every registered loss, walked through what reads its registry entry: `rdro validate`, a tiny `train`, the
model card and `rdro report`. Each must show that loss's own keys and no other loss's (before the registry,
the report's beta column showed "–" for pro, kldo and bpo, which all have a beta)."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, systematic_rows, write_jsonl
from huggingface_hub import ModelCard

from rdro_cli.losses import state as loss_state
from rdro_cli.losses.registry import LOSSES, NAMES
from rdro_cli.recipe import LOSS_NAMES, LossSection

pytestmark = pytest.mark.usefixtures("one_thread")
TABLE = ["run", "directory", "loss", "alpha", "weighting", "beta"]  # the first columns of report.md's table


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_llama):
    """Unpaired data with KTO's mismatched-pair log-probs, and paired data, both of the tiny Llama."""
    from typer.testing import CliRunner

    from rdro_cli.cli import app

    root = tmp_path_factory.mktemp("registry")
    sources = {"unpaired": write_jsonl(root / "rows.jsonl", systematic_rows(24)),
               "paired": FIXTURES / "paired_sample.jsonl"}
    for shape, source in sources.items():
        for args in (["prepare", "--dataset", source, "--out", root / shape / "data", "--test-fraction", "0.2"],
                     ["logprobs", "--data", root / shape / "data", "--out", root / shape / "logprobs", "--set",
                      "loss.name=kto", "--set", "model.dtype=float32"]):
            result = CliRunner().invoke(app, [str(a) for a in [*args, "--model", tiny_llama]], catch_exceptions=False)
            assert result.exit_code == 0, result.output
    return root


def test_the_registry_is_the_recipe_s_list_and_names_real_keys_and_states():
    assert LOSS_NAMES == NAMES == tuple(LOSSES)
    for name, spec in LOSSES.items():
        assert spec.display and callable(spec.fn), name
        assert all(hasattr(LossSection(), key) for key in spec.recipe_keys), name
        assert not spec.state or spec.state in loss_state.STATES, name


@pytest.mark.parametrize("name", NAMES)
def test_each_loss_shows_its_own_keys_from_validate_to_report(cli, artifacts, tiny_llama, tmp_path, name):
    spec = LOSSES[name]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[loss]\nname = "{name}"\n')
    code, stdout, stderr = cli("validate", recipe)
    assert code == 0 and f'name = "{name}"' in stdout, stderr

    shape = spec.data_shape
    run = tmp_path / "run"
    code, _, stderr = cli("train", "--data", artifacts / shape / "data", "--logprobs", artifacts / shape / "logprobs",
                          "--model", tiny_llama, "--out", run / "train", "--loss", name, "--max-steps", "2",
                          "--set", "lora.enabled=true", "--set", "train.batch_size=4",
                          "--set", "model.dtype=float32")
    assert code == 0, stderr

    card = ModelCard.load(run / "train" / "final" / "README.md")
    block = card.data.to_dict()["rdro"]["loss"]
    expected = {"name", *spec.recipe_keys, *(["alpha_setting"] if spec.resolved_alpha else [])}
    assert set(block) == expected, (name, block)
    config = json.loads((run / "train" / "manifest.json").read_text())["config"]["loss"]
    for key in spec.recipe_keys:
        if key != "alpha":  # recorded as resolved
            assert block[key] == config[key], (name, key)
    assert f"**{spec.display}**" in card.text

    code, _, stderr = cli("report", "--run", run, "--out", tmp_path / "report")
    assert code == 0, stderr
    report = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| ") and f"| {run} |" in line)
    cells = dict(zip(TABLE, [c.strip() for c in row.strip("|").split("|")], strict=False))
    assert cells["loss"] == name
    for column in ("alpha", "weighting", "beta"):
        if column in spec.recipe_keys:
            assert cells[column] not in ("", "–"), (name, column, cells)
            if column == "beta":
                assert float(cells[column]) == config["beta"]
        else:
            assert cells[column] == "–", (name, column, cells)
