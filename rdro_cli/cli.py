"""The `rdro` command line: one thin command per stage.

Each command only turns flags into a resolved recipe (recipe file < --set < explicit flags) and calls
`run(cfg, ...)` in the stage's own module. Errors a user can cause print one line and exit 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from rdro_cli.errors import UserError

app = typer.Typer(
    name="rdro",
    help="Align language models with binary feedback (RDRO and baselines). "
         "Stages: prepare -> logprobs -> train -> merge -> eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RecipeOpt = typer.Option(None, "--recipe", "-r", help="TOML recipe file (see recipes/).", exists=False)
SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe value: section.key=value (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Recompute even if the output exists with matching inputs.")


def _fail(message: str, code: int) -> None:
    from rich.markup import escape

    from rdro_cli.progress import console

    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _invoke(stage: str, recipe: Path | None, sets: list[str] | None, flags: dict[str, Any],
            call: Callable[[Any, Any], Any]) -> None:
    """Loads the recipe and the stage module, runs it, maps errors to exit codes."""
    from rdro_cli.recipe import load_recipe

    try:
        cfg = load_recipe(recipe, sets or [], flags)
        try:
            module = importlib.import_module(f"rdro_cli.{stage}")
        except ModuleNotFoundError as err:
            if err.name == f"rdro_cli.{stage}":
                _fail(f"rdro {stage}: not implemented yet", 1)
            raise
        result = call(module, cfg)
    except UserError as err:
        _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        from rdro_cli.progress import console

        console.print(f"rdro {stage}: interrupted")
        raise typer.Exit(130) from None
    except Exception as err:  # disk full anywhere a stage did not wrap: still one line, no traceback
        from rdro_cli import diskspace

        if not diskspace.is_disk_full(err):
            raise
        _fail(diskspace.message(diskspace.path_of(err) or Path.cwd(), err, None), 2)
    finally:
        from rdro_cli.artifacts import release_locks

        release_locks()
    if result is not None:
        print(result)


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe file to check."),
    sets: list[str] = SetOpt,
) -> None:
    """Check a recipe (all problems at once) and print the resolved config as TOML."""
    from rdro_cli.recipe import load_recipe

    try:
        cfg = load_recipe(recipe, sets or [])
    except UserError as err:
        _fail(str(err), err.exit_code)
    print(cfg.to_toml())
    print(f"{recipe}: ok", file=sys.stderr)


@app.command()
def prepare(
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
    dataset: str = typer.Option(None, "--dataset", "-d",
                                help="mix14k, ufg, demo, a hub id, or a local .jsonl/.json/.parquet/.csv file "
                                     "or save_to_disk dir (data.dataset)."),
    model: str = typer.Option(None, "--model", "-m", help="Model whose tokenizer and chat template to use "
                                                          "(model.name)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: <output.dir>/data)."),
    max_length: int = typer.Option(None, help="Max prompt+completion tokens (data.max_length)."),
    max_prompt_length: int = typer.Option(None, help="Max prompt tokens; prompts keep their end "
                                                     "(data.max_prompt_length)."),
    test_fraction: float = typer.Option(None, help="Held-out fraction when the source has no test split "
                                                   "(data.test_fraction, default 0.05)."),
    limit: int = typer.Option(None, help="Keep at most N rows per split (data.limit)."),
    chat_template: str = typer.Option(None, help="Chat template file for tokenizers without one "
                                                 "(model.chat_template)."),
    force: bool = ForceOpt,
) -> None:
    """Tokenise a feedback dataset with an exact prompt/completion boundary -> <run>/data."""
    flags = {"data.dataset": dataset, "model.name": model, "data.max_length": max_length,
             "data.max_prompt_length": max_prompt_length, "data.test_fraction": test_fraction,
             "data.limit": limit, "model.chat_template": chat_template}
    _invoke("prepare", recipe, sets, flags, lambda m, cfg: m.run(cfg, out=out, force=force))


@app.command()
def logprobs(
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
    data: Path = typer.Option(None, "--data", help="prepare output (default: <output.dir>/data)."),
    model: str = typer.Option(None, "--model", "-m", help="Reference model (model.ref_name; default model.name)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: <output.dir>/logprobs)."),
    max_tokens_per_batch: int = typer.Option(None, help="Token budget per batch "
                                                        "(logprobs.max_tokens_per_batch)."),
    force: bool = ForceOpt,
) -> None:
    """Reference log-probs of every completion, once, in bulk -> <run>/logprobs."""
    flags = {"model.ref_name": model, "logprobs.max_tokens_per_batch": max_tokens_per_batch}
    _invoke("logprobs", recipe, sets, flags, lambda m, cfg: m.run(cfg, data=data, out=out, force=force))


@app.command()
def train(
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
    data: Path = typer.Option(None, "--data", help="prepare output (default: <output.dir>/data)."),
    logprobs_dir: Path = typer.Option(None, "--logprobs", help="logprobs output "
                                                               "(default: <output.dir>/logprobs)."),
    model: str = typer.Option(None, "--model", "-m", help="Policy initialisation (model.name)."),
    loss: str = typer.Option(None, "--loss", help="rdro, ddro, kto, bco or dpo (loss.name)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: <output.dir>/train)."),
    max_steps: int = typer.Option(None, help="Stop after N optimizer steps (train.max_steps)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint."),
    force: bool = ForceOpt,
) -> None:
    """Train the policy (only the policy is on the accelerator) -> <run>/train."""
    flags = {"model.name": model, "loss.name": loss, "train.max_steps": max_steps}
    _invoke("train", recipe, sets, flags,
            lambda m, cfg: m.run(cfg, data=data, logprobs=logprobs_dir, out=out, resume=resume, force=force))


@app.command()
def merge(
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
    adapter: Path = typer.Option(None, "--adapter", help="LoRA adapter dir (default: <output.dir>/train/final)."),
    base: str = typer.Option(None, "--base", help="Base model (default: the adapter's base, model.name)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: <output.dir>/merged)."),
    force: bool = ForceOpt,
) -> None:
    """Fold a LoRA adapter into its base model -> a plain transformers checkpoint."""
    _invoke("merge", recipe, sets, {"model.name": base},
            lambda m, cfg: m.run(cfg, adapter=adapter, out=out, force=force))


@app.command("eval")
def eval_(
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
    model: str = typer.Option(None, "--model", "-m", help="Model dir to evaluate (eval.model)."),
    tasks: str = typer.Option(None, "--tasks", help="Comma list: preference, generate, exact_match, bbh "
                                                    "(eval.tasks)."),
    data: Path = typer.Option(None, "--data", help="prepare output (default: <output.dir>/data)."),
    logprobs_dir: Path = typer.Option(None, "--logprobs", help="logprobs output "
                                                               "(default: <output.dir>/logprobs)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: <output.dir>/eval)."),
    limit: int = typer.Option(None, "--limit", help="At most N examples per task (eval.limit)."),
    force: bool = ForceOpt,
) -> None:
    """Evaluate a model: preference AUC, generations, exact match, BBH -> <run>/eval/eval.json."""
    flags = {"eval.model": model, "eval.tasks": tasks, "eval.limit": limit}
    _invoke("eval", recipe, sets, flags,
            lambda m, cfg: m.run(cfg, data=data, logprobs=logprobs_dir, out=out, force=force))


@app.command()
def report(
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
    run_dirs: list[Path] = typer.Option(None, "--run", help="Run directory (repeatable: runs overlay in "
                                                             "every plot; default: output.dir)."),
    baseline: Path = typer.Option(None, "--baseline", help="Eval dir of the model before training, shown as "
                                                           "'before' for every run (default: <run>/eval-base "
                                                           "when it exists)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: <first run>/report)."),
) -> None:
    """PNG plots and a one-page report.md from train metrics and eval artifacts -> <run>/report.

    Needs the optional extra: pip install 'rdro-cli[report]'. Before/after: write the base model's eval
    with `rdro eval --model <base> --out <run>/eval-base`, or pass any eval dir as --baseline.
    """
    _invoke("report", recipe, sets, {},
            lambda m, cfg: m.run(cfg, runs=run_dirs or None, out=out, baseline=baseline))


@app.command()
def verify(run_dir: Path = typer.Argument(..., help="A run directory (or one stage's directory).")) -> None:
    """Check every artifact of a run (and each training checkpoint) against its recorded digests.

    Prints a table of stages and their status; exits 0 only if everything is intact, 1 if not.
    """
    _invoke("verify", None, None, {}, lambda m, cfg: m.run(run_dir))


def main() -> None:  # pragma: no cover - console entry for `python -m rdro_cli`
    app()
