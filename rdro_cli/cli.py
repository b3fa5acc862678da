"""The `rdro` command line: one thin command per stage.

Each command only turns flags into a resolved recipe (recipe file < --set < explicit flags) and calls
`run(cfg, ...)` in the stage's own module. Errors a user can cause print one line and exit 2.

Conventions: stdout carries only what a script captures (the artifact path a stage returns, the
resolved TOML of `validate`, the version); everything else (progress, "wrote ...", warnings) goes to
stderr. Under `accelerate launch` / torchrun / MPI only the main process (global rank 0) writes stdout, so
`DATA=$(accelerate launch rdro ...)` captures the path once. A stdout that cannot be written is not a
traceback: on a full device (or any other write error) one line `error: cannot write to stdout (...)` and
exit 2; on a pipe whose reader has gone (`rdro validate r.toml | head -0`) nothing is printed and the exit
status is 141, what a shell reports for `cat` killed by SIGPIPE there. Ctrl-C is one line `rdro <stage>:
interrupted` and exit 130. Every command's help ends with examples; help texts are escaped, so `[report]`
in an install hint is printed and not taken for rich markup.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import typer.core
from rich.markup import escape

from rdro_cli import __version__
from rdro_cli.errors import UserError
from rdro_cli.recipe import field_help


class _FlagHelp:
    """On/off flags show no `<bool>` type in help, which would invite `--force true` (an error)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            _hide_bool_type(param)

    def get_help_option(self, ctx):
        return _hide_bool_type(super().get_help_option(ctx))

    def format_help(self, ctx, formatter):
        try:  # typer's rich help is written to stdout right here
            return super().format_help(ctx, formatter)
        except OSError as err:
            raise typer.Exit(_stdout_failed(err)) from None
        except SystemExit:  # rich's own answer to a closed pipe (Console.on_broken_pipe): exit 1
            raise typer.Exit(_stdout_failed(BrokenPipeError(errno.EPIPE, "Broken pipe"))) from None


class _Command(_FlagHelp, typer.core.TyperCommand):
    pass


class _Group(_FlagHelp, typer.core.TyperGroup):
    pass


def _hide_bool_type(param):
    if getattr(param, "is_bool_flag", False) and param.metavar is None:
        param.metavar = ""  # typer shows the metavar instead of the type; empty shows nothing
    return param


def _stdout_failed(err: OSError) -> int:
    """The exit code for a stdout that cannot be written, after saying so (on stderr) where that helps.

    fd 1 is pointed at /dev/null first, so the interpreter's last flush at exit finds nowhere to fail."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    if isinstance(err, BrokenPipeError) or err.errno == errno.EPIPE:
        return 141  # the reader is gone: quietly, as `cat` in the same place (128 + SIGPIPE)
    from rdro_cli.progress import console

    reason = err.strerror or str(err)
    console.print(f"[bold red]error:[/] cannot write to stdout ({escape(reason)}); send it to a file or device "
                  f"with room (or to /dev/null)", soft_wrap=True, highlight=False)
    return 2


def _flush_stdout() -> int | None:
    try:
        sys.stdout.flush()
    except OSError as err:
        return _stdout_failed(err)
    return None


def _is_main_process() -> bool:
    """Rank 0 of a distributed launch (or not launched so). The launchers' environment decides, as accelerate's
    PartialState does, without starting a process group; one already started has the last word."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        with contextlib.suppress(ValueError):
            rank = int(os.environ.get(key, "-1"))
            if rank >= 0:
                return rank == 0
    return True


def _emit(text: str, *, every_process: bool = False) -> None:
    """What a script captures (an artifact path, the resolved TOML): printed once, by the main process."""
    if not every_process and not _is_main_process():
        return
    try:
        print(text, flush=True)
    except OSError as err:
        raise typer.Exit(_stdout_failed(err)) from None


class _App(typer.Typer):
    """`rdro` itself: a stdout that fails on the interpreter's final flush is one line too, not a traceback."""

    def __call__(self, *args, **kwargs):
        try:
            result = super().__call__(*args, **kwargs)
        except SystemExit as exit:
            code = _flush_stdout()
            if code is not None and not exit.code:
                raise SystemExit(code) from None
            raise
        code = _flush_stdout()
        if code is not None:
            raise SystemExit(code)
        return result


