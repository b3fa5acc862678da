"""Import smoke test for every module, and --help on every command."""

import importlib
import pkgutil

import pytest

import rdro_cli

COMMANDS = ["validate", "prepare", "logprobs", "train", "merge", "eval"]


def test_every_module_imports():
    names = [m.name for m in pkgutil.iter_modules(rdro_cli.__path__)]
    assert {"cli", "recipe", "artifacts", "modeling", "losses", "prepare"} <= set(names)
    for name in names:
        if name == "__main__":  # running it would start the CLI
            continue
        importlib.import_module(f"rdro_cli.{name}")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_flag(cli, command):
    code, stdout, _ = cli(command, "--help")
    assert code == 0
    for line in stdout.splitlines():
        if line.strip().startswith("│ --") and "--help" not in line:
            flag_and_type = line.strip("│ ").split()
            assert len(flag_and_type) >= 3, f"{command}: flag without help: {line}"


def test_bad_override_exits_2_without_traceback(cli):
    code, _, stderr = cli("prepare", "--set", "loss.alpah=0.5", "--set", "train.epochs=-1")
    assert code == 2
    assert "loss.alpah: unknown key (did you mean loss.alpha?)" in stderr
    assert "train.epochs: must be > 0" in stderr
    assert "Traceback" not in stderr


def test_validate_prints_resolved_config(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[loss]\nname = "kto"\n')
    code, stdout, stderr = cli("validate", recipe, "--set", "loss.beta=0.2")
    assert code == 0 and 'name = "kto"' in stdout and "beta = 0.2" in stdout and "ok" in stderr
