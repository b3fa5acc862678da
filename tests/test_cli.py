"""Import smoke test for every module, and the command line's conventions: help with examples and
unmangled texts at any width, on/off flags, --version, --recipe everywhere, stdout only for the path."""

import importlib
import pkgutil
import re
import sys
from pathlib import Path

import pytest
import typer

import rdro_cli
from rdro_cli.cli import app

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["validate", "prepare", "logprobs", "train", "merge", "eval", "report", "verify"]
BOX = "│╭╮╰╯─"


def test_every_module_imports():
    names = [m.name.removeprefix("rdro_cli.") for m in pkgutil.walk_packages(rdro_cli.__path__, "rdro_cli.")]
    assert {"cli", "recipe", "store.manifests", "lm.completion_head", "losses", "prepare"} <= set(names)
    for name in names:
        if name == "__main__":  # running it would start the CLI
            continue
        importlib.import_module(f"rdro_cli.{name}")


def _help(cli, monkeypatch, command: str | None, columns: int) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    code, stdout, _ = cli(*([command] if command else []), "--help")
    assert code == 0
    return stdout


def _flat(text: str) -> str:
    """Help output without box drawing and whitespace (narrow columns fold long words anywhere)."""
    return "".join(text.translate({ord(c): " " for c in BOX}).split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_flag(cli, command):
    code, stdout, _ = cli(command, "--help")
    assert code == 0
    for line in stdout.splitlines():
        if line.strip().startswith("│ --") and "--help" not in line:
            flag_and_type = line.strip("│ ").split()
            assert len(flag_and_type) >= 3, f"{command}: flag without help: {line}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_prints_every_text_whole_and_examples_at_80_and_200_columns(cli, monkeypatch, command):
    group = typer.main.get_command(app)
    click_command = group if command is None else group.commands[command]
    texts = [" ".join(p.split()) for p in (click_command.help or "").split("\n\n")]
    texts += [" ".join(p.help.split()) for p in click_command.params if getattr(p, "help", None)]
    examples = [line[2:] for line in click_command.epilog.splitlines() if line.startswith("$ ")]
    assert examples, f"{command}: no example in the help"
    for columns in (80, 200):
        out = _help(cli, monkeypatch, command, columns)
        flat = _flat(out)
        for text in texts:  # rich markup such as [report] would vanish from the rendered text
            assert _flat(text.replace("\\[", "[")) in flat, f"{command} at {columns} columns lost: {text}"
        lines = [line.strip() for line in out.splitlines()]
        for example in examples:  # one whole line, never wrapped: it can be copied into a shell
            assert f"$ {example}" in lines, f"{command} at {columns} columns: example wrapped: {example}"
        assert "<bool>" not in out, f"{command}: an on/off flag shows a <bool> type"


def test_report_help_shows_the_install_extra(cli, monkeypatch):
    assert "pipinstall'rdro-cli[report]'" in _flat(_help(cli, monkeypatch, "report", 80))


def test_examples_name_real_recipes_and_commands():
    group = typer.main.get_command(app)
    for name, command in [("rdro", group), *group.commands.items()]:
        for line in command.epilog.splitlines():
            if line.startswith("$ "):
                assert len(line) <= 76, f"{name}: example longer than 76 characters: {line}"
                for recipe in re.findall(r"recipes/[\w.-]+\.toml", line):
                    assert (REPO / recipe).is_file(), f"{name}: example names a missing recipe {recipe}"
                subcommands = re.findall(r"(?:^|[\s(])rdro\)? (\S+)", line)  # also `$(which rdro) train`
                assert subcommands and set(subcommands) <= {*COMMANDS, "--help"}, line


def test_on_off_flags_take_no_value(cli):
    code, _, stderr = cli("train", "--force", "true")
    assert code == 2 and "unexpected extra argument" in stderr
    code, _, stderr = cli("train", "--resume", "--force", "--set", "loss.alpah=0.5")  # parsed as flags
    assert code == 2 and "loss.alpah: unknown key" in stderr


def test_version_is_the_package_version(cli):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert rdro_cli.__version__ == version
    code, stdout, _ = cli("--version")
    assert code == 0 and stdout == f"rdro {version}\n"


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


def test_validate_takes_the_recipe_as_an_option_too(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[loss]\nname = "kto"\n')
    positional = cli("validate", recipe)
    assert positional[0] == 0
    assert cli("validate", "--recipe", recipe)[:2] == positional[:2]
    assert cli("validate", "-r", recipe, recipe)[:2] == positional[:2]  # the same file twice is fine
    code, stdout, stderr = cli("validate")
    assert code == 2 and stdout == "" and stderr.strip() == "error: no recipe given: rdro validate RECIPE " \
                                                           "(or --recipe RECIPE)"
    other = tmp_path / "other.toml"
    other.write_text("")
    code, _, stderr = cli("validate", recipe, "--recipe", other)
    assert code == 2 and "two recipes given" in stderr and len(stderr.strip().splitlines()) == 1


def test_every_command_accepts_recipe(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[loss]\nalpah = 0.5\n")  # every command must read it and refuse the typo
    for command in COMMANDS:
        code, _, stderr = cli(command, "--recipe", recipe)
        assert code == 2 and "loss.alpah: unknown key" in stderr, command


def test_stage_prints_reach_stderr_and_stdout_holds_only_the_path(cli, monkeypatch, tmp_path):
    from rdro_cli import logprobs

    def noisy_run(cfg, **kwargs):
        print("logprobs: wrote train.safetensors")  # as stages and libraries do
        sys.stdout.write("more noise\n")
        return tmp_path / "logprobs"

    monkeypatch.setattr(logprobs, "run", noisy_run)
    code, stdout, stderr = cli("logprobs", "--data", tmp_path)
    assert code == 0
    assert stdout == f"{tmp_path / 'logprobs'}\n"
    assert "logprobs: wrote train.safetensors" in stderr and "more noise" in stderr