app = _App(
    name="rdro",
    cls=_Group,
    help="Align language models with binary feedback (RDRO and baselines). "
         "Stages: prepare -> logprobs -> train -> merge -> eval -> report.",
    epilog="Examples:\n\n$ rdro validate recipes/tiny-cpu.toml\n$ rdro prepare --help",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        _emit(f"rdro {__version__}", every_process=True)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def _command(name: str | None = None, *, examples: list[str]):
    """`app.command` with the docstring escaped for rich and `examples` (shell lines) as the epilog.

    Typer strips the indentation of help texts, so each example is one line starting with `$ `; they stay
    under 76 characters so that an 80-column terminal does not wrap them (tests/test_cli.py checks).
    """
    def register(function):
        # one line per paragraph: rich keeps a docstring's line breaks, which then break mid-sentence
        paragraphs = inspect.cleandoc(function.__doc__ or "").split("\n\n")
        doc = escape("\n\n".join(" ".join(p.split()) for p in paragraphs))
        epilog = "Examples:\n\n" + "\n".join(f"$ {escape(line)}" for line in examples)
        return app.command(name, cls=_Command, help=doc, epilog=epilog)(function)
    return register


def _about(key: str, lead: str = "") -> str:
    """A flag's help: what the flag is to this command (when the recipe's words need it), then the recipe
    field's own documentation and its key, so the two never disagree."""
    section, name = key.split(".")
    text = f"{lead}{field_help(section, name)}"
    return f"{text[0].upper()}{text[1:]} (sets {key})."


RecipeOpt = typer.Option(None, "--recipe", "-r", help="TOML recipe file (see recipes/).", exists=False)
SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe value: section.key=value (repeatable).")
# Plain on/off flags: no recipe key sets them, so a --no-force form would have nothing to switch off.
ForceOpt = typer.Option(False, "--force", help="Recompute even if the output exists with matching inputs.")


def _fail(message: str, code: int) -> None:
    from rich.markup import escape

    from rdro_cli.progress import console

    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _causes(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _interrupted(stage: str) -> None:
    from rdro_cli.progress import console

    console.print(f"rdro {stage}: interrupted")
    raise typer.Exit(130)


def _check_paths(paths: dict[str, Any]) -> None:
    """Path flags (--out, --data, ...) that no filesystem could hold: refused before anything is written."""
    from rdro_cli.recipe import path_problem

    for flag, value in paths.items():
        for item in value if isinstance(value, list) else [value]:
            problem = path_problem(item) if item is not None else None
            if problem:
                raise UserError(f"{flag}: {problem}")


def _invoke(stage: str, recipe: Path | None, sets: list[str] | None, flags: dict[str, Any],
            call: Callable[[Any, Any], Any], paths: dict[str, Any] | None = None) -> None:
    """Loads the recipe and the stage module, runs it, maps errors to exit codes."""
    from rdro_cli.recipe import load_recipe

    try:
        cfg = load_recipe(recipe, sets or [], flags)
        _check_paths(paths or {})
        try:
            module = importlib.import_module(f"rdro_cli.{stage}")
        except ModuleNotFoundError as err:
            if err.name == f"rdro_cli.{stage}":
                _fail(f"rdro {stage}: not implemented yet", 1)
            raise
        # stdout is for the returned path only: a stage's own prints (and any library's) go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = call(module, cfg)
    except UserError as err:
        _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        _interrupted(stage)
    except Exception as err:  # disk full, a name too long anywhere a stage did not wrap: one line, no traceback
        from rdro_cli.store import diskspace

        causes = list(_causes(err))
        if any(isinstance(cause, KeyboardInterrupt) for cause in causes):
            # raised while Ctrl-C unwound (datasets' map waits on its workers' results in a `finally`)
            _interrupted(stage)
        too_long = next((c for c in causes if isinstance(c, OSError) and c.errno == errno.ENAMETOOLONG), None)
        if too_long is not None:
            _fail(f"{too_long.filename or 'a path'}: a name in this path is longer than the filesystem allows "
                  f"(over 255 bytes, or the path over 4095); use a shorter path", 2)
        if not diskspace.is_disk_full(err):
            raise
        _fail(diskspace.message(diskspace.path_of(err) or Path.cwd(), err, None), 2)
    finally:
        from rdro_cli.store.locks import release_locks

        release_locks()
    if result is not None:
        _emit(str(result))


@_command(examples=["rdro validate recipes/tiny-cpu.toml",
                    "rdro validate --recipe recipes/qwen2.5-7b.toml --set loss.alpha=0.4"])
def validate(
    recipe_arg: Path = typer.Argument(None, metavar="RECIPE", show_default=False,
                                      help="Recipe file to check (or --recipe)."),
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
) -> None:
    """Check a recipe (all problems at once) and print the resolved config as TOML."""
    from rdro_cli.recipe import load_recipe

    try:
        if recipe_arg is not None and recipe is not None and recipe_arg != recipe:
            raise UserError(f"two recipes given ({recipe_arg} and --recipe {recipe}); pass one")
        recipe = recipe or recipe_arg
        if recipe is None:
            raise UserError("no recipe given: rdro validate RECIPE (or --recipe RECIPE)")
        cfg = load_recipe(recipe, sets or [])
    except UserError as err:
        _fail(str(err), err.exit_code)
    _emit(cfg.to_toml())
    print(f"{recipe}: ok", file=sys.stderr)


@_command(examples=['DATA=$(rdro prepare --recipe recipes/tiny-cpu.toml)',
                   'rdro prepare -d rows.jsonl -m Qwen/Qwen2.5-0.5B-Instruct -o runs/x/data'])
def prepare(
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
    dataset: str = typer.Option(None, "--dataset", "-d",
                                help=_about("data.dataset")),
    model: str = typer.Option(None, "--model", "-m", help=_about("model.name", "the model whose tokenizer and chat template prepare uses; ")),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: <output.dir>/data)."),
    max_length: int = typer.Option(None, help=_about("data.max_length")),
    max_prompt_length: int = typer.Option(None, help=_about("data.max_prompt_length")),
    test_fraction: float = typer.Option(None, help=_about("data.test_fraction")),
    limit: int = typer.Option(None, help=_about("data.limit")),
    chat_template: str = typer.Option(None, help=_about("model.chat_template")),
    force: bool = ForceOpt,
) -> None:
    """Tokenise a feedback dataset with an exact prompt/completion boundary -> <run>/data."""
    flags = {"data.dataset": dataset, "model.name": model, "data.max_length": max_length,
             "data.max_prompt_length": max_prompt_length, "data.test_fraction": test_fraction,
             "data.limit": limit, "model.chat_template": chat_template}
    _invoke("prepare", recipe, sets, flags, lambda m, cfg: m.run(cfg, out=out, force=force), {"--out": out})


@_command(examples=['rdro logprobs --recipe recipes/tiny-cpu.toml',
                   'rdro logprobs --data runs/x/data --model Qwen/Qwen2.5-0.5B-Instruct'])
def logprobs(
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
    data: Path = typer.Option(None, "--data", help="prepare output (default: <output.dir>/data)."),
    model: str = typer.Option(None, "--model", "-m", help=_about("model.ref_name")),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: <output.dir>/logprobs)."),
    max_tokens_per_batch: int = typer.Option(None, help=_about("logprobs.max_tokens_per_batch")),
    force: bool = ForceOpt,
) -> None:
    """Reference log-probs of every completion, once, in bulk -> <run>/logprobs."""
    flags = {"model.ref_name": model, "logprobs.max_tokens_per_batch": max_tokens_per_batch}
    _invoke("logprobs", recipe, sets, flags, lambda m, cfg: m.run(cfg, data=data, out=out, force=force),
            {"--data": data, "--out": out})


@_command(examples=['rdro train --recipe recipes/tiny-cpu.toml --set train.max_steps=4',
                   'accelerate launch $(which rdro) train -r recipes/qwen2.5-7b.toml',
                   'rdro train --recipe recipes/tiny-cpu.toml --resume'])
def train(
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
    data: Path = typer.Option(None, "--data", help="prepare output (default: <output.dir>/data)."),
    logprobs_dir: Path = typer.Option(None, "--logprobs", help="logprobs output "
                                                               "(default: <output.dir>/logprobs)."),
    model: str = typer.Option(None, "--model", "-m", help=_about("model.name")),
    loss: str = typer.Option(None, "--loss", help=_about("loss.name")),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: <output.dir>/train)."),
    max_steps: int = typer.Option(None, help=_about("train.max_steps")),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint."),
    force: bool = ForceOpt,
) -> None:
    """Train the policy (only the policy is on the accelerator) -> <run>/train."""
    flags = {"model.name": model, "loss.name": loss, "train.max_steps": max_steps}
    _invoke("train", recipe, sets, flags,
            lambda m, cfg: m.run(cfg, data=data, logprobs=logprobs_dir, out=out, resume=resume, force=force),
            {"--data": data, "--logprobs": logprobs_dir, "--out": out})


@_command(examples=['rdro merge --recipe recipes/smollm2-135m-demo.toml',
                   'rdro merge --adapter runs/x/train/final --out runs/x/merged'])
def merge(
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
    adapter: Path = typer.Option(None, "--adapter", help="LoRA adapter dir (default: <output.dir>/train/final)."),
    base: str = typer.Option(None, "--base", help=_about("model.name", "the base model to merge into (default: the base the adapter records); ")),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: <output.dir>/merged)."),
    force: bool = ForceOpt,
) -> None:
    """Fold a LoRA adapter into its base model -> a plain transformers checkpoint."""
    _invoke("merge", recipe, sets, {"model.name": base},
            lambda m, cfg: m.run(cfg, adapter=adapter, out=out, force=force), {"--adapter": adapter, "--out": out})


@_command("eval", examples=['rdro eval --recipe recipes/tiny-cpu.toml',
                           'rdro eval --model runs/x/merged --tasks preference,generate'])
def eval_(
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
    model: str = typer.Option(None, "--model", "-m", help=_about("eval.model")),
    tasks: str = typer.Option(None, "--tasks", help=_about("eval.tasks", "a comma list of ")),
    data: Path = typer.Option(None, "--data", help="prepare output (default: <output.dir>/data)."),
    logprobs_dir: Path = typer.Option(None, "--logprobs", help="logprobs output "
                                                               "(default: <output.dir>/logprobs)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: <output.dir>/eval)."),
    limit: int = typer.Option(None, "--limit", help=_about("eval.limit")),
    force: bool = ForceOpt,
) -> None:
    """Evaluate a model: preference AUC, generations, exact match, BBH -> <run>/eval/eval.json."""
    flags = {"eval.model": model, "eval.tasks": tasks, "eval.limit": limit}
    _invoke("eval", recipe, sets, flags,
            lambda m, cfg: m.run(cfg, data=data, logprobs=logprobs_dir, out=out, force=force),
            {"--data": data, "--logprobs": logprobs_dir, "--out": out})


@_command(examples=['rdro report --recipe recipes/tiny-cpu.toml',
                   'rdro report --run runs/rdro --run runs/kto --out runs/compare'])
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
            lambda m, cfg: m.run(cfg, runs=run_dirs or None, out=out, baseline=baseline),
            {"--run": run_dirs or [], "--baseline": baseline, "--out": out})


@_command(examples=["rdro verify runs/tiny-cpu", "rdro verify --recipe recipes/tiny-cpu.toml"])
def verify(
    run_dir: Path = typer.Argument(None, help="A run directory, or one stage's directory (default: output.dir)."),
    recipe: Path = RecipeOpt,
    sets: list[str] = SetOpt,
) -> None:
    """Check every artifact of a run (and each training checkpoint) against its recorded digests.

    Prints a table of stages and their status; exits 0 only if everything is intact, 1 if not.
    """
    _invoke("verify", recipe, sets, {}, lambda m, cfg: m.run(run_dir or cfg.run_dir), {"RUN_DIR": run_dir})


def main() -> None:  # pragma: no cover - console entry for `python -m rdro_cli`
    app()
